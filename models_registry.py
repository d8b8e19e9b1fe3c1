"""Imports every domain's models so the metadata is complete (alembic, tests, the app)."""

import accounts.models  # noqa: F401
import billing.models  # noqa: F401
import core.models  # noqa: F401
import fleet.models  # noqa: F401
import inference.models  # noqa: F401
