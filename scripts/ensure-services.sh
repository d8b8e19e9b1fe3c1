#!/usr/bin/env bash
# Makes sure the services the test suite talks to are there: starts a stopped one, installs a
# missing tool (as root), or fails at once naming the exact command.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
as_root() { [ "$(id -u)" = 0 ]; }
apt_install() {
  if as_root; then
    [ -n "${APT_UPDATED:-}" ] || { apt-get update -qq >/dev/null; APT_UPDATED=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "error: missing packages; install them with: sudo apt-get install -y $*" >&2; exit 1
  fi
}

if ! port_open 5432; then
  command -v pg_ctlcluster >/dev/null || { echo "error: PostgreSQL is not installed: apt-get install -y postgresql" >&2; exit 1; }
  echo "starting PostgreSQL" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
fi
if ! port_open 6379; then
  command -v redis-server >/dev/null || apt_install redis-server
  echo "starting Redis" >&2
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
command -v mosquitto >/dev/null || apt_install mosquitto mosquitto-clients
command -v mosquitto_passwd >/dev/null || apt_install mosquitto-clients
command -v chromium >/dev/null || apt_install chromium
for _ in $(seq 1 100); do port_open 5432 && port_open 6379 && break; sleep 0.1; done
port_open 5432 || { echo "error: PostgreSQL did not come up on 127.0.0.1:5432" >&2; exit 1; }
port_open 6379 || { echo "error: Redis did not come up on 127.0.0.1:6379" >&2; exit 1; }
