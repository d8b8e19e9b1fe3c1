"""Answer from a secondary provider when the primary fails before saying anything.

Once the primary has produced an event the device has (or may have) shown or played it, so a
later failure is passed through rather than answered twice by two models.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator

from inference.providers.base import Provider, ProviderError, ProviderEvent, ProviderRequest

log = logging.getLogger(__name__)


class FailoverProvider:
    def __init__(self, primary: Provider, secondary: Provider) -> None:
        self.primary = primary
        self.secondary = secondary
        self.name = primary.name
        self.model = primary.model

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        events = self.primary.stream(request)
        try:
            try:
                first = await anext(events)
            except StopAsyncIteration:
                return
            except ProviderError as exc:
                log.warning("%s failed before its first event on request %s (%s: %s); "
                            "answering from %s", self.primary.name, request.request_id,
                            exc.code, exc.message, self.secondary.name)
            else:
                yield first
                async for event in events:
                    yield event
                return
        finally:
            await _aclose(events)
        events = self.secondary.stream(request)
        try:
            async for event in events:
                yield event
        finally:
            await _aclose(events)

    async def close(self) -> None:
        try:
            await self.primary.close()
        finally:
            await self.secondary.close()


async def _aclose(events: AsyncIterator[ProviderEvent]) -> None:
    """Close a provider's stream: cancels its upstream work (the Provider protocol's promise)."""
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()
