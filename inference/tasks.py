"""Inference's periodic jobs: keep the devices' admission profiles in Redis complete."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from core.queue import app_job
from inference import directory

MISSING_PROFILES_SECONDS = 2
ALL_PROFILES_SECONDS = 600


@app_job
def project_missing_profiles() -> int:
    """Profiles a broker looked for and did not find (Redis lost them, a race with a commit)."""
    return directory.project_missing_profiles()


@app_job
def project_all_profiles() -> int:
    return directory.project_all()


def periodic_jobs(config: Mapping[str, Any]) -> list[tuple[int, Callable[[], Any]]]:
    return [(MISSING_PROFILES_SECONDS, project_missing_profiles),
            (ALL_PROFILES_SECONDS, project_all_profiles)]
