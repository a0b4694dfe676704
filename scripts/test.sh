#!/usr/bin/env bash
# The test command: installs what is missing, then runs unit tests and #[pg_test]s
# (cargo pgrx test) and the system tests against a real cluster with a real receiver.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
scripts/setup.sh
VENV=${LINKHOOKS_VENV:-/opt/pg_linkhooks-venv}

echo "==> unit tests and #[pg_test]s (cargo pgrx test)"
PGDATA_TEST=/tmp/pg_linkhooks-pgrx-test
mkdir -p "$PGDATA_TEST" && chown postgres:postgres "$PGDATA_TEST"
cargo pgrx test pg15 --runas postgres --pgdata "$PGDATA_TEST"

echo "==> install the extension (and the previous release's install script, for upgrade tests)"
cargo pgrx install --release --pg-config "$PG_CONFIG" >/dev/null
install -m 644 tests/upgrade/pg_linkhooks--*.sql "$("$PG_CONFIG" --sharedir)/extension/"

echo "==> system tests on a fresh install"
"$VENV/bin/pytest" -q -p no:cacheprovider tests/system "$@"

echo "==> system tests on an install updated from 0.1.0"
LINKHOOKS_UPGRADE_FROM=0.1.0 "$VENV/bin/pytest" -q -p no:cacheprovider tests/system "$@"

echo "==> benchmark suite, smoke size (keeps it runnable; its numbers are not checked)"
scripts/bench.sh --smoke
