#!/usr/bin/env bash
# Installs everything pg_linkhooks needs on a fresh Debian machine, idempotently:
# PostgreSQL 15 and headers, clang, pg_partman and PL/Proxy (their tests), cargo-pgrx
# 0.18.1, pgrx init, and the Python packages the system tests use (scripts/bench.sh adds
# nginx and valgrind). Run as root, with Rust 1.88 or newer.
if ! rustc --version 2>/dev/null | awk '{split($2, v, "."); exit !(v[1] > 1 || v[2] >= 88)}'; then
  echo "pg_linkhooks needs Rust 1.88 or newer (found: $(rustc --version 2>/dev/null || echo none)); install it with rustup" >&2
  exit 1
fi
set -euo pipefail
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
need_apt=()
for pkg in postgresql-15 postgresql-server-dev-15 postgresql-15-partman postgresql-15-plproxy libclang-dev clang sudo python3-venv; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  echo "==> apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if [[ "$(cargo pgrx --version 2>/dev/null)" != *"0.18.1"* ]]; then
  echo "==> cargo install cargo-pgrx 0.18.1 (about 7 minutes, once)"
  cargo install cargo-pgrx --version 0.18.1 --locked
fi
if ! grep -q "pg15" "${PGRX_HOME:-$HOME/.pgrx}/config.toml" 2>/dev/null; then
  cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
fi
VENV=${LINKHOOKS_VENV:-/opt/pg_linkhooks-venv}
if [[ ! -x "$VENV/bin/pytest" ]]; then
  echo "==> python venv with pytest, psycopg and standardwebhooks"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q pytest 'psycopg[binary]' standardwebhooks
fi
