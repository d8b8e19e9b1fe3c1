"""Input fields shared by every schema."""

from __future__ import annotations

import re
from typing import Any

import marshmallow as ma

# Control characters (NUL above all) never belong in names or labels, and Postgres refuses NUL.
TEXT_PATTERN = r"^[^\u0000-\u0008\u000b\u000c\u000e-\u001f]*$"
# A name also needs one visible character (leading and trailing blanks are stripped).
NAME_PATTERN = r"^\s*[^\s\u0000-\u001f][^\u0000-\u0008\u000b\u000c\u000e-\u001f]*$"


class Text(ma.fields.String):
    """A string without control characters or unpaired surrogates (documented as a pattern).

    The server checks the documented pattern itself, so what the OpenAPI document promises is
    exactly what is accepted.
    """

    pattern = TEXT_PATTERN
    error = "Must not contain control characters."

    def __init__(self, **kwargs: Any) -> None:
        metadata = kwargs.pop("metadata", {})
        metadata.setdefault("pattern", self.pattern)
        super().__init__(metadata=metadata, **kwargs)
        self._regex = re.compile(self.pattern)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not self._regex.fullmatch(text):
            raise ma.ValidationError(self.error)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ma.ValidationError("Must be valid Unicode text.") from exc
        return text


class Name(Text):
    """Text with at least one visible character."""

    pattern = NAME_PATTERN
    error = "Must have a visible character and no control characters."
