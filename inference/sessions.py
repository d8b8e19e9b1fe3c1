"""Conversation memory and recent transcripts of a device, in Redis, bounded and expiring.

Memory is one hash per device (field: conversation id -> JSON list of turns), trimmed to the
tenant's turn and token window on every write so an hour-long companion chat keeps working
without growing, and expiring after the tenant's retention. Recent transcripts (what was asked,
heard and answered, for the portal) are a capped list per device with their own retention.
Deleting a device's data (reset, transfer, a request from its user) is two DELs.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from redis.asyncio import Redis

from inference.providers.local import estimate_tokens

RECENT_MAX = 50


def memory_key(prefix: str, tenant_id: str, device_id: str) -> str:
    return f"{prefix}:inference:{{t:{tenant_id}}}:memory:{device_id}"


def recent_key(prefix: str, tenant_id: str, device_id: str) -> str:
    return f"{prefix}:inference:{{t:{tenant_id}}}:recent:{device_id}"


def trim(turns: list[dict[str, str]], max_turns: int, max_tokens: int) -> list[dict[str, str]]:
    """The newest messages that fit both windows (a user/assistant pair counts as one turn)."""
    kept: list[dict[str, str]] = []
    tokens = 0
    for message in reversed(turns[-2 * max_turns:] if max_turns > 0 else []):
        tokens += estimate_tokens(message["content"])
        if tokens > max_tokens:
            break
        kept.append(message)
    kept.reverse()
    if kept and kept[0]["role"] == "assistant":  # never open on half a turn
        kept = kept[1:]
    return kept


class Memory:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    async def load(self, tenant_id: str, device_id: str, conversation: str) -> list[
            dict[str, str]]:
        raw = await self.redis.hget(memory_key(self.prefix, tenant_id, device_id), conversation)
        if raw is None:
            return []
        try:
            turns = json.loads(raw)
        except ValueError:
            return []
        return turns if isinstance(turns, list) else []

    async def remember(self, tenant_id: str, device_id: str, conversation: str | None,
                       history: list[dict[str, str]], asked: str, answered: str,
                       settings: dict[str, Any], record: dict[str, Any]) -> None:
        """Append a finished turn to the conversation and the device's recent list."""
        pipe = self.redis.pipeline(transaction=False)
        if conversation is not None:
            key = memory_key(self.prefix, tenant_id, device_id)
            turns = trim([*history, {"role": "user", "content": asked},
                          {"role": "assistant", "content": answered}],
                         int(settings.get("max_turns", 20)), int(settings.get("max_tokens", 4000)))
            pipe.hset(key, conversation, orjson.dumps(turns))
            pipe.expire(key, int(settings.get("ttl_seconds", 86400)))
        keep = int(settings.get("transcript_ttl_seconds", settings.get("ttl_seconds", 86400)))
        if keep > 0:  # 0: the tenant keeps no transcripts at all
            recent = recent_key(self.prefix, tenant_id, device_id)
            pipe.lpush(recent, orjson.dumps(record))
            pipe.ltrim(recent, 0, RECENT_MAX - 1)
            pipe.expire(recent, keep)
        await pipe.execute()
