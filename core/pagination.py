"""Cursor (keyset) pagination for every list: ``?cursor=&limit=`` -> ``{items, next_cursor}``.

Ids are time-ordered UUIDs, so ordering by id is creation order and the cursor is the last id
seen, opaque to clients. Lists stay fast at any depth because no OFFSET is ever used.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Any

import marshmallow as ma
from sqlalchemy import Select

from core.db import db
from core.errors import ValidationFailed

DEFAULT_LIMIT = 50
MAX_LIMIT = 200


class PageArgsSchema(ma.Schema):
    cursor = ma.fields.String(
        load_default=None,
        validate=ma.validate.Regexp(r"^[A-Za-z0-9_-]{22}$", error="Not a valid cursor."),
        metadata={"description": "Opaque cursor from `next_cursor`."},
    )
    limit = ma.fields.Integer(
        load_default=DEFAULT_LIMIT, validate=ma.validate.Range(min=1, max=MAX_LIMIT)
    )


def page_schema(item_schema: type[ma.Schema], name: str) -> type[ma.Schema]:
    """The response schema ``{items: [...], next_cursor}`` for one item schema."""
    return type(
        name,
        (ma.Schema,),
        {
            "items": ma.fields.List(ma.fields.Nested(item_schema), required=True),
            "next_cursor": ma.fields.String(allow_none=True, required=True),
        },
    )


def encode_cursor(last_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(last_id.bytes).decode().rstrip("=")


def decode_cursor(cursor: str) -> uuid.UUID:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return uuid.UUID(bytes=raw)
    except (ValueError, binascii.Error) as exc:
        raise ValidationFailed(details={"cursor": ["Not a valid cursor."]}) from exc


def paginate(
    stmt: Select[Any], id_column: Any, args: dict[str, Any], *, newest_first: bool = False
) -> dict[str, Any]:
    limit = args.get("limit") or DEFAULT_LIMIT
    if args.get("cursor"):
        after = decode_cursor(args["cursor"])
        stmt = stmt.where(id_column < after if newest_first else id_column > after)
    stmt = stmt.order_by(id_column.desc() if newest_first else id_column.asc()).limit(limit + 1)
    rows = list(db.session.execute(stmt).scalars())
    next_cursor = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return {"items": rows[:limit], "next_cursor": next_cursor}
