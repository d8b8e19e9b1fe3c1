"""Which provider serves a device: resolved from its profile, built once per process."""

from __future__ import annotations

import json
import logging
from typing import Any

from inference.providers.base import Provider
from inference.providers.local import LocalProvider, LocalSettings

log = logging.getLogger(__name__)


class ProviderRegistry:
    def __init__(self, config: Any) -> None:
        self.config = config
        self.local = LocalProvider(LocalSettings(
            ttft_ms=float(config["ENSOUL_LOCAL_TTFT_MS"]),
            tokens_per_second=float(config["ENSOUL_LOCAL_TOKENS_PER_SECOND"]),
            answer_tokens=int(config["ENSOUL_LOCAL_ANSWER_TOKENS"])))
        self._built: dict[str, Provider] = {}

    def for_profile(self, settings: dict[str, Any]) -> Provider:
        kind = settings.get("kind", "local")
        if kind == "local":
            return self.local
        key = json.dumps(settings, sort_keys=True)
        provider = self._built.get(key)
        if provider is None:
            provider = self._built[key] = self._build(settings)
        return provider

    def _build(self, settings: dict[str, Any]) -> Provider:
        from core.crypto import decrypt
        from inference.providers.failover import FailoverProvider
        from inference.providers.openai import OpenAIProvider, OpenAISettings

        def one(spec: dict[str, Any]) -> Provider:
            if spec.get("kind", "local") == "local":
                return self.local
            fields = {k: v for k, v in spec.items() if k not in ("kind", "api_key_encrypted",
                                                                  "secondary")}
            encrypted = spec.get("api_key_encrypted")
            api_key = decrypt(encrypted) if encrypted else ""
            return OpenAIProvider(OpenAISettings(api_key=api_key, **fields))

        primary = one(settings)
        secondary = settings.get("secondary")
        return FailoverProvider(primary, one(secondary)) if secondary else primary

    async def close(self) -> None:
        for provider in self._built.values():
            try:
                await provider.close()
            except Exception:
                log.exception("closing provider %s failed", provider.name)
        self._built.clear()
