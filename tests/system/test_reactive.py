"""Reactive events (issue 17): milestones counted off the click path from a
durable cursor, exactly once under concurrency and across a crash; thresholds,
spikes, misses, digests; destination health checks against real servers."""

import re
import threading

import psycopg
import pytest
from psycopg.types.json import Jsonb

from conftest import subscribe
from harness import Destination, wait_for
from test_analytics import HOLD_AGGREGATOR
from test_links import IPHONE, link

DESKTOP = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
           "Chrome/120.0.0.0 Safari/537.36")


def rule(db, settings, link_id=None, campaign=None, kind="milestones"):
    db.execute("INSERT INTO linkhooks.rules (kind, link_id, campaign, settings) VALUES (%s, %s, %s, %s)",
               [kind, link_id, campaign, Jsonb(settings)])


def settle(db):
    """Runs the aggregator until a run of ours (not the worker's, which skips ours while it runs
    and may have read the state before the caller's last change) has counted every committed click."""
    def counted():
        if "skipped" in db.execute("SELECT linkhooks.run_aggregation()").fetchone()[0]:
            return False
        total = db.execute("SELECT coalesce(sum(clicks), 0) FROM linkhooks.link_counts").fetchone()[0]
        return total == db.execute("SELECT count(*) FROM linkhooks.clicks").fetchone()[0]
    wait_for(counted, message="every click counted")


def milestone_events(receiver, path, kind="link.milestone"):
    return [r["json"] for r in receiver.received(path) if r["json"]["type"] == kind]


def test_a_burst_of_concurrent_clients_fires_a_milestone_once(cluster, db, receiver):
    subscribe(db, receiver, "/m", event_types=["link.milestone"])
    link_id = link(db, "burst")
    rule(db, {"thresholds": [50, 70]}, link_id=link_id)

    def client():
        with cluster.connect() as c:
            for _ in range(10):
                c.execute("SELECT linkhooks.record_click('burst', user_agent => 'Mozilla/5.0 (iPhone)')")
    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    settle(db)
    wait_for(lambda: len(milestone_events(receiver, "/m")) >= 2, message="both milestones delivered")
    events = milestone_events(receiver, "/m")
    assert sorted(e["data"]["milestone"]["threshold"] for e in events) == [50, 70]
    for e in events:
        assert e["data"]["link"]["slug"] == "burst"
        assert e["data"]["milestone"]["counted"] == "humans"
        assert e["data"]["milestone"]["clicks"] >= e["data"]["milestone"]["threshold"]
    assert all(r["verified_with"] for r in receiver.received("/m"))
    # Recorded once per counting, ever: more clicks and runs fire nothing again.
    db.execute("SELECT linkhooks.record_click('burst') FROM generate_series(1, 5)")
    settle(db)
    assert db.execute("SELECT count(*) FROM linkhooks.link_milestones WHERE counted = 'humans'").fetchone()[0] == 2
    assert db.execute("SELECT count(*) FROM linkhooks.deliveries WHERE event_type = 'link.milestone'").fetchone()[0] == 2
    # The last five came without a user agent: bots, counted in clicks only.
    assert db.execute("SELECT clicks, human_clicks FROM linkhooks.link_counts").fetchone() == (85, 80)


def test_bots_count_only_for_subscriptions_that_receive_them(db, receiver):
    subscribe(db, receiver, "/humans", event_types=["link.milestone"], filters={"milestones": [3]})
    subscribe(db, receiver, "/all", event_types=["link.milestone"], filters={"milestones": [3], "exclude_bots": False})
    link_id = link(db, "botty")
    db.execute("INSERT INTO linkhooks.clicks (link_id, is_bot) SELECT %s, true FROM generate_series(1, 3)", [link_id])
    settle(db)
    wait_for(lambda: milestone_events(receiver, "/all"), message="the all-clicks milestone")
    assert milestone_events(receiver, "/all")[0]["data"]["milestone"] | {"reached_at": None} == \
        {"threshold": 3, "clicks": 3, "counted": "all", "reached_at": None}
    assert milestone_events(receiver, "/humans") == []
    db.execute("INSERT INTO linkhooks.clicks (link_id, is_bot) SELECT %s, false FROM generate_series(1, 3)", [link_id])
    settle(db)
    wait_for(lambda: milestone_events(receiver, "/humans"), message="the humans milestone")
    assert milestone_events(receiver, "/humans")[0]["data"]["milestone"]["clicks"] == 3
    assert len(milestone_events(receiver, "/all")) == 1


def test_campaign_milestones_and_rule_precedence(db, receiver):
    subscribe(db, receiver, "/c", event_types=["link.milestone", "campaign.milestone"])
    a = link(db, "a", campaign="spring")
    b = link(db, "b", campaign="spring")
    c = link(db, "c")
    rule(db, {"thresholds": [4]}, campaign="spring")       # campaign.milestone and its links
    rule(db, {"thresholds": [2]}, link_id=b)               # b's own list wins over its campaign's
    rule(db, {"thresholds": [1]})                          # every other link
    for link_id, n in [(a, 3), (b, 3), (c, 1)]:
        db.execute("INSERT INTO linkhooks.clicks (link_id, is_bot) SELECT %s, false FROM generate_series(1, %s)", [link_id, n])
    settle(db)
    wait_for(lambda: len(receiver.received("/c")) >= 3, message="three milestones")
    got = sorted((e["type"], e["data"].get("link", {}).get("slug") or e["data"]["campaign"]["name"],
                  e["data"]["milestone"]["threshold"]) for e in (r["json"] for r in receiver.received("/c")))
    assert got == [("campaign.milestone", "spring", 4), ("link.milestone", "b", 2), ("link.milestone", "c", 1)]
    assert db.execute("SELECT clicks FROM linkhooks.campaign_counts WHERE campaign = 'spring'").fetchone()[0] == 6


def test_a_crash_between_the_crossing_click_and_the_count_still_fires_once(cluster, db, receiver):
    subscribe(db, receiver, "/crash", event_types=["link.milestone"])
    link_id = link(db, "crash")
    rule(db, {"thresholds": [10]}, link_id=link_id)
    holder = cluster.connect()
    holder.autocommit = False
    # While this session holds the aggregator's run lock (src/aggregator/mod.rs), its runs skip.
    holder.execute(HOLD_AGGREGATOR)
    db.execute("INSERT INTO linkhooks.clicks (link_id, is_bot) SELECT %s, false FROM generate_series(1, 12)", [link_id])
    assert "skipped" in db.execute("SELECT linkhooks.run_aggregation()").fetchone()[0]
    assert db.execute("SELECT count(*) FROM linkhooks.milestones").fetchone()[0] == 0
    db.close()
    cluster.stop("immediate")
    holder.close()
    cluster.start()
    with cluster.connect() as c:
        wait_for(lambda: milestone_events(receiver, "/crash"), timeout=30, message="the milestone after the crash")
        settle(c)
        assert len(milestone_events(receiver, "/crash")) == 1
        assert c.execute("SELECT clicks FROM linkhooks.link_counts").fetchone()[0] == 12


def test_a_milestone_sent_just_before_a_crash_is_not_sent_again_under_another_id(cluster, db, receiver):
    """The worker's sessions commit asynchronously: a claim or an outcome lost in a crash only means a resend under
    the same webhook-id. A milestone is different: the worker creates it, so had its commit been lost after it was
    sent, counting again after the crash would send it again under a new id, which no receiver can deduplicate.
    The WAL writer slowed to 10 s leaves an asynchronous commit unflushed when the crash comes right after the send."""
    subscribe(db, receiver, "/sent", event_types=["link.milestone"])
    link_id = link(db, "sent")
    rule(db, {"thresholds": [5]}, link_id=link_id)
    cluster.set("wal_writer_delay", "10s")
    try:
        db.execute("INSERT INTO linkhooks.clicks (link_id, is_bot) SELECT %s, false FROM generate_series(1, 6)", [link_id])
        wait_for(lambda: milestone_events(receiver, "/sent"), interval=0.005, message="the milestone")
        db.close()
        cluster.stop("immediate")
    finally:
        cluster.start()
        with cluster.connect() as c:
            c.execute("ALTER SYSTEM RESET wal_writer_delay")
            c.execute("SELECT pg_reload_conf()")
    with cluster.connect() as c:
        settle(c)
        wait_for(lambda: c.execute("SELECT count(*) = 0 FROM linkhooks.deliveries "
                                   "WHERE status IN ('pending', 'delivering')").fetchone()[0],
                 message="the queue drained after the crash")
        sent = {e["id"] for e in milestone_events(receiver, "/sent")}
        assert sent == {str(i) for (i,) in c.execute("SELECT event_id FROM linkhooks.deliveries "
                                                     "WHERE event_type = 'link.milestone'").fetchall()}
        assert len(sent) == 1


def test_rules_are_checked_when_written(db):
    link_id = link(db, "r")
    for settings, kw, message in [
        ({"thresholds": [10, 5]}, {}, "invalid settings.thresholds: thresholds must increase (5 comes after 10)"),
        ({"thresholds": [-1]}, {}, "invalid settings.thresholds: thresholds must be greater than 0 (got -1)"),
        ({"thresholds": []}, {}, "invalid settings.thresholds: must be a non-empty array of whole numbers"),
        ({}, {}, "invalid settings.thresholds: required for a milestones rule"),
        ({"thresholds": [1], "window": "5m"}, {}, "invalid settings: unknown key 'window' for a milestones rule"),
        ({"thresholds": [1]}, {"kind": "spikes"}, "invalid kind: 'spikes' is not a rule kind"),
        ({"clicks": 10, "window": "-5m"}, {"kind": "threshold"},
         "invalid settings.window: must be a duration from 1 minute to 7 days"),
        ({"clicks": -1, "window": "5m"}, {"kind": "threshold"}, "invalid settings.clicks: must be a whole number greater than 0"),
        ({"thresholds": [1]}, {"link_id": link_id, "campaign": "x"}, "invalid link_id and campaign"),
        ({"thresholds": [1]}, {"link_id": 999}, "invalid link_id: link 999 does not exist"),
    ]:
        with pytest.raises(psycopg.Error) as caught:
            rule(db, settings, **kw)
        assert message in caught.value.diag.message_primary
    with pytest.raises(psycopg.Error) as caught:
        db.execute("INSERT INTO linkhooks.subscriptions (name, url, filters) VALUES ('x', 'http://127.0.0.1:9/', %s)",
                   [Jsonb({"milestones": [5, 5]})])
    assert "invalid filters.milestones: thresholds must increase" in caught.value.diag.message_primary
    rule(db, {"thresholds": [1, 2]}, link_id=link_id)
    with pytest.raises(psycopg.errors.UniqueViolation):
        rule(db, {"thresholds": [3]}, link_id=link_id)
    assert db.execute("SELECT count(*) FROM linkhooks.rules").fetchone()[0] == 1


def test_ten_thousand_misses_of_one_slug_are_one_row_and_one_event(cluster, db, receiver):
    subscribe(db, receiver, "/miss", event_types=["link.miss"])
    with cluster.connect() as holder:  # the aggregator waits until all 10,000 are in
        holder.execute("BEGIN")
        holder.execute(HOLD_AGGREGATOR)
        db.execute("SELECT linkhooks.record_click('nope', user_agent => 'curl') FROM generate_series(1, 5000)")
        db.execute("SELECT linkhooks.record_miss('nope') FROM generate_series(1, 5000)")
    assert db.execute("SELECT slug, reason, count FROM linkhooks.link_misses").fetchall() == [("nope", "unknown", 10000)]
    settle(db)
    wait_for(lambda: receiver.received("/miss"), message="link.miss")
    [event] = [r["json"] for r in receiver.received("/miss")]
    assert event["type"] == "link.miss" and event["data"]["link"] is None
    assert event["data"]["miss"] | {"first_seen": None, "last_seen": None} == \
        {"domain": "", "slug": "nope", "reason": "unknown", "count": 10000, "first_seen": None, "last_seen": None}
    # More misses within linkhooks.miss_interval (1h) count, and announce nothing more.
    db.execute("SELECT linkhooks.record_miss('nope') FROM generate_series(1, 100)")
    settle(db)
    assert db.execute("SELECT count FROM linkhooks.link_misses").fetchone()[0] == 10100
    assert db.execute("SELECT count(*) FROM linkhooks.deliveries WHERE event_type = 'link.miss'").fetchone()[0] == 1


def test_misses_name_why_the_link_did_not_redirect(db, receiver):
    subscribe(db, receiver, "/why", event_types=["link.miss"])
    link(db, "off", disabled=True)
    link(db, "gone", expires_at="2020-01-01T00:00:00Z")
    link(db, "full", max_clicks=1)
    for slug in ["off", "gone", "full", "full", "typo"]:
        db.execute("SELECT linkhooks.record_click(%s)", [slug])
    rows = db.execute("SELECT slug, reason, count FROM linkhooks.link_misses ORDER BY slug").fetchall()
    assert rows == [("full", "limit", 1), ("gone", "expired", 1), ("off", "disabled", 1), ("typo", "unknown", 1)]
    settle(db)
    wait_for(lambda: len(receiver.received("/why")) == 4, message="four link.miss events")
    by_slug = {r["json"]["data"]["miss"]["slug"]: r["json"]["data"] for r in receiver.received("/why")}
    assert by_slug["full"]["link"]["slug"] == "full" and by_slug["typo"]["link"] is None
    with pytest.raises(psycopg.Error) as caught:
        db.execute("SELECT linkhooks.record_miss('x', '', 'lost')")
    assert "invalid reason: must be one of unknown, expired, limit, disabled" in caught.value.diag.message_primary


def test_idempotent_retries_record_once(cluster, db, receiver):
    subscribe(db, receiver, "/once", event_types=["link.clicked", "link.converted"])
    first_link = link(db, "buy")
    first = db.execute("SELECT * FROM linkhooks.record_click_returning('buy', user_agent => 'Mozilla/5.0 (iPhone)', "
                       "idempotency_key => 'req-1')").fetchone()
    # Retries, including concurrent ones, return the first call's click.
    results = []

    def retry():
        with cluster.connect() as c:
            results.append(c.execute("SELECT * FROM linkhooks.record_click_returning('buy', "
                                     "idempotency_key => 'req-1')").fetchone())
    threads = [threading.Thread(target=retry) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [first] * 4
    assert db.execute("SELECT linkhooks.record_click('buy', idempotency_key => 'req-1')").fetchone()[0] == first[0]
    assert db.execute("SELECT count(*) FROM linkhooks.clicks").fetchone()[0] == 1
    # The same key for another link is a mistake, not a retry: it would return another link's click.
    other = link(db, "sell")
    with pytest.raises(psycopg.Error) as caught:
        db.execute("SELECT linkhooks.record_click('sell', idempotency_key => 'req-1')")
    assert caught.value.diag.message_primary == (
        f"invalid idempotency_key: was used for a click on link {first_link}, not on this link ({other}); "
        "a retry must name the same link")
    assert db.execute("SELECT count(*) FROM linkhooks.clicks").fetchone()[0] == 1
    # An order id recorded twice is one conversion and one link.converted.
    for _ in range(2):
        db.execute("INSERT INTO linkhooks.conversions (click_id, name, amount, currency, external_id) "
                   "VALUES (%s, 'purchase', 49.90, 'EUR', 'order-77')", [first[1]])
    assert db.execute("SELECT count(*) FROM linkhooks.conversions").fetchone()[0] == 1
    wait_for(lambda: len(receiver.received("/once")) == 2, message="one click and one conversion")
    converted = [r["json"] for r in receiver.received("/once") if r["json"]["type"] == "link.converted"]
    assert converted[0]["data"]["conversion"]["external_id"] == "order-77"
    with pytest.raises(psycopg.Error) as caught:
        db.execute("SELECT linkhooks.record_click('buy', idempotency_key => %s)", ["k" * 201])
    assert "invalid idempotency_key: must be 1 to 200 characters" in caught.value.diag.message_primary


def test_a_threshold_fires_rearms_after_a_quiet_window_and_fires_again(db, receiver):
    subscribe(db, receiver, "/rate", event_types=["link.threshold"])
    link_id = link(db, "hot", campaign="launch")
    rule(db, {"clicks": 20, "window": "5m"}, link_id=link_id, kind="threshold")
    rule(db, {"clicks": 30, "window": "1h"}, campaign="launch", kind="threshold")

    def burst(n):
        db.execute("INSERT INTO linkhooks.clicks (link_id, is_bot) SELECT %s, false FROM generate_series(1, %s)", [link_id, n])
        settle(db)

    def events():
        return [r["json"] for r in receiver.received("/rate")]

    burst(19)
    assert db.execute("SELECT count(*) FROM linkhooks.threshold_state").fetchone()[0] == 0
    burst(15)  # 34 in the window: the link's rule (20) and the campaign's (30) both fire
    wait_for(lambda: len(events()) == 2, message="two link.threshold events")
    by_scope = {("campaign" if e["data"]["campaign"] else "link"): e["data"] for e in events()}
    assert by_scope["link"]["link"]["slug"] == "hot" and by_scope["link"]["clicks"] == 34
    assert by_scope["link"]["rule"]["clicks"] == 20 and by_scope["link"]["rule"]["window_minutes"] == 5
    assert by_scope["campaign"]["campaign"] == {"name": "launch"} and by_scope["campaign"]["link"] is None
    burst(50)  # still above: the same episode, nothing more
    assert len(events()) == 2
    # Time passes (the buckets age out of the 5-minute window): below the count, the quiet window starts.
    db.execute("UPDATE linkhooks.link_minutes SET minute = minute - interval '10 minutes'")
    settle(db)
    below_since = db.execute("SELECT below_since FROM linkhooks.threshold_state WHERE link_id = %s", [link_id]).fetchone()[0]
    assert below_since is not None
    burst(0)
    assert db.execute("SELECT count(*) FROM linkhooks.threshold_state WHERE link_id = %s", [link_id]).fetchone()[0] == 1
    # A whole window later it is armed again, and the next crossing fires a second time.
    db.execute("UPDATE linkhooks.threshold_state SET below_since = below_since - interval '5 minutes' WHERE link_id = %s",
               [link_id])
    settle(db)
    assert db.execute("SELECT count(*) FROM linkhooks.threshold_state WHERE link_id = %s", [link_id]).fetchone()[0] == 0
    burst(20)
    wait_for(lambda: len(events()) == 3, message="the threshold again")
    assert events()[-1]["data"]["link"]["slug"] == "hot" and events()[-1]["data"]["clicks"] == 20
    assert len({e["id"] for e in events()}) == 3


def test_a_digest_window_gives_one_event_with_the_right_counts(db, receiver):
    subscribe(db, receiver, "/digest", filters={"digest": "1m"})
    subscribe(db, receiver, "/each", event_types=["link.clicked", "qr.scanned"])
    link_id = link(db, "promo")
    # Clicks of the minute before this one: that window has ended, so it is sent at once.
    rows = [("US", "https://www.Instagram.com/p/1", "link", IPHONE)] * 3 + [("DE", None, "link", DESKTOP)] * 2 + \
           [("DE", None, "qr", IPHONE)] + [(None, None, "link", "curl/8.0")]  # the last is a bot: filtered out
    # One time for all: a minute boundary passing between the inserts would split them over two windows.
    at = db.execute("SELECT date_trunc('minute', now()) - interval '30 seconds'").fetchone()[0]
    ids = [db.execute("INSERT INTO linkhooks.clicks (link_id, clicked_at, country, referer, source, user_agent) "
                      "VALUES (%s, %s, %s, %s, %s, %s) RETURNING id", [link_id, at, *r]).fetchone()[0] for r in rows]
    settle(db)
    def digests():
        return [r["json"] for r in receiver.received("/digest") if r["json"]["type"] == "link.clicks.digest"]
    wait_for(digests, timeout=30, message="the digest")
    settle(db)
    [digest] = digests()
    data = digest["data"]
    assert digest["type"] == "link.clicks.digest" and data["link"]["slug"] == "promo"
    assert data["clicks"] == 6
    assert data["countries"] == {"US": 3, "DE": 3}
    assert data["devices"] == {"mobile": 4, "desktop": 2}
    assert data["referrers"] == {"www.instagram.com": 3, "(direct)": 3}
    assert data["sources"] == {"link": 5, "qr": 1}
    assert data["click_ids"] == {"first": ids[0], "last": ids[5]}
    start, end = db.execute(
        "SELECT to_char(m AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), "
        "       to_char((m + interval '1 minute') AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') "
        "FROM (SELECT date_trunc('minute', min(clicked_at)) AS m FROM linkhooks.clicks) x").fetchone()
    assert data["window"] == {"start": start, "end": end}
    # The digest subscription (every event type) got no event per click, the other one the six humans'.
    assert sorted(r["json"]["type"] for r in receiver.received("/digest")) == ["link.clicks.digest", "link.created"]
    wait_for(lambda: len(receiver.received("/each")) == 6, message="six click events for /each")
    assert db.execute("SELECT count(*) FROM linkhooks.digests").fetchone()[0] == 0


def test_a_spike_fires_once_per_episode_and_not_for_a_steady_busy_link(db, receiver):
    subscribe(db, receiver, "/spike", event_types=["link.spike"])
    rule(db, {}, kind="spike")  # 5× the previous day's rate over 10 minutes, at least 50 clicks
    spiky, steady = link(db, "spiky"), link(db, "steady")

    def clicks(link_id, per_minute, minutes_ago_from, minutes_ago_to, **cols):
        db.execute("INSERT INTO linkhooks.clicks (link_id, is_bot, clicked_at, country, referer) "
                   "SELECT %s, false, now() - m * interval '1 minute' - interval '1 second', %s::text, %s::text "
                   "FROM generate_series(%s::int, %s::int) m, generate_series(1, %s::int)",
                   [link_id, cols.get("country"), cols.get("referer"), minutes_ago_to, minutes_ago_from, per_minute])

    # A day of history: 1 click a minute for "spiky", 10 a minute for "steady".
    clicks(spiky, 1, 1440, 11)
    clicks(steady, 10, 1440, 11)
    settle(db)
    # The last ten minutes: "spiky" gets 60 (12 a minute for five; 10 expected), "steady" its usual 10 a minute.
    clicks(spiky, 12, 4, 0, country="DE", referer="https://news.example.org/a")
    clicks(steady, 10, 9, 0)
    settle(db)
    wait_for(lambda: receiver.received("/spike"), message="link.spike")
    settle(db)
    [event] = [r["json"] for r in receiver.received("/spike")]
    data = event["data"]
    assert data["link"]["slug"] == "spiky" and data["clicks"] == 60
    assert 9 <= data["expected"] <= 11 and data["rule"]["factor"] == 5
    assert data["top_countries"] == {"DE": 60} and data["top_referrers"] == {"news.example.org": 60}
    # The episode goes on: more clicks send nothing more.
    clicks(spiky, 20, 0, 0)
    settle(db)
    assert len(receiver.received("/spike")) == 1
    assert db.execute("SELECT count(*) FROM linkhooks.threshold_state").fetchone()[0] == 1


def test_a_per_country_spike_fires_for_that_country_alone(db, receiver):
    subscribe(db, receiver, "/spike", event_types=["link.spike"])
    rule(db, {"per_country": True, "min_clicks": 20, "baseline": "1h"}, kind="spike")
    link_id = link(db, "world")

    def clicks(country, per_minute, minutes_ago_from, minutes_ago_to):
        db.execute("INSERT INTO linkhooks.clicks (link_id, is_bot, clicked_at, country) "
                   "SELECT %s, false, now() - m * interval '1 minute' - interval '1 second', %s::text "
                   "FROM generate_series(%s::int, %s::int) m, generate_series(1, %s::int)",
                   [link_id, country, minutes_ago_to, minutes_ago_from, per_minute])

    # An hour of history: a click a minute each from the US, from Germany and from nowhere known.
    for country in ("US", "DE", None):
        clicks(country, 1, 70, 11)
    settle(db)
    # The window: Germany at 12 a minute for five minutes (10 expected), the others as usual.
    clicks("DE", 12, 4, 0)
    clicks("US", 1, 9, 0)
    clicks(None, 1, 9, 0)
    settle(db)
    wait_for(lambda: receiver.received("/spike"), message="link.spike for DE")
    settle(db)
    [event] = [r["json"] for r in receiver.received("/spike")]
    data = event["data"]
    assert data["link"]["slug"] == "world" and data["country"] == "DE" and data["clicks"] == 60
    assert 9 <= data["expected"] <= 11 and data["rule"]["per_country"] is True
    assert data["top_countries"] == {"DE": 60}
    assert db.execute("SELECT link_id, country FROM linkhooks.threshold_state").fetchall() == [(link_id, "DE")]
    # Clicks without a country are not counted per country.
    assert db.execute("SELECT DISTINCT country FROM linkhooks.country_minutes ORDER BY 1").fetchall() == [("DE",), ("US",)]


def health(db, slug):
    return db.execute("SELECT status, http_status, reason, failures FROM linkhooks.link_health WHERE slug = %s",
                      [slug]).fetchone()


def test_a_destination_that_fails_then_answers_gives_broken_then_recovered(db, receiver, destination):
    subscribe(db, receiver, "/health", event_types=["link.broken", "link.recovered"])
    link_id = link(db, "shop", destination.url("/shop"), utm=Jsonb({"utm_source": "news"}))
    rule(db, {"interval": "1s", "failures": 2}, link_id=link_id, kind="health_check")
    # The worker finds the rule within 10 s, then checks every second.
    wait_for(lambda: receiver.received("/health"), timeout=30, message="link.broken")
    [broken] = [r["json"] for r in receiver.received("/health")]
    assert broken["type"] == "link.broken" and broken["data"]["link"]["slug"] == "shop"
    check = broken["data"]["check"]
    assert check | {"checked_at": None} == {"url": destination.url("/shop?utm_source=news"), "http_status": 500,
                                            "reason": "HTTP 500", "failures": 2, "checked_at": None}
    assert set(destination.methods) == {"HEAD"}
    assert health(db, "shop")[0] == "broken"
    # Still failing: nothing more is sent, failures go on counting.
    wait_for(lambda: health(db, "shop")[3] >= 4, timeout=10, message="two more failed checks")
    assert len(receiver.received("/health")) == 1
    destination.status = 200
    wait_for(lambda: len(receiver.received("/health")) == 2, timeout=10, message="link.recovered")
    recovered = receiver.received("/health")[1]["json"]
    assert recovered["type"] == "link.recovered"
    check = recovered["data"]["check"]
    assert check["http_status"] == 200 and check["reason"] is None and "failures" not in check
    assert check["broken_since"] <= check["checked_at"]
    assert health(db, "shop") == ("healthy", 200, None, 0)
    assert all(r["verified_with"] for r in receiver.received("/health"))
    # Recorded on the row that reported it.
    assert db.execute("SELECT event_id::text FROM linkhooks.destination_checks").fetchone()[0] == recovered["id"]


def test_campaign_checks_fall_back_to_get_and_report_unreachable_hosts(db, receiver):
    head_refused = Destination(status=200, head=405)
    try:
        subscribe(db, receiver, "/health", event_types=["link.broken", "link.recovered"])
        link(db, "ok", head_refused.url("/ok"), campaign="launch")
        link(db, "dead", "http://no-such-host.invalid/x", campaign="launch")
        link(db, "elsewhere", head_refused.url("/other"))
        link(db, "off", "http://no-such-host.invalid/y", campaign="launch", disabled=True)
        rule(db, {"interval": "1s", "failures": 1}, campaign="launch", kind="health_check")
        wait_for(lambda: receiver.received("/health"), timeout=30, message="link.broken")
        wait_for(lambda: health(db, "ok") and health(db, "ok")[0] == "healthy", message="the HEAD-refusing link checked")
        [broken] = [r["json"] for r in receiver.received("/health")]
        assert broken["type"] == "link.broken" and broken["data"]["link"]["slug"] == "dead"
        assert broken["data"]["check"]["http_status"] is None
        assert "failed to lookup address" in broken["data"]["check"]["reason"]
        # HEAD refused, then GET: healthy, and no event for a link that was never broken.
        assert health(db, "ok") == ("healthy", 200, None, 0)
        assert head_refused.methods[:2] == ["HEAD", "GET"] and "/other" not in str(head_refused.methods)
        # Only the campaign's active links are checked.
        assert [r[0] for r in db.execute("SELECT slug FROM linkhooks.link_health ORDER BY slug")] == ["dead", "ok"]
        # The rule gone, so are its checks (at the next discovery).
        db.execute("DELETE FROM linkhooks.rules")
        wait_for(lambda: db.execute("SELECT count(*) FROM linkhooks.destination_checks").fetchone()[0] == 0,
                 timeout=30, message="checks dropped with their rule")
    finally:
        head_refused.close()


@pytest.mark.parametrize("scope, settings, message", [
    ({}, {}, "a health_check rule names a link or a campaign"),
    ({"campaign": "x"}, {"interval": "0s"}, "invalid settings.interval: must be a duration from 1 second to 1 day"),
    ({"campaign": "x"}, {"method": "POST"}, "invalid settings.method: must be 'HEAD' or 'GET'"),
    ({"campaign": "x"}, {"failures": 0}, "invalid settings.failures: must be a whole number from 1 to 10"),
    ({"campaign": "x"}, {"every": "1m"}, "unknown key 'every' for a health_check rule"),
])
def test_health_check_rules_are_checked_when_written(db, scope, settings, message):
    with pytest.raises(psycopg.Error, match=re.escape(message)):
        rule(db, settings, kind="health_check", **scope)


def test_destination_checks_obey_the_private_address_rule(cluster, db, destination):
    """A link may point anywhere, but the worker's checks resolve like its webhooks: with
    linkhooks.allow_private_targets off, a destination on 127.0.0.1 is never requested."""
    cluster.set("linkhooks.allow_private_targets", "off")
    try:
        wait_for(lambda: "off" == db.execute("SHOW linkhooks.allow_private_targets").fetchone()[0], message="reload")
        link_id = link(db, "inside", destination.url("/admin"))
        rule(db, {"interval": "1s", "failures": 1}, link_id=link_id, kind="health_check")
        wait_for(lambda: health(db, "inside") and health(db, "inside")[0] == "broken", timeout=30,
                 message="the check refused")
        reason = health(db, "inside")[2]
        assert "allow_private_targets" in reason and "/admin" not in reason
        assert destination.methods == []
    finally:
        cluster.set("linkhooks.allow_private_targets", "on")
