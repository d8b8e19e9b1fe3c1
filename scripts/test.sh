#!/usr/bin/env bash
# Installs what the tests need and runs the whole suite: lint, types, migrations check,
# pytest (unit, API, schemathesis, multi-process and browser tests) on real services.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
scripts/install.sh dev

echo "== ruff"
.venv/bin/ruff check .
echo "== mypy (core)"
.venv/bin/mypy
echo "== alembic check on Postgres"
check_db="ensoul_alembic_check_$$"
psql -h 127.0.0.1 -U postgres -q -c "DROP DATABASE IF EXISTS ${check_db}" postgres
psql -h 127.0.0.1 -U postgres -q -c "CREATE DATABASE ${check_db}" postgres
trap 'psql -h 127.0.0.1 -U postgres -q -c "DROP DATABASE IF EXISTS ${check_db}" postgres' EXIT
DATABASE_URL="postgresql://postgres@127.0.0.1/${check_db}" .venv/bin/alembic upgrade head >/dev/null 2>&1
DATABASE_URL="postgresql://postgres@127.0.0.1/${check_db}" .venv/bin/alembic check
echo "== pytest"
.venv/bin/pytest -n "${PYTEST_WORKERS:-2}" -p no:cacheprovider "$@"
