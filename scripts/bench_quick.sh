#!/usr/bin/env bash
# Quick pgbench measurements (not the full benchmark suite): the click path's
# throughput as ratios against baselines measured in the same run.
# Usage: scripts/bench_quick.sh [seconds per case, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
DIR=/tmp/pg_linkhooks-bench
PORT=55434
scripts/setup.sh >/dev/null
cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null
[[ -f "$DIR/postmaster.pid" ]] && scripts/cluster.sh stop "$DIR" "$PORT" || true
rm -rf "$DIR"
# The worker serves another database, so queued deliveries stay queued: this measures the insert side only.
scripts/cluster.sh start "$DIR" "$PORT" "linkhooks.database = 'nowhere'
linkhooks.allow_private_targets = on
linkhooks.require_https = off
synchronous_commit = off"
psql() { command psql -h "$DIR" -p "$PORT" -U postgres -X -q "$@"; }
psql <<'SQL'
CREATE EXTENSION pg_linkhooks;
INSERT INTO linkhooks.links (slug, destination) SELECT 'l' || g, 'https://acme.com/p/' || g FROM generate_series(1, 10000) g;
INSERT INTO linkhooks.links (slug, destination) VALUES ('hot', 'https://acme.com/hot');
CREATE TABLE plain_clicks (LIKE linkhooks.clicks INCLUDING ALL);  -- same columns, defaults, identity, indexes; no triggers
SQL
UA="Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Mobile/15E148 Safari/604.1"
W=$(mktemp -d)
echo "SELECT linkhooks.record_click('hot', '203.0.113.1', '$UA');" > "$W/hot.sql"
printf '\\set n random(1, 10000)\nSELECT linkhooks.record_click(%s, %s, %s);\n' "'l' || :n" "'203.0.113.1'" "'$UA'" > "$W/spread.sql"
printf '\\set n random(1, 10000)\nINSERT INTO linkhooks.clicks (link_id, ip, user_agent) VALUES (:n, %s, %s);\n' "'203.0.113.1'" "'$UA'" > "$W/insert.sql"
printf '\\set n random(1, 10000)\nINSERT INTO plain_clicks (link_id, ip, user_agent) VALUES (:n, %s, %s);\n' "'203.0.113.1'" "'$UA'" > "$W/plain.sql"
tps() { pgbench -h "$DIR" -p "$PORT" -U postgres -n -M prepared -c "$2" -j 2 -T "$SECS" -f "$W/$1" postgres 2>/dev/null | awk '/^tps/ {print int($3)}'; }
row() { printf '| %-58s | %8s | %8s | %5s |\n' "$1" "$2" "$3" "$(awk -v a="$2" -v b="$3" 'BEGIN {printf "%.2f", a/b}')"; }
echo "| case | tps | baseline tps | ratio |"
echo "|---|---|---|---|"
hot=$(tps hot.sql 8); spread=$(tps spread.sql 8)
row "record_click, one hot link, 8 clients (vs 10k links)" "$hot" "$spread"
plain=$(tps plain.sql 8); zero=$(tps insert.sql 8)
row "click INSERT, 0 subscriptions (vs table without triggers)" "$zero" "$plain"
psql -c "INSERT INTO linkhooks.subscriptions (name, url, filters) VALUES ('one', 'http://127.0.0.1:9/', '{\"exclude_bots\": false}')"
one=$(tps insert.sql 8)
row "click INSERT, 1 subscription (vs table without triggers)" "$one" "$plain"
row "click INSERT, 1 subscription (vs 0 subscriptions)" "$one" "$zero"
scripts/cluster.sh stop "$DIR" "$PORT"
rm -rf "$W"
