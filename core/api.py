"""The REST API object: flask-smorest with the project's one error shape and cursor pages."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask import Request
from flask_smorest import Api as SmorestApi
from flask_smorest import Blueprint
from webargs.multidictproxy import MultiDictProxy
from werkzeug.datastructures import CombinedMultiDict

API_PREFIX = "/api/v1"


@Blueprint.ARGUMENTS_PARSER.location_loader("form_and_files")
def _load_form_and_files(request: Request, schema: ma.Schema) -> MultiDictProxy:
    """Multipart uploads: form fields and files in one schema, documented as one body."""
    return MultiDictProxy(CombinedMultiDict([request.form, request.files]), schema)


Blueprint.DEFAULT_LOCATION_CONTENT_TYPE_MAPPING["form_and_files"] = "multipart/form-data"


class ErrorBodySchema(ma.Schema):
    code = ma.fields.String(required=True, metadata={"description": "Stable error code."})
    message = ma.fields.String(required=True, metadata={"description": "For people."})
    details = ma.fields.Dict(
        required=True, metadata={"description": "Per-field messages for validation errors."}
    )


class ErrorSchema(ma.Schema):
    error = ma.fields.Nested(ErrorBodySchema, required=True)


class Api(SmorestApi):
    ERROR_SCHEMA = ErrorSchema

    def _register_error_handlers(self) -> None:
        """Errors are rendered by ``core.web`` for the whole app, API and portal alike."""


api = Api(
    spec_kwargs={
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token of the tenant (`ens_...`).",
                }
            }
        },
        "security": [{"bearerAuth": []}],
    }
)


def api_blueprint(name: str, import_name: str, url_prefix: str, **kwargs: Any) -> Blueprint:
    return Blueprint(name, import_name, url_prefix=API_PREFIX + url_prefix, **kwargs)
