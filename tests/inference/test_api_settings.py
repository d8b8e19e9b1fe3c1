"""A tenant's inference settings and provider configurations through the REST API, and the
device profiles in Redis that follow them (and a product's limits) after every commit.

Who may call what, and other tenants' rows answering 404 on every endpoint, are walked for
all endpoints in tests/accounts/test_permissions.py and tests/core/test_tenancy.py.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis as redis_lib
from flask import current_app
from sqlalchemy import select

from accounts.models import AuditEntry
from core.crypto import decrypt
from core.db import db
from fleet import services as fleet
from fleet.models import Device
from inference.directory import DeviceProfile, profile_key
from inference.models import InferenceSettings, ProviderConfig
from tests.fleet.fixtures import Vendor, make_vendor

API = "/api/v1"
KEY = "sk-test-0123456789abcdef"
SETTINGS = {"memory_ttl_hours": 2, "memory_max_turns": 6, "memory_max_tokens": 1500,
            "transcript_retention_hours": 0}


@pytest.fixture
def vendor(app: Any) -> Vendor:
    return make_vendor()


def active_device(vendor: Vendor, product: Any = None) -> Device:
    """Activated, so the registry has projected its profile to Redis."""
    device = fleet.create_device(product or vendor.product, f"SN-{uuid.uuid4().hex[:10]}")
    fleet.activate(device)
    db.session.commit()
    return device


def profile(redis_client: redis_lib.Redis, device: Device) -> DeviceProfile:
    raw = redis_client.get(profile_key(current_app.config["ENSOUL_REDIS_PREFIX"],
                                       str(device.tenant_id), str(device.id)))
    assert raw is not None, "no profile in Redis"
    return DeviceProfile.from_json(raw)


def audit(vendor: Vendor, prefix: str) -> list[AuditEntry]:
    return list(db.session.execute(select(AuditEntry).where(
        AuditEntry.tenant_id == vendor.setup.tenant.id, AuditEntry.action.startswith(prefix))
        .order_by(AuditEntry.id)).scalars())


def error_of(response: Any) -> tuple[int, str]:
    return response.status_code, response.json["error"]["code"]


def create(client: Any, vendor: Vendor, **fields: Any) -> Any:
    body = {"name": f"GPT {uuid.uuid4().hex[:6]}", "kind": "openai", "model": "gpt-4o-mini",
            **fields}
    return client.post(f"{API}/providers", json=body, headers=vendor.headers)


# --- settings ------------------------------------------------------------------------------


def test_settings_default_to_the_platform_then_follow_the_tenant(
        client: Any, vendor: Vendor, redis_client: redis_lib.Redis) -> None:
    device = active_device(vendor)
    config = current_app.config
    shown = client.get(f"{API}/inference/settings", headers=vendor.headers)
    assert shown.status_code == 200
    assert shown.json == {
        "memory_ttl_hours": config["ENSOUL_MEMORY_TTL_SECONDS"] // 3600,
        "memory_max_turns": config["ENSOUL_MEMORY_MAX_TURNS"],
        "memory_max_tokens": config["ENSOUL_MEMORY_MAX_TOKENS"],
        "transcript_retention_hours": config["ENSOUL_MEMORY_TTL_SECONDS"] // 3600,
        "platform_defaults": True, "updated_at": None}
    assert profile(redis_client, device).memory == {
        "ttl_seconds": config["ENSOUL_MEMORY_TTL_SECONDS"],
        "max_turns": config["ENSOUL_MEMORY_MAX_TURNS"],
        "max_tokens": config["ENSOUL_MEMORY_MAX_TOKENS"],
        "transcript_ttl_seconds": config["ENSOUL_MEMORY_TTL_SECONDS"]}

    saved = client.put(f"{API}/inference/settings", json=SETTINGS, headers=vendor.headers)
    assert saved.status_code == 200, saved.json
    assert {k: saved.json[k] for k in SETTINGS} == SETTINGS
    assert saved.json["platform_defaults"] is False and saved.json["updated_at"]
    assert client.get(f"{API}/inference/settings", headers=vendor.headers).json == saved.json
    # The broker sees it: every device's profile, written after the commit.
    assert profile(redis_client, device).memory == {
        "ttl_seconds": 7200, "max_turns": 6, "max_tokens": 1500, "transcript_ttl_seconds": 0}
    [entry] = audit(vendor, "inference.settings")
    assert entry.details == {"memory_ttl_hours": 2, "memory_max_turns": 6,
                             "memory_max_tokens": 1500, "transcript_retention_hours": 0}

    again = client.put(f"{API}/inference/settings", json=SETTINGS, headers=vendor.headers)
    assert again.status_code == 200
    assert len(audit(vendor, "inference.settings")) == 1  # nothing changed, nothing audited
    client.put(f"{API}/inference/settings", json={**SETTINGS, "transcript_retention_hours": 1},
               headers=vendor.headers)
    assert audit(vendor, "inference.settings")[-1].details == {"transcript_retention_hours": 1}
    assert profile(redis_client, device).memory["transcript_ttl_seconds"] == 3600


def test_settings_are_per_tenant(client: Any, vendor: Vendor,
                                 redis_client: redis_lib.Redis) -> None:
    other = make_vendor()
    theirs = active_device(other)
    before = profile(redis_client, theirs)
    client.put(f"{API}/inference/settings", json=SETTINGS, headers=vendor.headers)
    assert client.get(f"{API}/inference/settings",
                      headers=other.headers).json["platform_defaults"] is True
    assert profile(redis_client, theirs) == before
    assert db.session.get(InferenceSettings, other.setup.tenant.id) is None


@pytest.mark.parametrize(("change", "field"), [
    ({"memory_ttl_hours": 0}, "memory_ttl_hours"),
    ({"memory_ttl_hours": 8761}, "memory_ttl_hours"),
    ({"memory_ttl_hours": "2"}, "memory_ttl_hours"),
    ({"memory_ttl_hours": 1.5}, "memory_ttl_hours"),
    ({"memory_max_turns": -1}, "memory_max_turns"),
    ({"memory_max_tokens": 99}, "memory_max_tokens"),
    ({"transcript_retention_hours": -1}, "transcript_retention_hours"),
    ({"transcript_retention_hours": None}, "transcript_retention_hours"),
    ({"transcript_retention_hours": True}, "transcript_retention_hours"),
    ({"keep_forever": True}, "keep_forever"),
])
def test_settings_validation_names_the_field(client: Any, vendor: Vendor,
                                             change: dict[str, Any], field: str) -> None:
    answer = client.put(f"{API}/inference/settings", json={**SETTINGS, **change},
                        headers=vendor.headers)
    assert error_of(answer) == (422, "validation_failed")
    assert list(answer.json["error"]["details"]) == [field]
    assert audit(vendor, "inference.settings") == []


def test_a_put_needs_every_field(client: Any, vendor: Vendor) -> None:
    answer = client.put(f"{API}/inference/settings", json={"memory_max_turns": 3},
                        headers=vendor.headers)
    assert error_of(answer) == (422, "validation_failed")
    assert sorted(answer.json["error"]["details"]) == [
        "memory_max_tokens", "memory_ttl_hours", "transcript_retention_hours"]


# --- provider configurations ---------------------------------------------------------------


def test_provider_crud_never_shows_the_api_key(client: Any, vendor: Vendor) -> None:
    created = create(client, vendor, name="  Main GPT ", api_key=KEY, voice="nova",
                     speech_model="tts-1", transcription_model="whisper-1",
                     base_url="https://llm.example.com/v1", first_token_timeout_s=5)
    assert created.status_code == 201, created.json
    body = created.json
    assert KEY not in created.get_data(as_text=True) and "api_key" not in body
    assert (body["name"], body["kind"], body["model"], body["base_url"], body["voice"]) == (
        "Main GPT", "openai", "gpt-4o-mini", "https://llm.example.com/v1", "nova")
    assert (body["api_key_set"], body["api_key_hint"]) == (True, KEY[-4:])
    assert (body["is_default"], body["enabled"], body["product_id"], body["secondary_id"]) == (
        False, True, None, None)
    assert (body["first_token_timeout_s"], body["total_timeout_s"]) == (5.0, 120.0)
    config = db.session.get(ProviderConfig, uuid.UUID(body["id"]))
    assert config is not None and config.api_key_encrypted is not None
    assert KEY not in config.api_key_encrypted and decrypt(config.api_key_encrypted) == KEY

    url = f"{API}/providers/{body['id']}"
    assert client.get(url, headers=vendor.headers).json == body
    listed = client.get(f"{API}/providers", headers=vendor.headers)
    assert [p["id"] for p in listed.json["items"]] == [body["id"]]
    assert KEY not in listed.get_data(as_text=True)

    patched = client.patch(url, json={"model": "gpt-4o", "voice": None, "enabled": False},
                           headers=vendor.headers)
    assert patched.status_code == 200, patched.json
    assert (patched.json["model"], patched.json["voice"], patched.json["enabled"]) == (
        "gpt-4o", None, False)
    assert patched.json["api_key_set"] is True  # untouched when not given
    short = client.patch(url, json={"api_key": "sk-short"}, headers=vendor.headers).json
    assert (short["api_key_set"], short["api_key_hint"]) == (True, None)
    removed = client.patch(url, json={"api_key": None}, headers=vendor.headers).json
    assert (removed["api_key_set"], removed["api_key_hint"]) == (False, None)

    assert client.delete(url, headers=vendor.headers).status_code == 204
    assert client.get(url, headers=vendor.headers).status_code == 404
    assert db.session.get(ProviderConfig, uuid.UUID(body["id"])) is None

    entries = audit(vendor, "provider.")
    assert [e.action for e in entries] == ["provider.create", "provider.update",
                                           "provider.update", "provider.update",
                                           "provider.delete"]
    assert entries[0].details["api_key"] == "set" and entries[0].details["name"] == "Main GPT"
    assert entries[1].details == {"model": "gpt-4o", "voice": None, "enabled": False}
    assert [e.details for e in entries[2:4]] == [{"api_key": "set"}, {"api_key": "removed"}]
    assert all(KEY not in str(e.details) and "sk-short" not in str(e.details)
               for e in entries)


def test_unchanged_patch_is_not_audited(client: Any, vendor: Vendor) -> None:
    body = create(client, vendor, name="Same").json
    answer = client.patch(f"{API}/providers/{body['id']}", json={"name": "Same",
                                                                 "model": "gpt-4o-mini"},
                          headers=vendor.headers)
    assert answer.status_code == 200
    assert [e.action for e in audit(vendor, "provider.")] == ["provider.create"]


def test_names_defaults_and_products_are_unique(client: Any, vendor: Vendor) -> None:
    first = create(client, vendor, name="One", is_default=True,
                   product_id=str(vendor.product.id)).json
    assert error_of(create(client, vendor, name="One")) == (409, "provider_exists")
    assert error_of(create(client, vendor, is_default=True)) == (
        409, "default_provider_exists")
    clash = create(client, vendor, product_id=str(vendor.product.id))
    assert error_of(clash) == (409, "product_has_provider")
    assert clash.json["error"]["details"] == {"product_id": ["Already 'One'."]}
    second = create(client, vendor, name="Two").json
    renamed = client.patch(f"{API}/providers/{second['id']}", json={"name": "One"},
                           headers=vendor.headers)
    assert error_of(renamed) == (409, "provider_exists")
    made_default = client.patch(f"{API}/providers/{second['id']}", json={"is_default": True},
                                headers=vendor.headers)
    assert error_of(made_default) == (409, "default_provider_exists")
    # Handing the default over: the old one first, then the new one.
    client.patch(f"{API}/providers/{first['id']}", json={"is_default": False},
                 headers=vendor.headers)
    moved = client.patch(f"{API}/providers/{second['id']}", json={"is_default": True},
                         headers=vendor.headers)
    assert moved.status_code == 200 and moved.json["is_default"] is True
    # Another tenant has its own namespace and its own default.
    elsewhere = make_vendor()
    assert create(client, elsewhere, name="One", is_default=True).status_code == 201


def test_references_to_another_tenants_rows_are_not_found(client: Any, vendor: Vendor) -> None:
    other = make_vendor()
    theirs = create(client, other, name="Theirs").json
    product = create(client, vendor, product_id=str(other.product.id))
    assert error_of(product) == (404, "not_found")
    assert list(product.json["error"]["details"]) == ["product_id"]
    secondary = create(client, vendor, secondary_id=theirs["id"])
    assert error_of(secondary) == (404, "not_found")
    assert list(secondary.json["error"]["details"]) == ["secondary_id"]
    for method in ("get", "patch", "delete"):
        answer = getattr(client, method)(f"{API}/providers/{theirs['id']}",
                                         json={"model": "x"} if method == "patch" else None,
                                         headers=vendor.headers)
        assert error_of(answer) == (404, "not_found"), method
    assert client.get(f"{API}/providers/{theirs['id']}",
                      headers=other.headers).json["model"] == "gpt-4o-mini"
    assert audit(vendor, "provider.") == []


def test_failover_references(client: Any, vendor: Vendor) -> None:
    backup = create(client, vendor, name="Backup", kind="local", model="fallback").json
    main = create(client, vendor, name="Main", secondary_id=backup["id"]).json
    assert main["secondary_id"] == backup["id"]
    own = client.patch(f"{API}/providers/{main['id']}", json={"secondary_id": main["id"]},
                       headers=vendor.headers)
    assert error_of(own) == (422, "validation_failed")
    assert list(own.json["error"]["details"]) == ["secondary_id"]
    in_use = client.delete(f"{API}/providers/{backup['id']}", headers=vendor.headers)
    assert error_of(in_use) == (409, "provider_in_use")
    assert in_use.json["error"]["details"] == {"secondary_of": ["Main"]}
    client.patch(f"{API}/providers/{main['id']}", json={"secondary_id": None},
                 headers=vendor.headers)
    assert client.delete(f"{API}/providers/{backup['id']}",
                         headers=vendor.headers).status_code == 204


@pytest.mark.parametrize(("change", "field"), [
    ({"name": None}, "name"),
    ({"name": "   "}, "name"),
    ({"name": "n" * 65}, "name"),
    ({"kind": "anthropic"}, "kind"),
    ({"model": ""}, "model"),
    ({"model": None}, "model"),
    ({"base_url": "ftp://llm.example.com"}, "base_url"),
    ({"base_url": "https://llm.example.com/v1?key=1"}, "base_url"),
    ({"base_url": "llm.example.com"}, "base_url"),
    ({"voice": "v\x00"}, "voice"),
    ({"api_key": ""}, "api_key"),
    ({"api_key": "k" * 501}, "api_key"),
    ({"product_id": "not-a-uuid"}, "product_id"),
    ({"first_token_timeout_s": 0.1}, "first_token_timeout_s"),
    ({"total_timeout_s": 3601}, "total_timeout_s"),
    ({"total_timeout_s": "NaN"}, "total_timeout_s"),
    ({"enabled": "sometimes"}, "enabled"),
    ({"api_key_encrypted": "gAAAA"}, "api_key_encrypted"),
])
def test_provider_validation_names_the_field(client: Any, vendor: Vendor,
                                             change: dict[str, Any], field: str) -> None:
    answer = create(client, vendor, **change)
    assert error_of(answer) == (422, "validation_failed")
    assert list(answer.json["error"]["details"]) == [field]
    assert audit(vendor, "provider.") == []
    if field not in ("name", "model", "api_key_encrypted") or change.get(field):
        body = create(client, vendor).json
        patched = client.patch(f"{API}/providers/{body['id']}", json=change,
                               headers=vendor.headers)
        assert error_of(patched) == (422, "validation_failed")
        assert list(patched.json["error"]["details"]) == [field]


def test_model_and_kind_are_required_on_create(client: Any, vendor: Vendor) -> None:
    answer = client.post(f"{API}/providers", json={"name": "Bare"}, headers=vendor.headers)
    assert error_of(answer) == (422, "validation_failed")
    assert sorted(answer.json["error"]["details"]) == ["kind", "model"]


# --- what the broker sees ------------------------------------------------------------------


def test_device_profiles_follow_the_provider_configs(client: Any, vendor: Vendor,
                                                     redis_client: redis_lib.Redis) -> None:
    device = active_device(vendor)
    other_product, _ = fleet.create_product(vendor.setup.tenant.id, "Glasses",
                                            fleet.HardwareKind.GLASSES)
    db.session.commit()
    glasses = active_device(vendor, other_product)
    platform = {"kind": current_app.config["ENSOUL_INFERENCE_PROVIDER"]}
    assert profile(redis_client, device).provider == platform

    backup = create(client, vendor, name="Backup", base_url="http://vllm.internal:8000/v1",
                    model="qwen2.5").json
    assert profile(redis_client, device).provider == platform  # standby only
    default = create(client, vendor, name="Default", is_default=True, api_key=KEY,
                     speech_model="tts-1", secondary_id=backup["id"]).json
    spec = profile(redis_client, device).provider
    assert decrypt(spec.pop("api_key_encrypted")) == KEY
    assert spec == {"kind": "openai", "base_url": "https://api.openai.com/v1",
                    "model": "gpt-4o-mini", "first_token_timeout": 20.0,
                    "total_timeout": 120.0, "speech_model": "tts-1",
                    "secondary": {"kind": "openai", "base_url": "http://vllm.internal:8000/v1",
                                  "model": "qwen2.5", "first_token_timeout": 20.0,
                                  "total_timeout": 120.0}}
    assert KEY not in redis_client.get(profile_key(  # type: ignore[operator]
        current_app.config["ENSOUL_REDIS_PREFIX"], str(device.tenant_id),
        str(device.id))).decode()

    # The product's own config wins over the default, for that product's devices only.
    own = create(client, vendor, name="Bear", kind="local", model="bear",
                 product_id=str(vendor.product.id)).json
    assert profile(redis_client, device).provider == {"kind": "local"}
    assert profile(redis_client, glasses).provider["model"] == "gpt-4o-mini"
    # Disabled: skipped, the default serves; a disabled secondary is left out.
    client.patch(f"{API}/providers/{own['id']}", json={"enabled": False},
                 headers=vendor.headers)
    client.patch(f"{API}/providers/{backup['id']}", json={"enabled": False},
                 headers=vendor.headers)
    assert profile(redis_client, device).provider["model"] == "gpt-4o-mini"
    assert "secondary" not in profile(redis_client, device).provider
    client.patch(f"{API}/providers/{default['id']}", json={"secondary_id": None},
                 headers=vendor.headers)
    client.delete(f"{API}/providers/{default['id']}", headers=vendor.headers)
    assert profile(redis_client, device).provider == platform
    assert profile(redis_client, glasses).provider == platform


def test_a_failed_request_changes_no_profile(client: Any, vendor: Vendor,
                                             redis_client: redis_lib.Redis) -> None:
    device = active_device(vendor)
    create(client, vendor, name="Taken")
    before = profile(redis_client, device)
    assert create(client, vendor, name="Taken", is_default=True).status_code == 409
    assert profile(redis_client, device) == before


def test_product_limits_only_tighten_and_reach_the_profiles(
        client: Any, vendor: Vendor, redis_client: redis_lib.Redis) -> None:
    config = current_app.config
    rpm = config["ENSOUL_INFERENCE_REQUESTS_PER_MINUTE"]
    streams = config["ENSOUL_INFERENCE_CONCURRENT_STREAMS"]
    device = active_device(vendor)
    url = f"{API}/products/{vendor.product.id}"
    shown = client.get(url, headers=vendor.headers).json
    assert (shown["requests_per_minute"], shown["concurrent_streams"],
            shown["daily_request_cap"]) == (None, None, None)

    patched = client.patch(url, json={"requests_per_minute": rpm - 1, "daily_request_cap": 30,
                                      "concurrent_streams": streams + 5},
                           headers=vendor.headers)
    assert patched.status_code == 200, patched.json
    assert (patched.json["requests_per_minute"], patched.json["daily_request_cap"],
            patched.json["concurrent_streams"]) == (rpm - 1, 30, streams + 5)
    seen = profile(redis_client, device)
    # A looser product limit never loosens the platform's.
    assert (seen.requests_per_minute, seen.daily_request_cap, seen.concurrent_streams) == (
        rpm - 1, 30, streams)
    assert [e.details for e in audit(vendor, "product.update")] == [
        {"requests_per_minute": rpm - 1, "daily_request_cap": 30,
         "concurrent_streams": streams + 5}]

    cleared = client.patch(url, json={"requests_per_minute": None, "description": "Soft"},
                           headers=vendor.headers)
    assert cleared.json["requests_per_minute"] is None
    assert profile(redis_client, device).requests_per_minute == rpm
    untouched = client.patch(url, json={"name": "Companion Bear 2"}, headers=vendor.headers)
    assert untouched.json["daily_request_cap"] == 30  # not given, not changed

    created = client.post(f"{API}/products", json={
        "name": "Capsule", "hardware_kind": "capsule", "concurrent_streams": 1},
        headers=vendor.headers)
    assert created.status_code == 201 and created.json["concurrent_streams"] == 1


@pytest.mark.parametrize("change", [
    {"requests_per_minute": 0}, {"concurrent_streams": -1}, {"daily_request_cap": "5"},
    {"daily_request_cap": 10_000_001}, {"requests_per_minute": 2.5}])
def test_product_limit_validation_names_the_field(client: Any, vendor: Vendor,
                                                  change: dict[str, Any]) -> None:
    answer = client.patch(f"{API}/products/{vendor.product.id}", json=change,
                          headers=vendor.headers)
    assert error_of(answer) == (422, "validation_failed")
    assert list(answer.json["error"]["details"]) == list(change)
    created = client.post(f"{API}/products", json={"name": "Lamp", "hardware_kind": "other",
                                                   **change}, headers=vendor.headers)
    assert error_of(created) == (422, "validation_failed")
    assert list(created.json["error"]["details"]) == list(change)
