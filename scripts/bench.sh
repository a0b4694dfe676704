#!/usr/bin/env bash
# The benchmark suite: builds and installs the extension, then bench/suite.py
# starts its own cluster, nginx receiver and slow receiver, runs every case
# against a baseline in the same run and prints one table. Run as root.
# Usage: scripts/bench.sh [--smoke] [--only case,case]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
for tool in nginx valgrind; do
  command -v "$tool" >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light valgrind >/dev/null; }
done
cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null
exec "${LINKHOOKS_VENV:-/opt/pg_linkhooks-venv}/bin/python" bench/suite.py "$@"
