"""pg_linkhooks benchmark suite (issue 6).

Starts its own cluster, a local nginx answering 200 (its access log records
arrival time and webhook-id) and a slow receiver, runs every case against a
baseline measured in the same run, and prints one table: medians of several
runs with min and max. Run it with scripts/bench.sh; --smoke runs every case
tiny (seconds), to keep the suite from rotting.
"""

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "system"))
from harness import BIN, Cluster, Router, Standby, free_port, wait_for  # noqa: E402

UA = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 "
      "(KHTML, like Gecko) Version/17.2 Mobile/15E148 Safari/604.1")
BULK_UAS = ["Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
            "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.144 Mobile Safari/537.36",
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"]

# Throughput cases measure CPU cost, not fsync: by default commits do not wait for the WAL flush
# (`--synchronous-commit on` measures PostgreSQL's default instead). Each measured run
# starts right after a CHECKPOINT and none happens during it (write-heavy settings): with the default
# max_wal_size a checkpoint landed in a random run every ~30 s, and its full-page writes skewed that run.
SETTINGS = {
    "synchronous_commit": "off",
    "max_wal_size": "'16GB'",
    "checkpoint_timeout": "'30min'",
    "track_commit_timestamp": "on",  # commit time of each click, for end-to-end latency
    "max_connections": "100",
    "shared_buffers": "'256MB'",
    "linkhooks.databases": "'idle'",  # no worker (idle has no extension) until a case serves 'bench'
    "linkhooks.allow_private_targets": "on",
    "linkhooks.require_https": "off",
    "linkhooks.base_url": "'https://go.acme.co'",
}

SETUP = """
CREATE EXTENSION pg_linkhooks;
CREATE EXTENSION pgcrypto;
INSERT INTO linkhooks.links (slug, destination) SELECT 'l' || g, 'https://acme.com/p/' || g FROM generate_series(1, {links}) g;
INSERT INTO linkhooks.links (slug, destination) VALUES ('hot', 'https://acme.com/hot');
-- Baseline: the same table without triggers (columns, defaults, identity, indexes).
-- clicks' columns with a partition's keys and indexes (the partitioned table itself has none).
CREATE TABLE bench_plain_clicks (LIKE linkhooks.clicks INCLUDING ALL, PRIMARY KEY (id));
CREATE INDEX ON bench_plain_clicks (link_id, clicked_at);
CREATE INDEX ON bench_plain_clicks (txid);
-- Baseline: the outbox a DBA writes by hand: PL/pgSQL builds the JSON and signs it with pgcrypto.
CREATE TABLE bench_outbox_clicks (LIKE bench_plain_clicks INCLUDING ALL);
CREATE TABLE bench_outbox_subscriptions (id bigint PRIMARY KEY, secret bytea NOT NULL);
CREATE TABLE bench_outbox (id bigserial PRIMARY KEY, event_id uuid NOT NULL, subscription_id bigint NOT NULL,
                           body text NOT NULL, signature text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION bench_outbox_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    l record;
    s record;
    body text;
BEGIN
    SELECT id, slug, destination, campaign, tags INTO l FROM linkhooks.links WHERE id = NEW.link_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'invalid link_id: link % does not exist', NEW.link_id;
    END IF;
    body := jsonb_build_object('id', NEW.event_id, 'type', 'link.clicked', 'timestamp', NEW.clicked_at,
        'data', jsonb_build_object(
            'link', jsonb_build_object('id', l.id, 'slug', l.slug, 'destination', l.destination,
                                       'campaign', l.campaign, 'tags', l.tags),
            'click', jsonb_build_object('id', NEW.event_id, 'timestamp', NEW.clicked_at, 'ip_address', host(NEW.ip),
                                        'user_agent', NEW.user_agent, 'referer', NEW.referer, 'country', NEW.country,
                                        'city', NEW.city, 'source', NEW.source)))::text;
    FOR s IN SELECT id, secret FROM bench_outbox_subscriptions LOOP
        INSERT INTO bench_outbox (event_id, subscription_id, body, signature)
        VALUES (NEW.event_id, s.id, body,
                'v1,' || encode(hmac(convert_to(NEW.event_id || '.' || extract(epoch FROM now())::bigint || '.' || body, 'UTF8'),
                                     s.secret, 'sha256'), 'base64'));
    END LOOP;
    RETURN NEW;
END
$$;
-- Floor: what storing a click and its delivery costs with no logic at all (see click_inserts).
-- (deliveries' keys and indexes are its partitions', copied from deliveries_default; the identity is the parent's.)
CREATE TABLE bench_floor_deliveries (LIKE linkhooks.deliveries_default INCLUDING ALL);
ALTER TABLE bench_floor_deliveries ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY;
CREATE TRIGGER bench_outbox BEFORE INSERT ON bench_outbox_clicks FOR EACH ROW EXECUTE FUNCTION bench_outbox_trigger();
INSERT INTO bench_outbox_subscriptions VALUES (1, gen_random_bytes(32));
"""

# pgbench comparisons: `pairs` alternating runs of `seconds` each. Bursts of noise from other tenants hit
# single runs, so five short pairs give a steadier median than three long ones in the same time.
# Drain cases repeat `drains` times.
FULL = dict(pairs=5, seconds=5, drains=3, links=100_000, throughput=50_000, latency_seconds=15, milestone_seconds=20,
            isolation=20_000,
            backlog_small=10_000, backlog_large=1_000_000, callgrind=(100, 1100), view_clicks=10_000_000, view_deliveries=10_000_000,
            held_events=20_000, retention=(100_000, 10_000_000), visibility_changes=50,
            bulk_copy=100_000, bulk_rows=1_000)
SMOKE = dict(pairs=1, seconds=1, drains=1, links=1_000, throughput=500, latency_seconds=1, milestone_seconds=2,
             isolation=300,
             backlog_small=200, backlog_large=1_000, callgrind=(2, 12), view_clicks=20_000, view_deliveries=20_000, held_events=300, retention=(1_000, 20_000), visibility_changes=5,
             bulk_copy=2_000, bulk_rows=500)


class Nginx:
    """Debian's nginx answering 200 on 127.0.0.1, logging '$msec $http_webhook_id' per request."""

    def __init__(self, workdir):
        self.dir = os.path.join(workdir, "nginx")
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.log = os.path.join(self.dir, "access.log")
        self.conf = os.path.join(self.dir, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(f"""worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log;
events {{ worker_connections 4096; }}
http {{
    log_format arrival '$msec $http_webhook_id';
    access_log {self.log} arrival;
    client_body_temp_path {self.dir};
    server {{
        listen 127.0.0.1:{self.port};
        keepalive_requests 1000000;
        location / {{ return 200 'ok'; }}
    }}
}}
""")
        subprocess.run(["nginx", "-c", self.conf], check=True)

    def url(self, path="/hook"):
        return f"http://127.0.0.1:{self.port}{path}"

    def arrivals(self):
        """webhook-id → arrival time (Unix seconds), first arrival of each."""
        seen = {}
        with open(self.log) as f:
            for line in f:
                msec, _, webhook_id = line.strip().partition(" ")
                if webhook_id and webhook_id != "-":
                    seen.setdefault(webhook_id, float(msec))
        return seen

    def stop(self):
        subprocess.run(["nginx", "-c", self.conf, "-s", "stop"], check=False, stderr=subprocess.DEVNULL)


class SlowReceiver:
    """Answers every request with 200 after a delay (asyncio: thousands of waiting connections are fine)."""

    def __init__(self, delay):
        self.delay = delay
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self.server = server
        ready.set()
        self.loop.run_forever()

    async def _handle(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
                await reader.readexactly(length)
                await asyncio.sleep(self.delay)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, AttributeError):
            writer.close()

    def url(self):
        return f"http://127.0.0.1:{self.port}/slow"


class Bench:
    def __init__(self, size, workdir):
        self.size = size
        self.workdir = workdir
        self.rows = []
        self.cluster = Cluster(SETTINGS)
        self.cluster.start()
        with self.cluster.connect() as c:
            c.execute("CREATE DATABASE idle")
            c.execute("CREATE DATABASE bench")
        self.db = self.cluster.connect(dbname="bench")
        self.db.execute(SETUP.format(links=size["links"]))
        self.db.execute("VACUUM ANALYZE")
        self.nginx = Nginx(workdir)

    # ---- helpers ---------------------------------------------------------------------------

    def sql(self, query, params=()):
        return self.db.execute(query, params)

    def one(self, query, params=()):
        return self.db.execute(query, params).fetchone()[0]

    def pgbench(self, script, clients=8, seconds=None, rate=None, port=None, dbname="bench"):
        """Transactions per second of a pgbench script (prepared statements, 2 threads), on this cluster or
        the one on `port`."""
        path = os.path.join(self.workdir, "script.sql")
        with open(path, "w") as f:
            f.write(script)
        args = [f"{BIN}/pgbench", "-h", "127.0.0.1", "-p", str(port or self.cluster.port), "-U", "postgres", "-n", "-M", "prepared",
                "-c", str(clients), "-j", "2", "-T", str(seconds or self.size["seconds"]), "-f", path]
        if rate:
            args += ["-R", str(rate)]
        out = subprocess.run(args + [dbname], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"pgbench failed: {out.stderr.strip()}")
        return float(re.search(r"^tps = ([\d.]+)", out.stdout, re.M).group(1))

    def reset_clicks(self):
        for attempt in range(5):  # a busy worker may lock these tables in the other order
            try:
                self.sql("TRUNCATE linkhooks.clicks, linkhooks.conversions, linkhooks.deliveries, linkhooks.delivery_attempts, "
                         "linkhooks.dead_letters, "
                         "linkhooks.subscription_state, bench_plain_clicks, bench_outbox_clicks, bench_outbox, "
                         "bench_floor_deliveries, linkhooks.link_counts, linkhooks.link_hours, linkhooks.campaign_counts, "
                         "linkhooks.subscription_minutes, linkhooks.subscription_latencies, "
                         "linkhooks.subscription_latency_hours, linkhooks.milestones")
                # Each link's row, as its INSERT made it.
                self.sql("INSERT INTO linkhooks.link_counts (link_id, domain, slug, campaign) "
                         "SELECT id, domain, slug, campaign FROM linkhooks.links")
                return
            except psycopg.errors.DeadlockDetected:
                if attempt == 4:
                    raise

    def partitions_for_past_days(self, days):
        """Makes clicks' partitions for the last `days` days, so a bulk load of past clicks goes straight to
        them, as operations.md advises (not through clicks_default, from which maintenance would move them)."""
        self.sql("INSERT INTO linkhooks.clicks (link_id, clicked_at) SELECT 1, now() - g * interval '1 day' "
                 "FROM generate_series(0, %s) g", [days])
        self.sql("SELECT linkhooks.maintain_partitions('clicks', now(), '1 day', NULL)")

    def subscriptions(self, urls):
        """Exactly these subscriptions (every event, bots included); returns their ids."""
        self.sql("DELETE FROM linkhooks.subscriptions")
        return [self.one("INSERT INTO linkhooks.subscriptions (name, url, filters, event_types) "
                         "VALUES (%s, %s, '{\"exclude_bots\": false}', '{link.clicked,qr.scanned}') RETURNING id",
                         [f"s{i}", url]) for i, url in enumerate(urls)]

    def worker_in(self, database, workers=1):
        """Serves only this database (linkhooks.databases) with `workers` workers and waits until just they run:
        in 'bench'; none in 'idle', which has no extension."""
        self.cluster.set("linkhooks.workers_per_database", workers)
        self.cluster.set("linkhooks.databases", database)
        wanted = ["bench"] * workers if database == "bench" else []
        running = "SELECT datname FROM pg_stat_activity WHERE backend_type = 'pg_linkhooks'"
        wait_for(lambda: [r[0] for r in self.sql(running)] == wanted, timeout=30, message=f"the worker in {database}")

    def worker_pid(self):
        return self.one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_linkhooks'")

    def compare(self, case, script, baseline_script, baseline_name, target, clients=8, before_each=None, port=None,
                dbname="bench"):
        """Alternates baseline and case runs; records medians, min and max and the ratio per pair. The case
        runs in the database on `port` if given (the baseline always here)."""
        elsewhere = dict(port=port, dbname=dbname)
        self.pgbench(script, clients, seconds=1, **elsewhere)  # warm caches and plans
        self.pgbench(baseline_script, clients, seconds=1)
        ours, theirs, ratios = [], [], []

        def run(pgbench_script, **where):
            if before_each:
                before_each()
            self.sql("CHECKPOINT")
            return self.pgbench(pgbench_script, clients, **where)

        for _ in range(self.size["pairs"]):
            b = run(baseline_script)
            a = run(script, **elsewhere)
            ours.append(a), theirs.append(b), ratios.append(a / b)
        self.record(case, ours, "tps", baseline_name, theirs, ratios, target)

    def record(self, case, values, unit, baseline_name=None, baseline=None, ratios=None, target=None, note=""):
        row = {"case": case, "values": values, "unit": unit, "baseline_name": baseline_name, "baseline": baseline,
               "ratios": ratios, "target": target, "note": note}
        self.rows.append(row)
        print(format_row(row), flush=True)

    # ---- cases -----------------------------------------------------------------------------

    def resolve(self):
        links = self.size["links"]
        # Uniform: every session meets most links for the first time (its cache is cold).
        # Zipf: real traffic, where a few links get most clicks.
        for name, pick in [("uniform", f"\\set n random(1, {links})\n"),
                           ("Zipf s=1.1", f"\\set n random_zipfian(1, {links}, 1.1)\n")]:
            self.compare(f"`resolve(slug)` over {links:,} links, 8 clients, {name} traffic",
                         pick + "SELECT linkhooks.resolve('l' || :n);\n",
                         pick + "SELECT destination FROM linkhooks.links WHERE domain = '' AND slug = 'l' || :n;\n",
                         "bare SELECT by (domain, slug)", 0.9)

    def standby_resolve(self):
        """`resolve` on a streaming hot standby (pg_basebackup) against the same script on the primary; then
        how soon a link change reaches a standby session that has the link cached, against how soon the standby
        replays the change's commit (both read by one polling statement)."""
        links = self.size["links"]
        standby = Standby(self.cluster)
        standby.start()
        try:
            standby.caught_up(timeout=120)
            for name, pick in [("uniform", f"\\set n random(1, {links})\n"),
                               ("Zipf s=1.1", f"\\set n random_zipfian(1, {links}, 1.1)\n")]:
                script = pick + "SELECT linkhooks.resolve('l' || :n);\n"
                self.compare(f"`resolve(slug)` on a hot standby over {links:,} links, 8 clients, {name} traffic",
                             script, script, "the same on the primary", 0.9, port=standby.port)
            with standby.connect(dbname="bench") as reader:
                reader.execute("SELECT linkhooks.resolve('hot')")  # cached in this session from now on
                visible, replayed, stale = [], [], 0
                for i in range(self.size["visibility_changes"]):
                    url = f"https://acme.com/hot/{i}"
                    self.sql("UPDATE linkhooks.links SET destination = %s WHERE slug = 'hot'", [url])
                    committed = time.perf_counter()
                    lsn = self.one("SELECT pg_current_wal_insert_lsn()")
                    seen_at = replayed_at = None
                    while seen_at is None or replayed_at is None:
                        # One statement reads both, the replay position first.
                        done, answer = reader.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn, "
                                                      "linkhooks.resolve('hot')", [lsn]).fetchone()
                        now = time.perf_counter()
                        replayed_at = replayed_at or (now if done else None)
                        seen_at = seen_at or (now if answer == url else None)
                        stale += done and answer != url
                    visible.append((seen_at - committed) * 1000)
                    replayed.append((replayed_at - committed) * 1000)
            self.record("link change on the primary → `resolve` answers it in a standby session that cached the link",
                        [statistics.median(visible)], "ms", "the standby replayed its commit", [statistics.median(replayed)],
                        [statistics.median(visible) / statistics.median(replayed)], target=("≤", 1.1, "×"),
                        note=f"median of {len(visible)} changes; max {max(visible):.1f} vs {max(replayed):.1f} ms; "
                             f"{stale} answer(s) of the old link after its change was replayed")
        finally:
            standby.destroy()

    def router(self):
        """`record_click` through a PL/Proxy router (docs/scale-out.md) whose one shard is this database,
        against `record_click` on the shard itself: what the hop costs."""
        links = self.size["links"]
        self.subscriptions([self.nginx.url()])
        router = Router([("127.0.0.1", self.cluster.port, "bench")])
        router.start()
        try:
            click = (f"\\set n random(1, {links})\n"
                     "SELECT linkhooks.record_click('l' || :n, '203.0.113.1', '" + UA + "');\n")
            # Eight clients: throughput, with the router's backends on the shard's CPUs (one machine here);
            # one client: what the hop adds to each call.
            for clients in (8, 1):
                self.compare(f"`record_click`, 1 subscription, through a PL/Proxy router to its shard, {clients} "
                             f"client{'s' if clients > 1 else ''}", click, click, "`record_click` on the shard", None,
                             clients=clients, before_each=self.reset_clicks, port=router.port, dbname="router")
        finally:
            router.destroy()

    def click_inserts(self):
        links = self.size["links"]
        insert = (f"\\set n random(1, {links})\n"
                  "INSERT INTO {table} (link_id, ip, user_agent) VALUES (:n, '203.0.113.1', '" + UA + "');\n")
        ours = insert.replace("{table}", "linkhooks.clicks")
        plain = insert.replace("{table}", "bench_plain_clicks")
        outbox = insert.replace("{table}", "bench_outbox_clicks")
        for n, target in [(0, None), (1, 0.8), (4, 0.6)]:
            self.subscriptions([self.nginx.url()] * n)
            self.compare(f"click INSERT, {n} subscription{'s' if n != 1 else ''}", ours, plain,
                         "INSERT into the same table without triggers", target, before_each=self.reset_clicks)
        self.subscriptions([self.nginx.url()])
        # The floor of any outbox: one plain statement writes the click row and n delivery rows of the same
        # size into a copy of deliveries (same indexes), with the body and signature given as constants.
        # Against plain INSERT it bounds the ratio any click with n subscriptions can reach.
        self.floor_constants()
        for n in (1, 4):
            floor = insert.replace("{table}", "bench_plain_clicks").replace(
                "INSERT", "WITH c AS (INSERT").replace(");\n", ") RETURNING event_id) INSERT INTO bench_floor_deliveries "
                "(event_id, event_type, signed_at, subscription_id, body, signature) SELECT event_id, 'link.clicked', "
                f"extract(epoch FROM now())::bigint, s, bench_floor_body(), bench_floor_signature() "
                f"FROM c, generate_series(1, {n}) s;\n")
            self.compare(f"floor, {n} subscription{'s' if n != 1 else ''}: the click and {n} same-size delivery "
                         f"row{'s' if n != 1 else ''} written by one plain statement", floor, plain,
                         "INSERT into the same table without triggers", None, before_each=self.reset_clicks)
        self.compare("click INSERT, 1 subscription", ours, outbox, "PL/pgSQL + pgcrypto outbox trigger", 1.25,
                     before_each=self.reset_clicks)
        record = (f"\\set n random(1, {links})\n"
                  "SELECT linkhooks.record_click('l' || :n, '203.0.113.1', '" + UA + "');\n")
        self.compare("`record_click`, 1 subscription", record, plain, "INSERT into the same table without triggers",
                     None, before_each=self.reset_clicks)

    def hot_link(self):
        links = self.size["links"]
        self.subscriptions([self.nginx.url()])
        self.compare("`record_click` on one hot link, 8 clients",
                     "SELECT linkhooks.record_click('hot', '203.0.113.1', '" + UA + "');\n",
                     f"\\set n random(1, {links})\nSELECT linkhooks.record_click('l' || :n, '203.0.113.1', '" + UA + "');\n",
                     f"same load over {links:,} links", 0.8, before_each=self.reset_clicks)

    def bulk_ingest(self):
        """Issue 20: COPY of `bulk_copy` clicks over 1,000 links, and multi-row INSERTs of `bulk_rows` clicks each,
        with 0, 1 and 4 subscriptions, against the same statement into the table without triggers and against the floor: the
        clicks and their delivery rows (same size, given as constants) written by plain set-based statements."""
        n, per = self.size["bulk_copy"], self.size["bulk_rows"]
        links = min(1_000, self.size["links"])  # a day of one account's links, as issue 20 measured 0.4.0
        uas = [UA, BULK_UAS[0], BULK_UAS[1], BULK_UAS[2]]  # a day's mix: phones, desktops, a crawler
        rows = [(1 + (i * 7919) % links, f"203.0.{i % 250}.{i % 200 + 1}", uas[i % len(uas)],
                 "https://news.example/" if i % 3 else "", ("US", "DE", "FR", "")[i % 4]) for i in range(n)]
        csv = "".join(f"{r[0]},{r[1]},\"{r[2]}\",{r[3]},{r[4]}\n" for r in rows).encode()
        columns = "(link_id, ip, user_agent, referer, country)"
        values = [", ".join(sql.Literal(v).as_string(self.db) if v != "" else "NULL" for v in r) for r in rows[:per]]
        multirow = "VALUES (" + "), (".join(values) + ")"
        statements = max(1, n // per)

        deliveries = ("INSERT INTO bench_floor_deliveries (event_id, event_type, signed_at, subscription_id, body, signature) "
                      "SELECT event_id, 'link.clicked', extract(epoch FROM now())::bigint, s, bench_floor_body(), "
                      "bench_floor_signature() FROM {clicks}, generate_series(1, {subscriptions}) s")

        def copy(table, floor=0):
            """One COPY (and, for the floor, one INSERT … SELECT of the delivery rows), one transaction."""
            with self.db.transaction():
                with self.db.cursor().copy(f"COPY {table} {columns} FROM STDIN (FORMAT csv)") as c:
                    c.write(csv)
                if floor:
                    self.sql(deliveries.format(clicks=table, subscriptions=floor))
            return n

        def insert(table, floor=0):
            """`statements` multi-row INSERTs, each its own transaction, as a flushing redirect fleet sends them."""
            statement = f"INSERT INTO {table} {columns} {multirow}"
            if floor:
                statement = (f"WITH c AS ({statement} RETURNING event_id) "
                             + deliveries.format(clicks="c", subscriptions=floor))
            for _ in range(statements):
                self.sql(statement)
            return statements * per

        def rate(write, table, floor=0):
            self.reset_clicks()
            self.sql("CHECKPOINT")
            started = time.perf_counter()
            done = write(table, floor)
            return done / (time.perf_counter() - started)

        self.floor_constants()
        for write, name in [(copy, f"COPY of {n:,} clicks"),
                            (insert, f"{statements:,} INSERTs of {per:,} clicks (multi-row VALUES)")]:
            for subscriptions in (0, 1, 4):
                self.subscriptions([self.nginx.url()] * subscriptions)
                ours, plain, floor = [], [], []
                rate(write, "linkhooks.clicks")  # warm caches
                for _ in range(self.size["pairs"]):
                    plain.append(rate(write, "bench_plain_clicks"))
                    ours.append(rate(write, "linkhooks.clicks"))
                    if subscriptions:
                        floor.append(rate(write, "bench_plain_clicks", subscriptions))
                label = f"{name}, {subscriptions} subscription{'s' if subscriptions != 1 else ''}"
                target = 0.6 if subscriptions == 1 else None
                self.record(label, ours, "clicks/s", "the same into the table without triggers", plain,
                            [a / b for a, b in zip(ours, plain)], target)
                if subscriptions:
                    self.record(f"{label}, against the floor", ours, "clicks/s",
                                f"the floor: the same and {subscriptions} delivery row(s) each, set-based", floor,
                                [a / b for a, b in zip(ours, floor)], 0.9 if subscriptions == 1 else None)
        self.reset_clicks()

    def floor_constants(self):
        """bench_floor_body() and bench_floor_signature(): a real delivery's body and signature, as constants."""
        self.reset_clicks()
        self.subscriptions([self.nginx.url()])
        self.sql("INSERT INTO linkhooks.clicks (link_id, ip, user_agent) VALUES (1, '203.0.113.1', %s)", [UA])
        body, signature = self.db.execute("SELECT body, signature FROM linkhooks.deliveries").fetchone()
        for name, value in [("bench_floor_body", body), ("bench_floor_signature", signature)]:
            self.sql(sql.SQL("CREATE OR REPLACE FUNCTION {}() RETURNS text IMMUTABLE LANGUAGE sql AS {}").format(
                sql.Identifier(name), sql.Literal("SELECT " + sql.Literal(value).as_string(self.db))))
        self.reset_clicks()

    def queue_clicks(self, n):
        """n clicks in one statement, through the real trigger path."""
        self.sql("INSERT INTO linkhooks.clicks (link_id, user_agent) SELECT 1 + g %% %s, %s FROM generate_series(1, %s) g",
                 [self.size["links"], UA, n])

    def drain(self, subscription_id=None, timeout=600):
        """Waits until a subscription's (or every) delivery is delivered; returns deliveries per second
        from the first attempt to the last delivery."""
        where = "" if subscription_id is None else f" AND subscription_id = {int(subscription_id)}"
        # Cheap to poll (the partial due index), so the poll does not compete with the worker.
        wait_for(lambda: self.one("SELECT NOT EXISTS (SELECT 1 FROM linkhooks.deliveries "
                                  f"WHERE status IN ('pending', 'delivering'){where})"),
                 timeout=timeout, interval=0.2, message="the queue drained")
        n, seconds = self.db.execute(
            f"SELECT count(*), extract(epoch FROM max(delivered_at) - (SELECT min(started_at) FROM linkhooks.delivery_attempts"
            f"{' WHERE subscription_id = ' + str(int(subscription_id)) if subscription_id else ''}))"
            f" FROM linkhooks.deliveries WHERE status = 'delivered'{where}").fetchone()
        return n / float(seconds)

    def throughput(self):
        n = self.size["throughput"]
        rates = []
        for _ in range(self.size["drains"]):
            self.worker_in("idle")
            self.reset_clicks()
            self.subscriptions([self.nginx.url()])
            self.queue_clicks(n)
            self.worker_in("bench")
            rates.append(self.drain())
        self.record(f"delivery throughput, {n:,} queued events → nginx (keep-alive)", rates, "deliveries/s",
                    target=5000, note="pg_net: about 200/s")

    def two_workers(self):
        """Delivery throughput with linkhooks.workers_per_database = 2 against 1, drains alternated. Both
        share http_concurrency (32), so the second worker adds a process for claims, outcomes and HTTP, not
        threads."""
        n = self.size["throughput"]
        one, two = [], []
        for _ in range(self.size["drains"]):
            for workers, rates in ((1, one), (2, two)):
                self.worker_in("idle")
                self.reset_clicks()
                self.subscriptions([self.nginx.url()])
                self.queue_clicks(n)
                self.worker_in("bench", workers)
                rates.append(self.drain())
        self.worker_in("idle")
        self.record(f"delivery throughput with 2 workers, {n:,} queued events → nginx", two, "deliveries/s",
                    baseline_name="1 worker", baseline=one, ratios=[b / a for a, b in zip(one, two)],
                    note=f"{os.cpu_count()} CPUs")

    def latency(self):
        self.reset_clicks()
        self.worker_in("bench")
        self.subscriptions([self.nginx.url()])
        seconds = self.size["latency_seconds"]
        self.pgbench(f"\\set n random(1, {self.size['links']})\n"
                     "SELECT linkhooks.record_click('l' || :n, '203.0.113.1', '" + UA + "');\n",
                     clients=4, seconds=seconds, rate=200)
        self.drain()
        committed = dict(self.db.execute("SELECT event_id::text, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 "
                                         "FROM linkhooks.clicks").fetchall())
        arrived = self.nginx.arrivals()
        latencies = sorted((arrived[e] - t) * 1000 for e, t in committed.items() if e in arrived)
        assert len(latencies) == len(committed), "every click's webhook arrived"
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        case = f"end-to-end latency at 200 clicks/s ({len(latencies):,} clicks), commit → arrival at nginx"
        self.record(case, [p50], "ms p50", target=("≤", 10))
        self.record(case, [p99], "ms p99", target=("≤", 50), note=f"max {latencies[-1]:.1f} ms")

    def milestones(self):
        """Commit of the click that crosses a milestone → commit of its queued link.milestone, at 2,000 clicks/s
        over 20 links with a milestone every 25 clicks (the worker's aggregator runs about once a second)."""
        self.reset_clicks()
        self.worker_in("bench")
        self.subscriptions([])
        self.sql("INSERT INTO linkhooks.subscriptions (name, url, event_types) VALUES ('m', %s, '{link.milestone}')",
                 [self.nginx.url()])
        self.sql("INSERT INTO linkhooks.rules (kind, settings) VALUES ('milestones', %s)",
                 [Jsonb({"thresholds": list(range(25, 2501, 25))})])
        try:
            self.pgbench("\\set n random(1, 20)\n"
                         "SELECT linkhooks.record_click('l' || :n, '203.0.113.1', '" + UA + "');\n",
                         clients=8, seconds=self.size["milestone_seconds"], rate=2000)
            clicks = self.one("SELECT count(*) FROM linkhooks.clicks")
            # Everything committed is counted within a couple of runs.
            wait_for(lambda: self.one("SELECT coalesce(sum(clicks), 0) FROM linkhooks.link_counts") == clicks,
                     timeout=30, message="every click counted")
            # The crossing click of threshold t is the link's t-th click in commit order.
            latencies = sorted(r[0] for r in self.db.execute(
                "WITH c AS (SELECT link_id, pg_xact_commit_timestamp(xmin) AS at, "
                "                  row_number() OVER (PARTITION BY link_id ORDER BY pg_xact_commit_timestamp(xmin), id) AS n "
                "             FROM linkhooks.clicks) "
                "SELECT extract(epoch FROM pg_xact_commit_timestamp(d.xmin) - c.at)::float8 * 1000 "
                "  FROM linkhooks.milestones m JOIN c ON c.link_id = m.link_id AND c.n = m.threshold "
                "  JOIN linkhooks.deliveries d ON d.event_id = m.event_id "
                " WHERE m.scope = 'link' AND m.counted = 'humans'").fetchall())
        finally:
            self.sql("DELETE FROM linkhooks.rules")
        expected = self.one("SELECT coalesce(sum(least(human_clicks, 2500) / 25), 0) FROM linkhooks.link_counts")
        assert latencies and len(latencies) == expected, f"one link.milestone per threshold crossed ({len(latencies)} of {expected})"
        case = (f"commit of the crossing click → link.milestone queued, 2,000 clicks/s over 20 links "
                f"({len(latencies):,} milestones, {clicks:,} clicks)")
        self.record(case, [percentile(latencies, 0.5)], "ms p50")
        self.record(case, [percentile(latencies, 0.99)], "ms p99", target=("≤", 2000), note=f"max {latencies[-1]:.0f} ms")

    # The click views as 0.4.0 defined them, over every raw click: the baseline of `views`.
    RAW_VIEWS = {
        "link_stats": "SELECT link_id, count(*), count(*) FILTER (WHERE NOT is_bot), count(*) FILTER (WHERE is_bot), "
                      "count(*) FILTER (WHERE is_qr), min(clicked_at), max(clicked_at) FROM linkhooks.click_facts {where} "
                      "GROUP BY link_id",
        "link_daily_clicks": "SELECT link_id, clicked_at::date, count(*), count(*) FILTER (WHERE NOT is_bot), "
                             "count(*) FILTER (WHERE is_bot), count(*) FILTER (WHERE is_qr) FROM linkhooks.click_facts "
                             "{where} GROUP BY 1, 2",
    }

    def views(self):
        """The click views at size: `view_clicks` clicks over the links and the last 30 days and a conversion
        for every 33 clicks, already counted (as an install updated with that many is: the update counts
        them), plus 2,000 clicks and 60 conversions committed since the aggregator last ran, which the views
        add. Each query against the same answer computed from the raw clicks as 0.4.0's views did. Medians
        of 5."""
        self.subscriptions([])
        self.partitions_for_past_days(31)
        self.reset_clicks()
        n, links = self.size["view_clicks"], self.size["links"]
        self.sql("SET session_replication_role = replica")  # a bulk load: no events, no txid (counted below)
        self.sql("UPDATE linkhooks.links SET campaign = 'c' || (id %% 100)")  # 100 campaigns (undone below)
        self.sql("INSERT INTO linkhooks.clicks (event_id, link_id, clicked_at, user_agent, is_bot, source) "
                 "SELECT gen_random_uuid(), 1 + g %% %s, now() - (g %% 720) * interval '1 hour', 'x', g %% 3 = 0, "
                 "CASE WHEN g %% 10 = 0 THEN 'qr' ELSE 'link' END FROM generate_series(1, %s) g", [links, n])
        self.sql("INSERT INTO linkhooks.conversions (link_id, name) SELECT 1 + g %% %s, 'signup' "
                 "FROM generate_series(1, %s) g", [links, n // 33])
        self.sql("RESET session_replication_role")
        # What the update to 0.5.0 does with the clicks it finds (sql/pg_linkhooks--0.4.0--0.5.0.sql).
        self.sql("UPDATE linkhooks.link_counts SET campaign = 'c' || (link_id %% 100)")  # as links_counted would
        self.sql("UPDATE linkhooks.link_counts k SET clicks = c.n, human_clicks = c.humans, qr_scans = c.qr, "
                 "first_click_at = c.first_at, last_click_at = c.last_at "
                 "FROM (SELECT link_id, count(*) AS n, count(*) FILTER (WHERE is_bot IS NOT TRUE) AS humans, "
                 "count(*) FILTER (WHERE source = 'qr') AS qr, min(clicked_at) AS first_at, max(clicked_at) AS last_at "
                 "FROM linkhooks.clicks GROUP BY link_id) c WHERE c.link_id = k.link_id")
        self.sql("UPDATE linkhooks.link_counts k SET conversions = v.n "
                 "FROM (SELECT link_id, count(*) AS n FROM linkhooks.conversions GROUP BY 1) v WHERE v.link_id = k.link_id")
        self.sql("INSERT INTO linkhooks.link_hours (link_id, hour, clicks, human_clicks, qr_scans) "
                 "SELECT link_id, to_timestamp(floor(extract(epoch FROM clicked_at) / 3600) * 3600), count(*), "
                 "count(*) FILTER (WHERE is_bot IS NOT TRUE), count(*) FILTER (WHERE source = 'qr') "
                 "FROM linkhooks.clicks GROUP BY 1, 2")
        self.sql("VACUUM ANALYZE linkhooks.links, linkhooks.clicks, linkhooks.conversions, linkhooks.link_counts, "
                 "linkhooks.link_hours")
        holder = self.cluster.connect(dbname="bench")  # the aggregator's runs skip: these stay uncounted
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE linkhooks.click_cursor IN EXCLUSIVE MODE")
        try:
            self.sql("INSERT INTO linkhooks.clicks (link_id, user_agent, source) "
                     "SELECT 1 + g %% %s, %s, 'link' FROM generate_series(1, 2000) g", [links, UA])
            self.sql("INSERT INTO linkhooks.conversions (link_id, name) "
                     "SELECT 1 + g %% %s, 'signup' FROM generate_series(1, 60) g", [links])
            uncounted = self.one("SELECT count(*) FROM linkhooks.uncounted_clicks")
            queries = [
                ("link_stats, one link", "SELECT * FROM linkhooks.link_stats WHERE link_id = 7",
                 self.RAW_VIEWS["link_stats"].format(where="WHERE link_id = 7")),
                ("link_daily_clicks, one link", "SELECT * FROM linkhooks.link_daily_clicks WHERE link_id = 7",
                 self.RAW_VIEWS["link_daily_clicks"].format(where="WHERE link_id = 7")),
                (f"link_stats, top 10 of all {links:,} links", "SELECT * FROM linkhooks.link_stats ORDER BY clicks DESC LIMIT 10",
                 self.RAW_VIEWS["link_stats"].format(where="") + " ORDER BY 2 DESC LIMIT 10"),
                ("campaign_stats, 100 campaigns", "SELECT * FROM linkhooks.campaign_stats",
                 "SELECT l.campaign, count(*) FROM linkhooks.click_facts f JOIN linkhooks.links l ON l.id = f.link_id "
                 "GROUP BY 1"),
            ]

            def ms(query):
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    self.db.execute(query).fetchall()
                    times.append((time.perf_counter() - start) * 1000)
                return statistics.median(times)

            for name, ours, raw in queries:
                ours_ms, raw_ms = ms(ours), ms(raw)
                self.record(f"{name} at {n:,} clicks ({uncounted:,} not counted yet)", [ours_ms], "ms",
                            "raw clicks, as 0.4.0", [raw_ms], target=("≤", 50))
        finally:
            holder.close()
            self.sql("SET session_replication_role = replica")
            self.sql("UPDATE linkhooks.links SET campaign = NULL")
            self.sql("RESET session_replication_role")
            self.sql("UPDATE linkhooks.link_counts SET campaign = NULL")

    # 0.4.0's subscription_health: a day of the delivery log and the attempts, sorted for percentiles.
    RAW_HEALTH = """
        SELECT d.subscription_id, count(*) FILTER (WHERE d.delivered_at >= now() - interval '1 hour'), count(*),
               percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM d.delivered_at - d.created_at))
                   FILTER (WHERE d.delivered_at >= now() - interval '1 hour'),
               percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM d.delivered_at - d.created_at)),
               (SELECT count(*) FROM linkhooks.delivery_attempts a
                 WHERE a.subscription_id = d.subscription_id AND a.started_at >= now() - interval '24 hours'
                   AND a.status_code BETWEEN 200 AND 299)
          FROM linkhooks.deliveries d
         WHERE d.status = 'delivered' AND d.delivered_at >= now() - interval '24 hours'
         GROUP BY d.subscription_id"""

    def health_view(self):
        """subscription_health with `view_deliveries` deliveries (and as many attempts) over the last day for 10
        subscriptions: the view (per-minute rollups) against 0.4.0's query over the log. Medians of 5 (the raw
        query: of 3)."""
        self.worker_in("idle")
        self.reset_clicks()
        n = self.size["view_deliveries"]
        subs = self.subscriptions([self.nginx.url()] * 10)
        # Delivered over the last 24 hours, 0-49 ms after creation; one attempt each, 1 in 20 answered 500.
        self.sql("INSERT INTO linkhooks.deliveries (event_id, subscription_id, event_type, body, signed_at, signature, "
                 "status, attempts, created_at, delivered_at, next_attempt_at) "
                 "SELECT linkhooks.uuidv7(), %s + g %% 10, 'link.clicked', '{}', 0, '', 'delivered', 1, "
                 "t - (g %% 50) * interval '1 millisecond', t, t "
                 "FROM generate_series(1, %s) g, LATERAL (SELECT now() - (g %% 86400) * interval '1 second' AS t) x",
                 [min(subs), n])
        self.sql("INSERT INTO linkhooks.delivery_attempts (delivery_id, attempt, started_at, duration_ms, status_code, "
                 "subscription_id, latency_ms) SELECT id, 1, delivered_at, 1, CASE WHEN id %% 20 = 0 THEN 500 ELSE 200 END, "
                 "subscription_id, CASE WHEN id %% 20 <> 0 THEN date_part('epoch', delivered_at - created_at) * 1000 END "
                 "FROM linkhooks.deliveries")
        # Folded into subscription_minutes, as the worker does about once a second (src/worker/record.rs).
        self.sql("INSERT INTO linkhooks.subscription_minutes (subscription_id, minute, attempts, succeeded) "
                 "SELECT subscription_id, date_trunc('minute', started_at, 'UTC'), count(*), "
                 "count(*) FILTER (WHERE status_code BETWEEN 200 AND 299) FROM linkhooks.delivery_attempts GROUP BY 1, 2")
        self.sql("INSERT INTO linkhooks.attempt_cursor (counted_id) SELECT max(id) FROM linkhooks.delivery_attempts "
                 "ON CONFLICT (single) DO UPDATE SET counted_id = excluded.counted_id")
        # And the deliveries by latency, per minute and per hour, as the same fold does.
        self.sql("""INSERT INTO linkhooks.subscription_latencies (subscription_id, minute, bucket, deliveries)
                    SELECT subscription_id, date_trunc('minute', started_at, 'UTC'), linkhooks.latency_bucket(latency_ms),
                           count(*) FROM linkhooks.delivery_attempts WHERE latency_ms IS NOT NULL GROUP BY 1, 2, 3""")
        self.sql("""INSERT INTO linkhooks.subscription_latency_hours (subscription_id, hour, bucket, deliveries)
                    SELECT subscription_id, date_trunc('hour', minute, 'UTC'), bucket, sum(deliveries)
                    FROM linkhooks.subscription_latencies GROUP BY 1, 2, 3""")
        self.sql("VACUUM ANALYZE linkhooks.deliveries, linkhooks.delivery_attempts, linkhooks.subscription_minutes, "
                 "linkhooks.subscription_latencies, linkhooks.subscription_latency_hours")

        def ms(query, runs):
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                self.db.execute(query).fetchall()
                times.append((time.perf_counter() - start) * 1000)
            return statistics.median(times)

        ours, raw = ms("SELECT * FROM linkhooks.subscription_health", 5), ms(self.RAW_HEALTH, 3)
        self.record(f"subscription_health, 10 subscriptions, {n:,} deliveries and attempts in the last day", [ours],
                    "ms", "the log, as 0.4.0", [raw], target=("≤", 50))
        self.reset_clicks()
        self.subscriptions([])

    def held_snapshot(self):
        """Five rounds of `held_events` click events queued and drained to nginx, while another session holds
        a REPEATABLE READ snapshot taken before the first (an analyst's long report) and while none does: the
        last round's delivery rate and the size of the queue's tables after the five, held against not held."""
        n = self.size["held_events"]
        last_rate, size = {}, {}
        # The poll reads the index's newest entry: planned from a just-truncated table's statistics,
        # max(id) became a sequential scan (23 ms a poll by the fifth round, beside the worker).
        poll = self.cluster.connect(dbname="bench")
        poll.execute("SET enable_seqscan = off")

        def newest_attempt():
            return poll.execute("SELECT coalesce(max(id), 0) FROM linkhooks.delivery_attempts").fetchone()[0]

        for held in (False, True):
            self.worker_in("idle")
            self.reset_clicks()
            self.subscriptions([self.nginx.url()])
            self.sql("VACUUM linkhooks.deliveries, linkhooks.delivery_attempts")
            self.worker_in("bench")
            holder = None
            if held:
                holder = self.cluster.connect(dbname="bench")
                holder.autocommit = False
                holder.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                holder.execute("SELECT count(*) FROM linkhooks.deliveries")  # the snapshot is taken here
            try:
                for _ in range(5):
                    # nginx answers 200: each delivery is one attempt. The poll reads the newest end of the
                    # attempt log, which the held snapshot does not bloat, so it measures the worker and
                    # does not walk the queue's dead index entries itself.
                    last = self.one("SELECT coalesce(pg_sequence_last_value("
                                    "pg_get_serial_sequence('linkhooks.delivery_attempts', 'id')), 0)")
                    self.queue_clicks(n)  # committed: the worker is woken and delivers
                    started = time.monotonic()
                    wait_for(lambda: newest_attempt() >= last + n, timeout=600, interval=0.05,
                             message="the round delivered")
                    last_rate[held] = n / (time.monotonic() - started)
                    assert self.one("SELECT NOT EXISTS (SELECT 1 FROM linkhooks.deliveries "
                                    "WHERE status IN ('pending', 'delivering'))"), "the round drained"
                # Partitioned tables have no storage of their own: sum their partitions'.
                size[held] = self.one("SELECT sum(pg_total_relation_size(relid))::bigint FROM (SELECT relid FROM "
                                      "pg_partition_tree('linkhooks.deliveries') UNION ALL SELECT relid FROM "
                                      "pg_partition_tree('linkhooks.delivery_attempts')) t") / 2**20
            finally:
                if holder is not None:
                    holder.close()
        poll.close()
        case = f"five rounds of {n:,} events → nginx, a REPEATABLE READ snapshot held from the start"
        self.record(f"{case}: last round's rate", [last_rate[True]], "deliveries/s", "no snapshot held",
                    [last_rate[False]], [last_rate[True] / last_rate[False]], target=0.9)
        self.record(f"{case}: deliveries + attempts size", [size[True] / size[False]], "× the size without",
                    target=("≤", 1.5, "×"), note=f"{size[True]:.0f} MB against {size[False]:.0f} MB")

    def retention(self):
        """Retention drops a day of clicks, or of deliveries, as one partition: the time a `maintain_partitions`
        run takes to drop a day of `retention[0]` rows and a day of `retention[1]` (and make the next day ahead, as
        each daily run does), and a DELETE of the small day's rows (how 0.4.0 pruned them). Each day of deliveries
        holds 100 pending rows that retention keeps. Days long past, so the worker's real-time maintenance leaves
        them alone."""
        small, large = self.size["retention"]
        self.worker_in("idle")
        self.reset_clicks()
        self.subscriptions([])
        rows = {
            "clicks": ("clicked_at", "INSERT INTO linkhooks.clicks (event_id, link_id, clicked_at, user_agent, is_bot, source) "
                                     "SELECT gen_random_uuid(), 1 + g %% 1000, %(day)s::timestamptz + (g %% 86400) * interval '1 second', "
                                     "'x', false, 'link' FROM generate_series(%(first)s::int, %(last)s::int) g"),
            "deliveries": ("created_at", "INSERT INTO linkhooks.deliveries (event_id, subscription_id, event_type, body, signed_at, "
                                         "signature, status, created_at, next_attempt_at, delivered_at) "
                                         "SELECT gen_random_uuid(), 1, 'link.clicked', '{}', 0, 's', "
                                         "CASE WHEN g <= 100 THEN 'pending' ELSE 'delivered' END, t, t, "
                                         "CASE WHEN g > 100 THEN t END "
                                         "FROM generate_series(%(first)s::int, %(last)s::int) g, LATERAL (SELECT %(day)s::timestamptz "
                                         "+ (g %% 86400) * interval '1 second' AS t) x"),
        }
        deletes = {
            "clicks": "DELETE FROM linkhooks.clicks WHERE clicked_at >= %s::timestamptz AND clicked_at < %s::timestamptz "
                      "+ interval '1 day'",
            "deliveries": "DELETE FROM linkhooks.deliveries WHERE status = 'delivered' AND delivered_at >= %s::timestamptz "
                          "AND delivered_at < %s::timestamptz + interval '1 day'",
        }

        def day_of(table, n, day):
            key, insert = rows[table]
            # Partitions left from earlier days go first, so each drop below drops exactly one day.
            self.sql("SELECT linkhooks.maintain_partitions(%s, %s::timestamptz, '1 day', '0')", [table, day])
            # One row makes the day's partition; the rest go straight into it, as a bulk load (no events).
            self.sql("SET session_replication_role = replica")
            self.sql(insert, {"day": day, "first": 1, "last": 1})
            # (Keeping rows from `day` on: the pending deliveries retention kept from earlier days get no partition.)
            self.sql("SELECT linkhooks.maintain_partitions(%s, %s::timestamptz, '1 day', '0')", [table, day])
            self.sql(insert, {"day": day, "first": 2, "last": n})
            self.sql("RESET session_replication_role")
            # What autovacuum would do after such a load, done first: a partition it is vacuuming keeps the
            # drop (which waits at most 100 ms for its lock) for the next run.
            self.sql(f"VACUUM ANALYZE linkhooks.{table}")
            self.sql("CHECKPOINT")
            assert self.one(f"SELECT count(*) FROM linkhooks.{table} WHERE {key} >= %s::timestamptz "
                            f"AND {key} < %s::timestamptz + interval '1 day'", [day, day]) == n
            assert self.one(f"SELECT array_agg(DISTINCT tableoid::regclass::text) FROM linkhooks.{table} WHERE {key} >= "
                            f"%s::timestamptz AND {key} < %s::timestamptz + interval '1 day'", [day, day]) \
                == [f"linkhooks.{table}_p{day.replace('-', '')}_000000"], "the day is one partition"

        def drop(table, day):
            """The run that detaches the day's partition (inserts into the table wait for it: it holds their
            lock until it commits), timed three times in a transaction rolled back and then for real (one
            sample of a step of a few ms scatters more than the target's margin); then the next run, which
            removes the detached table's files. Returns (the four detaching times, the last the real one;
            the removing time)."""
            run = "SELECT linkhooks.maintain_partitions(%s, %s::timestamptz + interval '25 hours', '1 day', '1 hour')"

            def timed(expect, rolled_back):
                started = time.perf_counter()
                with self.db.transaction(force_rollback=rolled_back):
                    done = self.one(run, [table, day])
                elapsed = (time.perf_counter() - started) * 1000
                assert done[expect] == 1, done
                if table == "deliveries" and expect == "partitions_dropped":
                    assert done["rows_kept"] == 100, done
                return elapsed

            detaching = [timed("partitions_dropped", True) for _ in range(3)] + [timed("partitions_dropped", False)]
            return detaching, timed("expired_removed", False)

        for table in ("clicks", "deliveries"):
            small_ms, delete_ms = [], []
            for i in range(self.size["drains"]):
                day = f"2020-01-{1 + 2 * i:02d}"
                day_of(table, small, day)
                started = time.perf_counter()
                self.sql(deletes[table], [day, day])
                delete_ms.append((time.perf_counter() - started) * 1000)
                self.sql(f"TRUNCATE linkhooks.{table}")  # and again, now that the DELETE emptied it
                day_of(table, small, day)
                small_ms.append(drop(table, day))
            day_of(table, large, "2020-02-01")
            large_detach, large_remove = drop(table, "2020-02-01")
            small_detach = [t for detaching, _ in small_ms for t in detaching]
            small_remove = [remove for _, remove in small_ms]
            self.record(f"retention: detaching a day of {large:,} {table} (what holds {table}' lock)", large_detach, "ms",
                        f"a day of {small:,}", small_detach,
                        [statistics.median(large_detach) / statistics.median(small_detach)], target=("≤", 2, "×"),
                        note=f"committed: {large_detach[-1]:,.1f} ms against {statistics.median(small_detach[3::4]):,.1f}; "
                             f"DELETE of the {small:,}-row day: {statistics.median(delete_ms):,.0f} ms")
            self.record(f"retention: the next run, removing the detached day's files ({large:,} {table})", [large_remove],
                        "ms", f"a day of {small:,}", small_remove, [large_remove / statistics.median(small_remove)],
                        note=f"holds no lock on {table}: in proportion to the bytes the kernel frees")

    def isolation(self, slow):
        n = self.size["isolation"]
        alone, beside, ratios = [], [], []
        for _ in range(self.size["drains"]):
            for with_slow in (False, True):
                self.worker_in("idle")
                self.reset_clicks()
                ids = self.subscriptions([self.nginx.url()] + ([slow.url()] if with_slow else []))
                self.queue_clicks(n)
                self.worker_in("bench")
                rate = self.drain(subscription_id=ids[0])
                (beside if with_slow else alone).append(rate)
            ratios.append(beside[-1] / alone[-1])
        self.worker_in("idle")  # leave the slow endpoint's backlog behind
        self.record(f"fast endpoint beside one answering after {slow.delay:g} s ({n:,} events each)", beside, "deliveries/s",
                    "the fast endpoint alone", alone, ratios, 0.9)

    def backlog(self):
        small, large = self.size["backlog_small"], self.size["backlog_large"]

        def queue(n):
            self.worker_in("idle")
            self.reset_clicks()
            [sub] = self.subscriptions([self.nginx.url()])
            # A real signed body once, then copies (the worker signs each attempt with the row's own event id),
            # due one after another as events arriving at 1,000/s would be, with time-ordered event ids as the
            # triggers make them.
            self.queue_clicks(1)
            body = self.one("SELECT body FROM linkhooks.deliveries LIMIT 1")
            self.sql("INSERT INTO linkhooks.deliveries (event_id, subscription_id, event_type, body, signed_at, signature, next_attempt_at) "
                     "SELECT linkhooks.uuidv7(), %s, 'link.clicked', %s, 0, '', now() - (%s - g) * interval '1 millisecond' "
                     "FROM generate_series(2, %s) g", [sub, body, n, n])
            self.sql("VACUUM ANALYZE linkhooks.deliveries")

        small_rates = []
        for _ in range(self.size["drains"]):
            queue(small)
            self.worker_in("bench")
            small_rates.append(self.drain())
        queue(large)
        self.worker_in("bench")
        pid = self.worker_pid()
        rss, stop = [], threading.Event()

        def sample():
            while not stop.is_set():
                rss.append(rss_kib(pid))
                stop.wait(1.0)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            large_rate = self.drain(timeout=3600)
        finally:
            stop.set()
            sampler.join()
        rss = [r for r in rss if r]
        self.record(f"draining {large:,} pending deliveries", [large_rate], "deliveries/s", f"draining {small:,}",
                    small_rates, [large_rate / statistics.median(small_rates)], 0.8)
        private = [r[0] / 1024 for r in rss]
        self.record(f"worker private memory (RssAnon) at the end of draining {large:,}", [private[-1]], "MiB",
                    note=f"first sample {private[0]:.1f} MiB, after 10 s {private[min(10, len(private) - 1)]:.1f} MiB, "
                         f"max {max(private):.1f} MiB over {len(rss)} samples (1/s); "
                         f"shared buffers touched: {rss[-1][1] / 1024:.0f} MiB")
        self.worker_in("idle")

    def callgrind(self):
        """Instructions per click (valgrind callgrind on a single-user backend): stable on noisy machines."""
        if not shutil.which("valgrind"):
            self.record("instructions per click", [], "Ir", note="valgrind not installed: skipped")
            return
        few, many = self.size["callgrind"]
        self.subscriptions([self.nginx.url()])
        self.reset_clicks()
        self.cluster.stop()
        try:
            statements = {
                "bare SELECT by (domain, slug)": "SELECT destination FROM linkhooks.links WHERE domain = '' AND slug = 'l{i}';",
                "resolve(slug)": "SELECT linkhooks.resolve('l{i}');",
                "INSERT into a table without triggers": "INSERT INTO bench_plain_clicks (link_id, ip, user_agent) "
                                                        "VALUES ({i}, '203.0.113.1', '" + UA + "');",
                "click INSERT, 1 subscription": "INSERT INTO linkhooks.clicks (link_id, ip, user_agent) "
                                                "VALUES ({i}, '203.0.113.1', '" + UA + "');",
                "record_click, 1 subscription": "SELECT linkhooks.record_click('l{i}', '203.0.113.1', '" + UA + "');",
                "PL/pgSQL + pgcrypto outbox, 1 subscription": "INSERT INTO bench_outbox_clicks (link_id, ip, user_agent) "
                                                              "VALUES ({i}, '203.0.113.1', '" + UA + "');",
            }
            if self.size is SMOKE:  # two variants are enough to keep the machinery from rotting
                statements = {k: statements[k] for k in ("INSERT into a table without triggers", "click INSERT, 1 subscription")}
            per_call = {}
            for name, statement in statements.items():
                counts = [self._instructions(statement, n) for n in (few, many)]
                per_call[name] = (counts[1] - counts[0]) / (many - few)
            base = per_call["INSERT into a table without triggers"]
            for name, ir in per_call.items():
                self.record(f"instructions per call: {name}", [ir], "Ir", note=f"{ir / base:.2f}× a plain INSERT")
        finally:
            self.cluster.start()
            self.db = self.cluster.connect(dbname="bench")

    def _instructions(self, statement, n):
        script = os.path.join(self.workdir, f"single-{n}.sql")
        with open(script, "w") as f:
            f.write("\n".join(statement.format(i=1 + i % self.size["links"]) for i in range(n)) + "\n")
        out = os.path.join(self.workdir, f"callgrind-{n}.out")
        with open(script) as stdin:
            run = subprocess.run(["runuser", "-u", "postgres", "--", "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                                  f"{BIN}/postgres", "--single", "-D", self.cluster.dir, "bench"],
                                 stdin=stdin, capture_output=True, text=True, cwd=self.workdir)
        collected = re.search(r"Collected : (\d+)", run.stderr)
        if not collected:
            raise RuntimeError(f"callgrind failed: {run.stderr[-2000:]}")
        return int(collected.group(1))

    def close(self):
        self.nginx.stop()
        self.db.close()
        self.cluster.destroy()


def rss_kib(pid):
    """(private, shared) resident KiB of a process. Shared pages are the shared_buffers it has
    touched, which grow to shared_buffers on any large scan; private memory is what could leak."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        return tuple(int(re.search(rf"{field}:\s+(\d+)", status).group(1)) for field in ("RssAnon", "RssShmem"))
    except (OSError, AttributeError):
        return None


def percentile(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))]


def spread(values, fmt):
    if not values:
        return "—"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(values))}–{fmt(max(values))})"


def meets(row):
    target = row["target"]
    if target is None:
        return ""
    if isinstance(target, tuple):  # an upper bound, on the ratio if there is one
        return "yes" if statistics.median(row["ratios"] or row["values"]) <= target[1] else "NO"
    value = statistics.median(row["ratios"]) if row["ratios"] else statistics.median(row["values"])
    return "yes" if value >= target else "NO"


def format_row(row):
    number = lambda v: f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"  # noqa: E731
    ratio = lambda v: f"{v:.2f}×"  # noqa: E731
    target = row["target"]
    target_text = "" if target is None else (f"{target[0]} {target[1]}{target[2] if len(target) > 2 else ' ms'}"
                                             if isinstance(target, tuple)
                                             else (f"≥ {target}×" if row["ratios"] else f"≥ {target:,}"))
    return (f"| {row['case']} | {spread(row['values'], number)} {row['unit']} | "
            f"{(row['baseline_name'] + ': ' + spread(row['baseline'], number)) if row['baseline'] else ''} | "
            f"{spread(row['ratios'], ratio) if row['ratios'] else ''} | {target_text} | {meets(row)} | {row['note']} |")


CASES = ["resolve", "standby_resolve", "router", "click_inserts", "hot_link", "bulk_ingest", "throughput", "two_workers", "latency", "milestones", "isolation", "backlog", "views",
         "health_view", "held_snapshot", "retention", "callgrind"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every case, tiny: seconds, not minutes")
    parser.add_argument("--only", help="comma-separated cases: " + ", ".join(CASES))
    parser.add_argument("--synchronous-commit", choices=["off", "on"], default="off",
                        help="the cluster's durability: off (CPU cost, the default here) or on (PostgreSQL's default)")
    args = parser.parse_args()
    SETTINGS["synchronous_commit"] = args.synchronous_commit
    size = SMOKE if args.smoke else FULL
    cases = args.only.split(",") if args.only else CASES
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="linkhooks-bench-")
    shutil.chown(workdir, "postgres", "postgres")  # single-user runs under callgrind write here
    bench = Bench(size, workdir)
    slow = SlowReceiver(2.0 if not args.smoke else 0.2)
    print(f"pg_linkhooks benchmark suite ({'smoke' if args.smoke else 'full'}): medians (min–max) of "
          f"{size['pairs']} pair(s) of {size['seconds']} s pgbench runs and of {size['drains']} drain(s); "
          f"{os.cpu_count()} CPUs; synchronous_commit = {args.synchronous_commit}\n")
    print("| case | result | baseline (same run) | ratio | target | met | notes |")
    print("|---|---|---|---|---|---|---|")
    try:
        for case in cases:
            getattr(bench, case)(*([slow] if case == "isolation" else []))
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nsuite time: {time.monotonic() - started:.0f} s")
    missed = [r["case"] for r in bench.rows if meets(r) == "NO"]
    if missed:
        print("targets missed: " + "; ".join(missed))


if __name__ == "__main__":
    main()
