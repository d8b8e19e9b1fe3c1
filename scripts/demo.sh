#!/usr/bin/env bash
# Installs Ensoul and runs the whole platform on the embedded default: SQLite, an in-process
# MQTT broker and an in-memory Redis in one process, with a seeded demo tenant.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh runtime
# The demo is always the embedded profile, whatever the shell exports.
unset DATABASE_URL REDIS_URL MQTT_URL SECRET_KEY ENSOUL_PROFILE
export ENSOUL_PROFILE=embedded
port="${PORT:-8000}"
.venv/bin/flask --app app db-upgrade
.venv/bin/flask --app app seed-demo
echo "Portal: http://127.0.0.1:${port}/   REST API docs: http://127.0.0.1:${port}/api/v1/docs"
exec .venv/bin/flask --app app serve --host 127.0.0.1 --port "$port" --demo-devices "${DEMO_DEVICES:-5}"
