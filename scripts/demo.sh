#!/usr/bin/env bash
# The demo: builds and installs pg_linkhooks, starts a throwaway cluster and a
# local webhook receiver, creates links and a subscription, records clicks,
# and shows redirects, verified webhooks and the delivery log. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${DEMO_DIR:-/tmp/pg_linkhooks-demo}
PORT=${DEMO_PORT:-55433}
HOOK_PORT=${DEMO_HOOK_PORT:-55480}
VENV=${LINKHOOKS_VENV:-/opt/pg_linkhooks-venv}
scripts/setup.sh
echo "==> building and installing the extension"
cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null
[[ -f "$DIR/postmaster.pid" ]] && scripts/cluster.sh stop "$DIR" "$PORT" || true
rm -rf "$DIR"
# The receiver runs on loopback, so the demo allows private targets and plain http.
scripts/cluster.sh start "$DIR" "$PORT" "linkhooks.allow_private_targets = on
linkhooks.require_https = off
linkhooks.base_url = 'https://go.acme.co'"
psql() { command psql -h "$DIR" -p "$PORT" -U postgres -X -q "$@"; }

psql -c "CREATE EXTENSION pg_linkhooks"
SECRET=$(psql -At -c "SELECT linkhooks.generate_secret()")
pkill -f "demo_receiver.py $HOOK_PORT" 2>/dev/null || true
"$VENV/bin/python" scripts/demo_receiver.py "$HOOK_PORT" "$SECRET" > "$DIR/receiver.log" 2>&1 &
echo $! > "$DIR/receiver.pid"
for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$HOOK_PORT") 2>/dev/null && break; sleep 0.1; done
psql -c "INSERT INTO linkhooks.subscriptions (name, url, secret, filters)
         VALUES ('demo receiver', 'http://127.0.0.1:$HOOK_PORT/hooks', '$SECRET', '{\"exclude_bots\": false}')"

echo "==> links"
psql <<'SQL'
INSERT INTO linkhooks.links (slug, destination, campaign, tags, utm) VALUES
  ('sale', 'https://acme.com/winter-sale', 'winter-sale-2026', '{social}', '{"source": "instagram", "medium": "social"}');
INSERT INTO linkhooks.links (slug, destination, expires_at, expired_url) VALUES
  ('old', 'https://acme.com/summer', now() - interval '1 day', 'https://acme.com/sale-over');
INSERT INTO linkhooks.links (slug, destination, max_clicks, expired_url) VALUES
  ('vip', 'https://acme.com/vip', 2, 'https://acme.com/sold-out');
INSERT INTO linkhooks.links (slug, destination, disabled) VALUES ('paused', 'https://acme.com/paused', true);
SQL
echo "==> clicks (record_click answers the redirect and records the click)"
psql <<'SQL'
SELECT linkhooks.record_click('sale', '203.0.113.42',
  'Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Mobile/15E148 Safari/604.1',
  'https://instagram.com', 'US', 'San Francisco') AS redirect_to;
SELECT linkhooks.record_click('vip', user_agent => 'Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/120.0 Safari/537.36'),
       linkhooks.record_click('vip', user_agent => 'Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/120.0 Safari/537.36'),
       linkhooks.record_click('vip', user_agent => 'Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/120.0 Safari/537.36');
INSERT INTO linkhooks.clicks (link_id, ip, user_agent, source) SELECT id, '198.51.100.7', 'Twitterbot/1.0', 'qr' FROM linkhooks.links WHERE slug = 'sale';
SQL
echo "==> what resolve answers for each kind of link"
psql <<'SQL'
SELECT state, slug, linkhooks.resolve(slug) AS redirect_to FROM (VALUES
  ('active', 'sale'), ('expired by time', 'old'), ('over its click limit', 'vip'),
  ('disabled', 'paused'), ('unknown', 'nope')) AS t(state, slug);
SELECT c.id, slug, device, browser, os, is_bot, source FROM linkhooks.clicks c JOIN linkhooks.links l ON l.id = c.link_id ORDER BY c.id;
SQL
echo "==> webhooks arriving at the receiver (each verified with the standardwebhooks library)"
for _ in $(seq 1 100); do
  [[ $(psql -At -c "SELECT count(*) FROM linkhooks.deliveries WHERE status <> 'delivered'") == 0 ]] && break
  sleep 0.1
done
cat "$DIR/receiver.log"
echo "==> what analysts and on-call engineers see"
psql <<'SQL'
SELECT delivery_id, event_type, status, attempts, last_status_code, latency_ms FROM linkhooks.delivery_log ORDER BY delivery_id;
SELECT name, period, delivered, failed_attempts, dead_letters, success_rate, latency_p50_ms, latency_p99_ms, pending
  FROM linkhooks.subscription_health;
SELECT slug, clicks, human_clicks, bot_clicks, qr_scans, conversions FROM linkhooks.link_stats ORDER BY link_id;
SELECT running, pid, in_flight, last_loop, queue_depth FROM linkhooks.worker_status();
SQL
cat <<EOF

The demo cluster is still running.
  connect:  psql -h $DIR -p $PORT -U postgres
  stop:     scripts/cluster.sh stop $DIR $PORT; kill \$(cat $DIR/receiver.pid)
EOF
