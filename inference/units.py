"""Metered units: what a request consumed, counted by the broker (never credits or money)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(slots=True)
class Units:
    input_tokens: int = 0
    output_tokens: int = 0
    audio_in_ms: int = 0
    audio_out_ms: int = 0
    images: int = 0
    tool_calls: int = 0

    def __add__(self, other: Units) -> Units:  # spelled out: on the billing hook's hot path
        return Units(self.input_tokens + other.input_tokens,
                     self.output_tokens + other.output_tokens,
                     self.audio_in_ms + other.audio_in_ms, self.audio_out_ms + other.audio_out_ms,
                     self.images + other.images, self.tool_calls + other.tool_calls)

    def __sub__(self, other: Units) -> Units:
        return Units(self.input_tokens - other.input_tokens,
                     self.output_tokens - other.output_tokens,
                     self.audio_in_ms - other.audio_in_ms, self.audio_out_ms - other.audio_out_ms,
                     self.images - other.images, self.tool_calls - other.tool_calls)

    def covers(self, used: Units) -> bool:
        """Whether every unit of ``used`` fits in this budget."""
        return all(getattr(used, f.name) <= getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Units:
        data = data or {}
        return cls(**{f.name: int(data.get(f.name) or 0) for f in fields(cls)})


UNIT_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Units))
