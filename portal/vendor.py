"""Front-end libraries from the npm registry, served from ``node_modules`` (never a CDN).

Only the packages package.json depends on are served; a missing ``node_modules`` (before
``npm ci``) answers 404 like any missing file.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from flask import send_from_directory
from werkzeug.wrappers import Response

from config.settings import PROJECT_ROOT
from core.errors import NotFound
from portal.blueprint import bp, public

NODE_MODULES = Path(PROJECT_ROOT) / "node_modules"
CACHE_SECONDS = 24 * 3600


@functools.cache
def vendor_packages() -> frozenset[str]:
    try:
        manifest = json.loads((Path(PROJECT_ROOT) / "package.json").read_text())
    except (OSError, ValueError):
        return frozenset()
    return frozenset(manifest.get("dependencies", {}))


@bp.route("/static/vendor/<package>/<path:filename>")
@public
def vendor(package: str, filename: str) -> Response:
    if package not in vendor_packages():
        raise NotFound()
    return send_from_directory(NODE_MODULES / package, filename, max_age=CACHE_SECONDS)
