"""The analyst and operator surface: delivery log, subscription health, click
analytics and worker status, each with real clicks and real deliveries (issue 5)."""

import threading
from decimal import Decimal

from conftest import subscribe
from harness import wait_for
from test_links import IPHONE, link

CHROME_MAC = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/120.0.0.0 Safari/537.36")
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"

# Held in an open transaction, the aggregator's run lock (src/aggregator/mod.rs): its runs skip meanwhile.
HOLD_AGGREGATOR = "LOCK TABLE linkhooks.click_cursor IN EXCLUSIVE MODE"


def rows(db, sql, params=()):
    cur = db.execute(sql, params)
    names = [c.name for c in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def settled(db):
    """True once nothing is pending or being delivered."""
    return db.execute("SELECT count(*) = 0 FROM linkhooks.deliveries WHERE status IN ('pending', 'delivering')").fetchone()[0]


def test_delivery_log_shows_delivered_and_dead_deliveries(db, receiver):
    ok_id, _ = subscribe(db, receiver, "/ok", event_types=["link.created"])
    bad_id, _ = subscribe(db, receiver, "/bad", event_types=["link.created"], max_attempts=2)
    receiver.expect("/bad", receiver.paths["/bad"]["secrets"], script=[(500, {}, 0), (502, {}, 0)])
    link(db, "logged")
    wait_for(lambda: settled(db), message="both deliveries finished")
    log = {r["subscription_name"]: r for r in rows(db, "SELECT * FROM linkhooks.delivery_log")}
    ok, bad = log["ok"], log["bad"]
    assert (ok["subscription_id"], ok["event_type"], ok["status"], ok["attempts"], ok["last_status_code"]) == \
        (ok_id, "link.created", "delivered", 1, 200)
    assert ok["last_error"] is None and ok["delivered_at"] >= ok["created_at"]
    assert abs(ok["latency"].total_seconds() * 1000 - float(ok["latency_ms"])) < 0.1
    assert (bad["subscription_id"], bad["status"], bad["attempts"], bad["last_status_code"]) == (bad_id, "dead", 2, 502)
    assert bad["delivered_at"] is None and bad["latency_ms"] is None and "502" in bad["last_error"]
    assert ok["event_id"] == bad["event_id"], "one event, one row per subscription"


def test_subscription_health_counts_each_outcome(db, receiver):
    healthy, _ = subscribe(db, receiver, "/healthy")
    flaky, _ = subscribe(db, receiver, "/flaky", max_attempts=2)
    # flaky: event 1 fails twice (dead letter), event 2 fails once then succeeds, events 3-4 fail and stay queued.
    receiver.expect("/flaky", receiver.paths["/flaky"]["secrets"], script=[(500, {}, 0), (500, {}, 0), (503, {}, 0)])
    link(db, "h1")
    wait_for(lambda: db.execute("SELECT count(*) FROM linkhooks.dead_letters").fetchone()[0] == 1, message="dead letter")
    link(db, "h2")
    wait_for(lambda: settled(db), message="h2 delivered to both")
    # The worker writes each subscription's last success and failure at most once a second.
    wait_for(lambda: db.execute("SELECT bool_and(last_success_at IS NOT NULL) FROM linkhooks.subscription_health").fetchone()[0]
             and db.execute("SELECT bool_and(consecutive_failures = 0) FROM linkhooks.subscription_health").fetchone()[0],
             message="every subscription's last success written")
    health = {(r["name"], r["period"]): r for r in rows(db, "SELECT * FROM linkhooks.subscription_health")}
    assert set(health) == {("healthy", "1h"), ("healthy", "24h"), ("flaky", "1h"), ("flaky", "24h")}
    for period in ("1h", "24h"):
        h, f = health[("healthy", period)], health[("flaky", period)]
        assert (h["subscription_id"], h["delivered"], h["failed_attempts"], h["dead_letters"], h["success_rate"]) == \
            (healthy, 2, 0, 0, 1)
        assert (f["subscription_id"], f["delivered"], f["failed_attempts"], f["dead_letters"]) == (flaky, 1, 3, 1)
        assert float(f["success_rate"]) == 0.25, "1 of 4 attempts succeeded"
        for p in ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms"):
            assert h[p] is not None and float(h[p]) >= 0
        assert h["latency_p50_ms"] <= h["latency_p95_ms"] <= h["latency_p99_ms"]
        assert (f["pending"], f["oldest_pending_age"], f["enabled"], f["disabled_reason"]) == (0, None, True, None)
        assert f["consecutive_failures"] == 0, "the last attempt succeeded"
        assert f["last_failure_at"] < f["last_success_at"]

    # Now the receiver answers 500 to everything for a while: failures in a row and a backlog.
    receiver.expect("/flaky", receiver.paths["/flaky"]["secrets"], script=[(500, {}, 0)] * 100)
    db.execute("UPDATE linkhooks.subscriptions SET max_attempts = 50 WHERE id = %s", [flaky])
    link(db, "h3")
    wait_for(lambda: rows(db, "SELECT consecutive_failures FROM linkhooks.subscription_health WHERE name = 'flaky' "
                              "AND period = '1h'")[0]["consecutive_failures"] >= 2, message="failures in a row")
    f = rows(db, "SELECT * FROM linkhooks.subscription_health WHERE name = 'flaky' AND period = '1h'")[0]
    assert f["pending"] == 1 and f["oldest_pending_age"].total_seconds() >= 0
    assert f["last_failure_at"] > f["last_success_at"]


def test_subscription_health_rollups_match_the_delivery_log(db, receiver):
    """The view reads per-minute rollups kept as outcomes are recorded; they agree with the raw log: counts
    exactly, latency percentiles within their bucket (5%) of the log's own."""
    steady, _ = subscribe(db, receiver, "/steady")
    shaky, _ = subscribe(db, receiver, "/shaky", max_attempts=2)
    receiver.expect("/shaky", receiver.paths["/shaky"]["secrets"], script=[(500, {}, 0), (200, {}, 0.02)] * 5)
    for i in range(30):
        link(db, f"r{i}")
    wait_for(lambda: settled(db), message="every event delivered or dead")
    raw = {r["subscription_id"]: r for r in rows(db, """
        SELECT d.subscription_id, count(*) FILTER (WHERE d.status = 'delivered') AS delivered,
               (SELECT count(*) FROM linkhooks.delivery_attempts a WHERE a.subscription_id = d.subscription_id) AS attempts,
               (SELECT count(*) FROM linkhooks.delivery_attempts a WHERE a.subscription_id = d.subscription_id
                   AND a.status_code BETWEEN 200 AND 299) AS succeeded,
               percentile_disc(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY l.latency_ms)
                   FILTER (WHERE d.status = 'delivered') AS latency
          FROM linkhooks.deliveries d JOIN linkhooks.delivery_log l ON l.delivery_id = d.id
         GROUP BY d.subscription_id""")}
    assert raw[shaky]["attempts"] > raw[shaky]["succeeded"] > 0, "the shaky endpoint failed some attempts"
    for period in ("1h", "24h"):
        for sub in (steady, shaky):
            h = rows(db, "SELECT * FROM linkhooks.subscription_health WHERE subscription_id = %s AND period = %s",
                     [sub, period])[0]
            r = raw[sub]
            assert (h["delivered"], h["failed_attempts"]) == (r["delivered"], r["attempts"] - r["succeeded"])
            assert float(h["success_rate"]) == round(r["succeeded"] / r["attempts"], 4)
            for got, want in zip([h["latency_p50_ms"], h["latency_p95_ms"], h["latency_p99_ms"]], r["latency"]):
                assert abs(float(got) - float(want)) <= 0.05 * float(want) + 0.1, (period, sub, got, want)  # both rounded to 0.1 ms
    # The worker's fold writes each delivery once by the minute and once by the hour.
    wait_for(lambda: db.execute("SELECT (SELECT sum(deliveries) FROM linkhooks.subscription_latencies), "
                                "(SELECT sum(deliveries) FROM linkhooks.subscription_latency_hours)").fetchone()
             == (raw[steady]["delivered"] + raw[shaky]["delivered"],) * 2, message="every delivery folded in, by minute and hour")


def test_subscription_health_reads_whole_hours_by_the_hour_and_the_rest_by_the_minute(db, receiver):
    """A day of latency rollups, uneven from minute to minute, written as the fold writes them (by minute and
    by hour): each period's deliveries and percentiles are those of exactly its minutes, whatever the time."""
    sub_id, _ = subscribe(db, receiver, "/rolled", event_types=["link.created"])
    db.execute("""INSERT INTO linkhooks.subscription_latencies (subscription_id, minute, bucket, deliveries)
                  SELECT %s, date_trunc('minute', now(), 'UTC') - m * interval '1 minute', 20 + (m * 7 + b) %% 60,
                         1 + (m * 13 + b) %% 11
                  FROM generate_series(0, 25 * 60) m, generate_series(0, 3) b
                  ON CONFLICT DO NOTHING""", [sub_id])
    db.execute("""INSERT INTO linkhooks.subscription_latency_hours (subscription_id, hour, bucket, deliveries)
                  SELECT subscription_id, date_trunc('hour', minute, 'UTC'), bucket, sum(deliveries)
                  FROM linkhooks.subscription_latencies GROUP BY 1, 2, 3""")
    with db.transaction():  # one now() for the view and the expected counts
        for period, minutes in (("1h", 60), ("24h", 1440)):
            buckets = dict(db.execute("""SELECT bucket, sum(deliveries) FROM linkhooks.subscription_latencies
                                          WHERE minute > date_trunc('minute', now(), 'UTC') - %s * interval '1 minute'
                                          GROUP BY bucket""", [minutes]).fetchall())
            total, below, want = sum(buckets.values()), 0, {}
            for b in sorted(buckets):
                below += buckets[b]
                for q in (0.50, 0.95, 0.99):
                    if q not in want and below >= q * total:
                        want[q] = db.execute("SELECT round((0.1 * 1.1 ^ (%s - 0.5))::numeric, 1)", [b]).fetchone()[0]
            h = rows(db, "SELECT * FROM linkhooks.subscription_health WHERE subscription_id = %s AND period = %s",
                     [sub_id, period])[0]
            assert h["delivered"] == total, (period, h["delivered"], total)
            assert (h["latency_p50_ms"], h["latency_p95_ms"], h["latency_p99_ms"]) == (want[0.50], want[0.95], want[0.99])


def test_attempts_are_folded_into_minutes_from_a_cursor_and_the_view_counts_the_rest(db, receiver):
    sub_id, _ = subscribe(db, receiver, "/folded", event_types=["link.created"])

    def folded():
        return db.execute("SELECT coalesce(sum(attempts), 0) FROM linkhooks.subscription_minutes").fetchone()[0]

    def logged():
        return db.execute("SELECT count(*) FROM linkhooks.delivery_attempts").fetchone()[0]

    def in_view():
        return db.execute("SELECT failed_attempts, success_rate FROM linkhooks.subscription_health "
                          "WHERE subscription_id = %s AND period = '1h'", [sub_id]).fetchone()

    for i in range(3):
        link(db, f"f{i}")
    wait_for(lambda: settled(db) and folded() == logged() == 3, message="three attempts folded in by the worker")
    assert db.execute("SELECT counted_id FROM linkhooks.attempt_cursor").fetchone()[0] == \
        db.execute("SELECT max(id) FROM linkhooks.delivery_attempts").fetchone()[0]
    # Attempts past the cursor are counted by the view at once (one failed, written by hand).
    db.execute("INSERT INTO linkhooks.delivery_attempts (delivery_id, attempt, started_at, duration_ms, status_code, "
               "subscription_id) SELECT id, 9, now(), 1, 500, subscription_id FROM linkhooks.deliveries LIMIT 1")
    assert in_view() == (1, Decimal("0.7500"))
    # TRUNCATE starts the ids again, and the cursor with them: new attempts are folded in.
    db.execute("TRUNCATE linkhooks.delivery_attempts, linkhooks.subscription_minutes RESTART IDENTITY")
    assert db.execute("SELECT counted_id FROM linkhooks.attempt_cursor").fetchone()[0] == 0
    link(db, "after")
    wait_for(lambda: settled(db) and folded() == logged() == 1, message="the attempt after TRUNCATE folded in")
    assert in_view() == (0, Decimal("1.0000"))


def test_the_planner_expects_only_the_attempts_after_the_cursor_to_be_unfolded(db):
    """With the fold's cursor in a subquery the planner expected a third of the attempt log not folded
    yet; at 10M attempts subscription_health's plan then cost enough to be JIT-compiled (1.1 s a query).
    It reads attempt_cursor_id() when it estimates."""
    db.execute("INSERT INTO linkhooks.delivery_attempts (delivery_id, attempt, started_at, duration_ms, status_code, "
               "latency_ms) SELECT g, 1, now(), 1, 200, 1 FROM generate_series(1, 200000) g")
    db.execute("INSERT INTO linkhooks.attempt_cursor (counted_id) SELECT max(id) FROM linkhooks.delivery_attempts "
               "ON CONFLICT (single) DO UPDATE SET counted_id = excluded.counted_id")
    db.execute("ANALYZE linkhooks.delivery_attempts")
    plan = db.execute("EXPLAIN (FORMAT JSON) SELECT * FROM linkhooks.subscription_health").fetchone()[0][0]

    def scans(node):
        if node.get("Relation Name", "").startswith("delivery_attempts"):
            yield node
        for child in node.get("Plans", []):
            yield from scans(child)

    attempts = list(scans(plan["Plan"]))
    assert attempts and all(n["Plan Rows"] < 100 for n in attempts), [n["Plan Rows"] for n in attempts]
    assert "JIT" not in plan


def test_subscription_health_shows_why_a_subscription_is_disabled(db, receiver):
    subscribe(db, receiver, "/gone", event_types=["link.created"])
    receiver.expect("/gone", receiver.paths["/gone"]["secrets"], script=[(410, {}, 0)])
    link(db, "g")
    wait_for(lambda: not rows(db, "SELECT enabled FROM linkhooks.subscription_health LIMIT 1")[0]["enabled"], message="disabled")
    wait_for(lambda: rows(db, "SELECT last_failure_at FROM linkhooks.subscription_health LIMIT 1")[0]["last_failure_at"],
             message="the failure written (at most a second after the last write)")
    h = rows(db, "SELECT * FROM linkhooks.subscription_health WHERE period = '1h'")[0]
    assert "410" in h["disabled_reason"] and h["dead_letters"] == 1 and h["consecutive_failures"] == 1


RAW_STATS = """SELECT link_id, count(*) AS clicks, count(*) FILTER (WHERE NOT is_bot) AS human_clicks,
                      count(*) FILTER (WHERE is_bot) AS bot_clicks, count(*) FILTER (WHERE is_qr) AS qr_scans,
                      min(clicked_at) AS first_click_at, max(clicked_at) AS last_click_at
                 FROM linkhooks.click_facts GROUP BY link_id ORDER BY link_id"""
RAW_DAILY = """SELECT link_id, clicked_at::date AS day, count(*) AS clicks, count(*) FILTER (WHERE NOT is_bot) AS human_clicks,
                      count(*) FILTER (WHERE is_bot) AS bot_clicks, count(*) FILTER (WHERE is_qr) AS qr_scans
                 FROM linkhooks.click_facts GROUP BY 1, 2 ORDER BY 1, 2"""


def test_counted_views_are_exact_before_during_and_after_counting(cluster, db):
    """link_stats and link_daily_clicks read the aggregator's counts plus the clicks and conversions
    it has not counted yet (issue 18): whatever the aggregator has done, they equal a count of the
    raw rows."""
    a, b = link(db, "ca"), link(db, "cb")

    def add_clicks():
        db.execute("INSERT INTO linkhooks.clicks (link_id, clicked_at, user_agent, source) "
                   "SELECT CASE WHEN i %% 3 = 0 THEN %s ELSE %s END, now() - (i %% 50) * interval '1 hour', "
                   "CASE WHEN i %% 4 = 0 THEN %s ELSE %s END, CASE WHEN i %% 5 = 0 THEN 'qr' ELSE 'link' END "
                   "FROM generate_series(1, 200) i", [a, b, GOOGLEBOT, IPHONE])
        db.execute("INSERT INTO linkhooks.conversions (link_id, name) "
                   "SELECT CASE WHEN i %% 4 = 0 THEN %s ELSE %s END, 'signup' FROM generate_series(1, 30) i", [a, b])

    def check():
        stats = db.execute("SELECT link_id, clicks, human_clicks, bot_clicks, qr_scans, first_click_at, last_click_at "
                           "FROM linkhooks.link_stats WHERE clicks > 0 ORDER BY link_id").fetchall()
        assert stats == db.execute(RAW_STATS).fetchall()
        assert db.execute("SELECT * FROM linkhooks.link_daily_clicks ORDER BY 1, 2").fetchall() == \
            db.execute(RAW_DAILY).fetchall()
        assert db.execute("SELECT link_id, conversions FROM linkhooks.link_stats WHERE conversions > 0 "
                          "ORDER BY 1").fetchall() == \
            db.execute("SELECT link_id, count(*) FROM linkhooks.conversions GROUP BY 1 ORDER BY 1").fetchall()

    def uncounted():
        return db.execute("SELECT count(*) FROM linkhooks.uncounted_clicks").fetchone()[0]

    with cluster.connect() as holder:
        holder.execute("BEGIN")
        holder.execute(HOLD_AGGREGATOR)  # the aggregator's runs skip meanwhile
        add_clicks()
        assert uncounted() == 200
        check()
    wait_for(lambda: db.execute("SELECT linkhooks.run_aggregation()") and uncounted() == 0, message="counted")
    assert db.execute("SELECT sum(clicks), sum(conversions) FROM linkhooks.link_counts").fetchone() == (200, 30)
    check()
    add_clicks()  # half counted, half not (or counted already: the worker may have run)
    check()
    wait_for(lambda: db.execute("SELECT linkhooks.run_aggregation()") and uncounted() == 0, message="counted")
    check()
    assert db.execute("SELECT sum(clicks) FROM linkhooks.link_hours").fetchone()[0] == 400
    assert db.execute("SELECT sum(conversions) FROM linkhooks.link_counts").fetchone()[0] == 60


def counts(db, link_id):
    """(clicks, conversions) as link_stats shows them and as the aggregator counted them."""
    return (db.execute("SELECT clicks, conversions FROM linkhooks.link_stats WHERE link_id = %s", [link_id]).fetchone(),
            db.execute("SELECT clicks, conversions FROM linkhooks.link_counts WHERE link_id = %s", [link_id]).fetchone())


def test_what_the_aggregators_own_transaction_recorded_is_counted_after_it_commits(cluster, db):
    """run_aggregation() in the transaction that recorded a click and a conversion: they are ahead
    of that transaction's snapshot, so the run leaves them to the next one, and does not take them
    for rows a restore brought from the future (it did, and they were never counted)."""
    a = link(db, "own")
    with cluster.connect() as conn:
        conn.execute("SELECT linkhooks.run_aggregation()")
        with conn.transaction():
            conn.execute("INSERT INTO linkhooks.clicks (link_id, user_agent) VALUES (%s, %s)", [a, IPHONE])
            conn.execute("INSERT INTO linkhooks.conversions (link_id, name) VALUES (%s, 'signup')", [a])
            conn.execute("SELECT linkhooks.run_aggregation()")
    db.execute("SELECT linkhooks.run_aggregation()")
    assert counts(db, a) == ((1, 1), (1, 1))


def test_rows_restored_from_a_cluster_ahead_of_this_one_are_never_counted(cluster, db):
    """A restore brings clicks and conversions with the transaction ids of the cluster they were
    dumped from (and their counts in link_counts). Ids ahead of this cluster's would look
    uncounted once it reaches them: the aggregator notes them as restored and never counts them."""
    a = link(db, "restored")
    db.execute("SELECT linkhooks.run_aggregation()")
    # Far enough ahead that the worker's and housekeeper's own transactions cannot reach it first.
    ahead = db.execute("SELECT pg_current_xact_id()::text::bigint + 1000").fetchone()[0]
    db.execute("SET linkhooks.restore = on")
    try:
        db.execute("INSERT INTO linkhooks.clicks (link_id, event_id, user_agent, txid) "
                   "VALUES (%s, gen_random_uuid(), %s, %s::text::xid8)", [a, IPHONE, ahead])
        db.execute("INSERT INTO linkhooks.conversions (link_id, event_id, name, txid) "
                   "VALUES (%s, gen_random_uuid(), 'signup', %s::text::xid8)", [a, ahead])
    finally:
        db.execute("RESET linkhooks.restore")
    # A run that sees them (the housekeeper's may have begun before they were written, and makes ours skip).
    wait_for(lambda: "skipped" not in db.execute("SELECT linkhooks.run_aggregation()").fetchone()[0],
             message="a run of the aggregator after the restore")
    while db.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0] <= ahead:
        pass  # each autocommitted statement takes the next transaction id
    db.execute("SELECT linkhooks.run_aggregation()")
    assert counts(db, a) == ((0, 0), (0, 0))
    # Rows recorded from now on are counted as ever.
    db.execute("INSERT INTO linkhooks.clicks (link_id, user_agent) VALUES (%s, %s)", [a, IPHONE])
    db.execute("INSERT INTO linkhooks.conversions (link_id, name) VALUES (%s, 'signup')", [a])
    # A run the housekeeper started before the conversion committed holds the aggregator's lock, and
    # ours then leaves the conversion to the next run: run again until counted, within a deadline.
    def counted():
        db.execute("SELECT linkhooks.run_aggregation()")
        return counts(db, a) == ((1, 1), (1, 1))
    wait_for(counted, message=lambda: f"counts {counts(db, a)}")


def test_link_stats_family(db):
    db.execute("INSERT INTO linkhooks.campaigns (name, click_goal) VALUES ('spring', 100), ('empty', 5)")
    a = link(db, "a", campaign="spring")
    b = link(db, "b", campaign="spring")
    c = link(db, "c")
    clicks = [  # (link, user agent, referer, country, source)
        (a, IPHONE, "https://www.Instagram.com/p/1", "US", "link"),
        (a, IPHONE, "https://www.instagram.com/p/2?x=1", "US", "qr"),
        (a, CHROME_MAC, None, "DE", "link"),
        (a, GOOGLEBOT, "https://google.com/", None, "link"),
        (b, CHROME_MAC, "android-app://com.slack/", "FR", "qr"),
    ]
    for link_id, ua, ref, country, source in clicks:
        db.execute("INSERT INTO linkhooks.clicks (link_id, user_agent, referer, country, source) VALUES (%s, %s, %s, %s, %s)",
                   [link_id, ua, ref, country, source])
    first_click = db.execute("SELECT id FROM linkhooks.clicks ORDER BY id LIMIT 1").fetchone()[0]
    db.execute("INSERT INTO linkhooks.conversions (click_id, name, amount, currency) VALUES (%s, 'purchase', 49.90, 'USD')",
               [first_click])
    db.execute("INSERT INTO linkhooks.conversions (link_id, name) VALUES (%s, 'signup')", [a])

    stats = {r["slug"]: r for r in rows(db, "SELECT * FROM linkhooks.link_stats")}
    sa = stats["a"]
    assert (sa["link_id"], sa["campaign"], sa["clicks"], sa["human_clicks"], sa["bot_clicks"], sa["qr_scans"]) == \
        (a, "spring", 4, 3, 1, 1)
    assert (sa["conversions"], float(sa["conversion_rate"])) == (2, round(2 / 3, 4))
    assert sa["first_click_at"] <= sa["last_click_at"]
    assert (stats["b"]["clicks"], stats["b"]["qr_scans"], stats["b"]["conversions"], stats["b"]["conversion_rate"]) == \
        (1, 1, 0, 0)
    assert (stats["c"]["clicks"], stats["c"]["conversion_rate"], stats["c"]["first_click_at"]) == (0, None, None)

    daily = rows(db, "SELECT * FROM linkhooks.link_daily_clicks WHERE link_id = %s", [a])
    today = db.execute("SELECT current_date").fetchone()[0]
    assert daily == [{"link_id": a, "day": today, "clicks": 4, "human_clicks": 3, "bot_clicks": 1, "qr_scans": 1}]

    breakdown = {(r["dimension"], r["value"]): (r["clicks"], r["human_clicks"])
                 for r in rows(db, "SELECT * FROM linkhooks.link_click_breakdown WHERE link_id = %s", [a])}
    assert breakdown == {
        ("referrer", "www.instagram.com"): (2, 2), ("referrer", "(direct)"): (1, 1), ("referrer", "google.com"): (1, 0),
        ("country", "US"): (2, 2), ("country", "DE"): (1, 1), ("country", "(unknown)"): (1, 0),
        ("device", "mobile"): (2, 2), ("device", "desktop"): (1, 1), ("device", "bot"): (1, 0),
        ("browser", "Safari"): (2, 2), ("browser", "Chrome"): (1, 1), ("browser", "(unknown)"): (1, 0),
        ("os", "iOS"): (2, 2), ("os", "macOS"): (1, 1), ("os", "(unknown)"): (1, 0),
        ("source", "link"): (3, 2), ("source", "qr"): (1, 1),
    }
    top = rows(db, "SELECT value FROM linkhooks.link_click_breakdown WHERE link_id = %s AND dimension = 'referrer' "
                   "ORDER BY clicks DESC LIMIT 1", [a])
    assert top == [{"value": "www.instagram.com"}]
    slack = rows(db, "SELECT value FROM linkhooks.link_click_breakdown WHERE link_id = %s AND dimension = 'referrer'", [b])
    assert slack == [{"value": "com.slack"}]

    campaigns = {r["campaign"]: r for r in rows(db, "SELECT * FROM linkhooks.campaign_stats")}
    spring = campaigns["spring"]
    assert (spring["links"], spring["clicks"], spring["human_clicks"], spring["bot_clicks"], spring["qr_scans"],
            spring["conversions"], float(spring["conversion_rate"]), spring["click_goal"]) == (2, 5, 4, 1, 2, 2, 0.5, 100)
    assert (campaigns["empty"]["links"], campaigns["empty"]["clicks"], campaigns["empty"]["conversion_rate"]) == (0, 0, None)
    assert set(campaigns) == {"spring", "empty"}


def test_link_stats_lists_every_link_under_its_current_names_and_only_while_it_exists(db):
    """link_stats reads link_counts alone: each link has its row there from its INSERT, which
    follows its domain, slug and campaign and goes with it, whatever the aggregator has counted."""
    a = link(db, "before", campaign="spring")
    stats = rows(db, "SELECT slug, campaign, clicks, conversions FROM linkhooks.link_stats WHERE link_id = %s", [a])
    assert stats == [{"slug": "before", "campaign": "spring", "clicks": 0, "conversions": 0}], "listed before any click"
    db.execute("INSERT INTO linkhooks.clicks (link_id, user_agent) VALUES (%s, %s)", [a, IPHONE])
    db.execute("SELECT linkhooks.run_aggregation()")
    db.execute("UPDATE linkhooks.links SET domain = 'go.acme.co', slug = 'after', campaign = 'summer' WHERE id = %s", [a])
    stats = rows(db, "SELECT domain, slug, campaign, clicks FROM linkhooks.link_stats WHERE link_id = %s", [a])
    assert stats == [{"domain": "go.acme.co", "slug": "after", "campaign": "summer", "clicks": 1}]
    campaigns = {r["campaign"]: (r["links"], r["clicks"]) for r in rows(db, "SELECT * FROM linkhooks.campaign_stats")}
    assert campaigns == {"summer": (1, 1)}
    db.execute("DELETE FROM linkhooks.links WHERE id = %s", [a])
    assert db.execute("SELECT count(*) FROM linkhooks.link_stats").fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM linkhooks.link_counts").fetchone() == (0,)
    link(db, "one")
    link(db, "two")
    db.execute("TRUNCATE linkhooks.links")
    assert db.execute("SELECT count(*) FROM linkhooks.link_counts").fetchone() == (0,)


def test_a_link_deleted_while_the_aggregator_counts_its_clicks_gets_no_row_back(cluster, db):
    """The aggregator only updates link rows (a link has one from its INSERT): when a DELETE holds
    the link's row, the run waits for it and, once it commits, has no row to update. Inserting,
    as an upsert would, brings a deleted link back into link_stats."""
    a = link(db, "doomed")
    with cluster.connect() as deleter, cluster.connect() as aggregator:
        deleter.execute("BEGIN")
        deleter.execute("DELETE FROM linkhooks.links WHERE id = %s", [a])
        db.execute("INSERT INTO linkhooks.clicks (link_id, user_agent) VALUES (%s, %s)", [a, IPHONE])
        run = threading.Thread(target=lambda: aggregator.execute("SELECT linkhooks.run_aggregation()"))
        run.start()
        try:
            # The housekeeper's run or ours, whichever took the lock: it waits for the deleting transaction.
            wait_for(lambda: db.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0] > 0,
                     message="an aggregation run waiting for the DELETE")
        finally:
            deleter.execute("COMMIT")
            run.join()
    # Whichever run waited has committed once its run lock is free.
    with db.transaction():
        db.execute(HOLD_AGGREGATOR)
    db.execute("SELECT linkhooks.run_aggregation()")
    assert db.execute("SELECT count(*) FROM linkhooks.link_counts WHERE link_id = %s", [a]).fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM linkhooks.link_stats").fetchone() == (0,)


def test_worker_status_reports_the_running_worker(cluster, db, receiver):
    status = rows(db, "SELECT * FROM linkhooks.worker_status()")
    assert len(status) == 1
    idle = wait_for(lambda: [r for r in rows(db, "SELECT * FROM linkhooks.worker_status()")
                             if r["in_flight"] == 0 and r["queue_depth"] == 0], message="an idle worker")
    s = idle[0]
    assert s["running"] is True and s["database"] == "postgres"
    pids = [r[0] for r in db.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_linkhooks'").fetchall()]
    assert pids == [s["pid"]], "the pid is the worker's"
    loop_age = db.execute("SELECT now() - %s", [s["last_loop"]]).fetchone()[0]
    assert loop_age.total_seconds() < 10, "the worker looped within its idle poll"

    # A slow receiver: requests in flight and a queue are visible while they last.
    subscribe(db, receiver, "/slow", event_types=["link.created"])
    receiver.expect("/slow", receiver.paths["/slow"]["secrets"], script=[(200, {}, 1.5)])
    link(db, "busy")
    busy = wait_for(lambda: [r for r in rows(db, "SELECT * FROM linkhooks.worker_status()") if r["in_flight"] == 1],
                    message="a request in flight")[0]
    assert busy["queue_depth"] == 1, "the delivery being sent is still queued until its outcome is recorded"
    wait_for(lambda: rows(db, "SELECT * FROM linkhooks.worker_status()")[0]["queue_depth"] == 0, message="queue drained")
