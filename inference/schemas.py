"""Marshmallow schemas of the inference API: settings, provider configurations, what a device
did. (The protocol's JSON Schemas for devices live in ``inference/protocol_schemas/``.)"""

from __future__ import annotations

import marshmallow as ma

from core.fields import Name, Text
from core.pagination import page_schema
from inference.models import ProviderKind

KIND_VALUES = [k.value for k in ProviderKind]
HOURS_PER_YEAR = 8760
# Documented as the field's pattern (apispec copies a Regexp validator), so what the OpenAPI
# document promises is exactly what is accepted.
BASE_URL_PATTERN = (r"^https?://[A-Za-z0-9][A-Za-z0-9.-]*(:[0-9]{1,5})?"
                    r"(/[A-Za-z0-9._~%!$&'()*+,;=:@/-]*)?$")


def _required_int(low: int, high: int, description: str) -> ma.fields.Integer:
    return ma.fields.Integer(strict=True, required=True,
                             validate=ma.validate.Range(min=low, max=high),
                             metadata={"description": description})


# --- settings ------------------------------------------------------------------------------


class InferenceSettingsIn(ma.Schema):
    """Every field: a PUT replaces the tenant's settings as a whole."""

    memory_ttl_hours = _required_int(
        1, HOURS_PER_YEAR, "How long a conversation is remembered after its last turn.")
    memory_max_turns = _required_int(
        0, 200, "Turns (question and answer) kept per conversation; 0 remembers nothing.")
    memory_max_tokens = _required_int(
        100, 200_000, "Estimated tokens of remembered turns sent with each request, at most.")
    transcript_retention_hours = _required_int(
        0, HOURS_PER_YEAR, "How long a device's recent transcripts are kept; 0 keeps none "
        "(devices used by children).")


class InferenceSettingsOut(ma.Schema):
    memory_ttl_hours = ma.fields.Integer(required=True)
    memory_max_turns = ma.fields.Integer(required=True)
    memory_max_tokens = ma.fields.Integer(required=True)
    transcript_retention_hours = ma.fields.Integer(required=True)
    platform_defaults = ma.fields.Boolean(required=True, metadata={
        "description": "True until the tenant saves its own settings."})
    updated_at = ma.fields.AwareDateTime(required=True, allow_none=True)


# --- provider configurations ---------------------------------------------------------------


class ProviderIn(ma.Schema):
    name = Name(required=True, validate=ma.validate.Length(min=1, max=64))
    kind = ma.fields.Enum(ProviderKind, by_value=True, required=True, metadata={
        "description": "`openai`: any OpenAI-compatible endpoint; `local`: the platform's "
                       "built-in provider (development and tests)."})
    base_url = ma.fields.String(
        allow_none=True, validate=[ma.validate.Length(max=500), ma.validate.Regexp(
            BASE_URL_PATTERN, error="An http or https URL without query or fragment.")],
        metadata={"description": "Up to and including the API version, e.g. "
                                 "https://api.openai.com/v1 (the default when null)."})
    model = Text(required=True, validate=ma.validate.Length(min=1, max=128),
                 metadata={"description": "Chat model; for `local`, a label only."})
    transcription_model = Text(allow_none=True, validate=ma.validate.Length(min=1, max=128),
                               metadata={"description": "Speech-to-text model; null: voice "
                                                        "requests are refused."})
    speech_model = Text(allow_none=True, validate=ma.validate.Length(min=1, max=128),
                        metadata={"description": "Text-to-speech model; null: spoken answers "
                                                 "are refused."})
    voice = Text(allow_none=True, validate=ma.validate.Length(min=1, max=64))
    api_key = Text(load_only=True, allow_none=True, validate=ma.validate.Length(min=1, max=500),
                   metadata={"description": "Write-only: stored encrypted, never returned "
                                            "(see `api_key_set`, `api_key_hint`); null removes "
                                            "it."})
    product_id = ma.fields.UUID(allow_none=True, metadata={
        "description": "The product whose devices use this configuration (one per product)."})
    is_default = ma.fields.Boolean(metadata={
        "description": "Used by the devices of every product without a configuration of its "
                       "own (one per tenant). A configuration that is neither a product's nor "
                       "the default only serves as another's `secondary`."})
    secondary_id = ma.fields.UUID(allow_none=True, metadata={
        "description": "Another configuration of the tenant that answers when this one fails "
                       "before its first token."})
    first_token_timeout_s = ma.fields.Float(
        validate=ma.validate.Range(min=0.5, max=300),
        metadata={"description": "Seconds from the request to the first token (default 20)."})
    total_timeout_s = ma.fields.Float(
        validate=ma.validate.Range(min=1, max=3600),
        metadata={"description": "Seconds for the whole turn, first token included "
                                 "(default 120)."})
    enabled = ma.fields.Boolean(metadata={
        "description": "A disabled configuration is skipped: the next one in line serves."})


class ProviderUpdateIn(ProviderIn):
    """Only the fields given change."""

    class Meta:
        partial = True


class ProviderOut(ma.Schema):
    id = ma.fields.UUID(required=True)
    name = ma.fields.String(required=True)
    kind = ma.fields.Function(lambda c: c.kind.value, required=True,
                              metadata={"enum": KIND_VALUES})
    base_url = ma.fields.String(required=True, allow_none=True)
    model = ma.fields.String(required=True)
    transcription_model = ma.fields.String(required=True, allow_none=True)
    speech_model = ma.fields.String(required=True, allow_none=True)
    voice = ma.fields.String(required=True, allow_none=True)
    api_key_set = ma.fields.Function(lambda c: c.api_key_encrypted is not None, required=True)
    api_key_hint = ma.fields.String(required=True, allow_none=True, metadata={
        "description": "The key's last four characters (null for short keys)."})
    product_id = ma.fields.UUID(required=True, allow_none=True)
    is_default = ma.fields.Boolean(required=True)
    secondary_id = ma.fields.UUID(required=True, allow_none=True)
    first_token_timeout_s = ma.fields.Float(required=True)
    total_timeout_s = ma.fields.Float(required=True)
    enabled = ma.fields.Boolean(required=True)
    created_at = ma.fields.AwareDateTime(required=True)
    updated_at = ma.fields.AwareDateTime(required=True)


# --- what a device did ---------------------------------------------------------------------


class DeviceRequestOut(ma.Schema):
    id = ma.fields.UUID(required=True)
    request_id = ma.fields.String(required=True)
    kind = ma.fields.String(required=True, metadata={"description": "text, vision or voice"})
    admitted_at = ma.fields.AwareDateTime(required=True)
    settled_at = ma.fields.AwareDateTime(required=True)
    conversation_id = ma.fields.String(required=True, allow_none=True)
    provider = ma.fields.String(required=True)
    model = ma.fields.String(required=True)
    ttft_ms = ma.fields.Float(required=True, allow_none=True, metadata={
        "description": "Admission to the provider's first token."})
    first_delta_ms = ma.fields.Float(required=True, allow_none=True, metadata={
        "description": "Admission to the first delta sent to the device."})
    duration_ms = ma.fields.Float(required=True)
    input_tokens = ma.fields.Integer(required=True)
    output_tokens = ma.fields.Integer(required=True)
    audio_in_ms = ma.fields.Integer(required=True)
    audio_out_ms = ma.fields.Integer(required=True)
    images = ma.fields.Integer(required=True)
    tool_calls = ma.fields.Integer(required=True)
    credits = ma.fields.Integer(required=True)
    credit_split = ma.fields.Dict(keys=ma.fields.String(), values=ma.fields.Integer(),
                                  required=True, metadata={
        "description": "Where the credits came from: allowance, package or overage account "
                       "-> credits (docs/billing.md)."})
    rate_card_version = ma.fields.String(required=True, allow_none=True)
    finish = ma.fields.String(required=True, metadata={
        "description": "stop, length, abort, quota_exhausted or error"})
    error_code = ma.fields.String(required=True, allow_none=True)


class DeviceTranscriptOut(ma.Schema):
    id = ma.fields.String(required=True, metadata={"description": "The request id."})
    kind = ma.fields.String(required=True)
    asked = ma.fields.String(required=True)
    answer = ma.fields.String(required=True)
    at = ma.fields.Integer(required=True, metadata={
        "description": "Admission time, milliseconds since the epoch."})


class DeviceTranscriptList(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(DeviceTranscriptOut), required=True)


ProviderPage = page_schema(ProviderOut, "ProviderPage")
DeviceRequestPage = page_schema(DeviceRequestOut, "DeviceRequestPage")
