#!/usr/bin/env bash
# Quick delivery measurements (not the full benchmark suite): deliveries per
# second from a queued backlog to a local nginx answering 204 with keep-alive,
# and end-to-end latency (transaction start to response) for single clicks.
# Usage: scripts/bench_delivery.sh [backlog size, default 20000]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20000}
DIR=/tmp/pg_linkhooks-bench-delivery
PORT=55435
HOOK=55482
NGX=/tmp/pg_linkhooks-nginx
scripts/setup.sh >/dev/null
command -v nginx >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; }
cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null
mkdir -p "$NGX"
cat > "$NGX/nginx.conf" <<CONF
worker_processes 1;
pid $NGX/nginx.pid;
error_log $NGX/error.log;
events { worker_connections 4096; }
http { access_log off; server { listen 127.0.0.1:$HOOK; keepalive_requests 1000000; location / { return 204; } } }
CONF
[[ -f "$NGX/nginx.pid" ]] && nginx -c "$NGX/nginx.conf" -s stop 2>/dev/null || true
sleep 0.2
nginx -c "$NGX/nginx.conf"
[[ -f "$DIR/postmaster.pid" ]] && scripts/cluster.sh stop "$DIR" "$PORT" || true
rm -rf "$DIR"
# The worker starts on another database so the backlog builds up first.
scripts/cluster.sh start "$DIR" "$PORT" "linkhooks.allow_private_targets = on
linkhooks.require_https = off
linkhooks.database = 'nowhere'"
psql() { command psql -h "$DIR" -p "$PORT" -U postgres -X -q -At "$@"; }
psql -c "CREATE EXTENSION pg_linkhooks" \
     -c "INSERT INTO linkhooks.links (slug, destination) VALUES ('b', 'https://acme.com/')" \
     -c "INSERT INTO linkhooks.subscriptions (name, url, filters) VALUES ('nginx', 'http://127.0.0.1:$HOOK/', '{\"exclude_bots\": false}')" \
     -c "INSERT INTO linkhooks.clicks (link_id) SELECT 1 FROM generate_series(1, $N)"
psql -c "ALTER SYSTEM SET linkhooks.database = 'postgres'" -c "SELECT pg_reload_conf()" >/dev/null  # the worker restarts into this database
while [[ $(psql -c "SELECT count(*) FROM linkhooks.deliveries WHERE status <> 'delivered'") != 0 ]]; do sleep 0.2; done
psql -c "SELECT format('throughput: %s deliveries in %s s = %s deliveries/s', count(*),
                       round(extract(epoch FROM max(delivered_at) - (SELECT min(started_at) FROM linkhooks.delivery_attempts))::numeric, 2),
                       round(count(*) / extract(epoch FROM max(delivered_at) - (SELECT min(started_at) FROM linkhooks.delivery_attempts))::numeric))
         FROM linkhooks.deliveries"
psql -c "TRUNCATE linkhooks.deliveries, linkhooks.delivery_attempts"
for _ in $(seq 1 200); do psql -c "INSERT INTO linkhooks.clicks (link_id) VALUES (1)"; sleep 0.005; done
while [[ $(psql -c "SELECT count(*) FROM linkhooks.deliveries WHERE status <> 'delivered'") != 0 ]]; do sleep 0.1; done
psql -c "SELECT format('latency over %s single-click transactions: p50 %s ms, p99 %s ms', count(*),
                       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 1),
                       round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 1))
         FROM (SELECT extract(epoch FROM delivered_at - created_at) * 1000 AS ms FROM linkhooks.deliveries) t"
scripts/cluster.sh stop "$DIR" "$PORT"
nginx -c "$NGX/nginx.conf" -s stop
