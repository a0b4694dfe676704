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

echo "==> install the extension and run the system tests"
cargo pgrx install --release --pg-config "$PG_CONFIG" >/dev/null
"$VENV/bin/pytest" -q -p no:cacheprovider tests/system "$@"
