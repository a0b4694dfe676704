"""Replicas and subscribers are never stale (issue 16): a session on a
streaming hot standby or on a logical-replication subscriber that resolved a
link before sees every committed change once it is replayed or applied; the
analyst views and worker_status() answer on a standby; and a database that
receives deliveries by logical replication does not send them again."""

import psycopg
import pytest
from psycopg.types.json import Jsonb

from conftest import SETTINGS, subscribe
from harness import Cluster, Standby, wait_for
from test_links import IPHONE, link, resolve
from test_readme import code_blocks, section, statements

VIEWS = ["link_stats", "link_daily_clicks", "link_click_breakdown", "campaign_stats", "click_facts",
         "delivery_log", "subscription_health"]


@pytest.fixture(scope="module")
def standby(cluster):
    s = Standby(cluster)
    s.start()
    yield s
    s.destroy()


@pytest.fixture(scope="module")
def pair():
    """A publisher (wal_level = logical) and a subscriber, each with the extension and its own worker."""
    publisher = Cluster({**SETTINGS, "wal_level": "logical"})
    subscriber = Cluster(SETTINGS)
    try:
        for c in (publisher, subscriber):
            c.start()
            with c.connect() as conn:
                conn.execute("CREATE EXTENSION pg_linkhooks")
        yield publisher, subscriber
    finally:
        publisher.destroy()
        subscriber.destroy()


def cached(conn, slug, answer):
    """Resolves twice (a link is cached on its second miss) and checks both answers."""
    assert resolve(conn, slug) == answer
    assert resolve(conn, slug) == answer


def test_a_standby_session_that_cached_a_link_sees_every_replayed_change(db, standby):
    link_id = link(db, "sb", "https://acme.com/old")
    standby.caught_up()
    with standby.connect() as s:
        cached(s, "sb", "https://acme.com/old")

        db.execute("UPDATE linkhooks.links SET destination = 'https://acme.com/new' WHERE id = %s", [link_id])
        standby.caught_up()
        assert resolve(s, "sb") == "https://acme.com/new"

        db.execute("UPDATE linkhooks.links SET disabled = true, expired_url = 'https://acme.com/paused' WHERE id = %s",
                   [link_id])
        standby.caught_up()
        assert resolve(s, "sb") == "https://acme.com/paused"

        db.execute("UPDATE linkhooks.links SET disabled = false WHERE id = %s", [link_id])
        standby.caught_up()
        cached(s, "sb", "https://acme.com/new")
        db.execute("UPDATE linkhooks.links SET expires_at = now() - interval '1 minute', "
                   "expired_url = 'https://acme.com/over' WHERE id = %s", [link_id])
        standby.caught_up()
        assert resolve(s, "sb") == "https://acme.com/over"

        db.execute("DELETE FROM linkhooks.links WHERE id = %s", [link_id])
        standby.caught_up()
        assert resolve(s, "sb") is None

        link(db, "sb2", "https://acme.com/two")
        standby.caught_up()
        cached(s, "sb2", "https://acme.com/two")
        db.execute("TRUNCATE linkhooks.links CASCADE")
        standby.caught_up()
        assert resolve(s, "sb2") is None


def test_a_standby_transaction_sees_a_change_replayed_between_its_statements(db, standby):
    """READ COMMITTED: each statement sees what was replayed before it, cache or not."""
    link_id = link(db, "tx", "https://acme.com/old")
    standby.caught_up()
    with standby.connect() as s:
        cached(s, "tx", "https://acme.com/old")
        with s.transaction():
            assert resolve(s, "tx") == "https://acme.com/old"
            db.execute("UPDATE linkhooks.links SET disabled = true WHERE id = %s", [link_id])
            standby.caught_up()
            assert resolve(s, "tx") is None


def test_links_written_without_the_checks_are_never_served_stale(db, cluster, standby):
    """Replica role and restore mode store rows without the links checks, and
    an ALTER … DISABLE TRIGGER stores them with no trigger at all: caches on
    the primary (in and out of a transaction) and on a standby still follow,
    and the redirect follows the new destination."""
    link_id = link(db, "raw", "https://acme.com/old", utm=Jsonb({"source": "ig"}))
    standby.caught_up()
    with cluster.connect() as p, standby.connect() as s:

        def everywhere(answer):
            standby.caught_up()
            assert resolve(p, "raw") == answer
            assert resolve(s, "raw") == answer
            cached(p, "raw", answer)
            cached(s, "raw", answer)

        everywhere("https://acme.com/old?utm_source=ig")
        for mode in ("session_replication_role = replica", "linkhooks.restore = on"):
            new = f"https://acme.com/{mode.split()[0]}"
            with db.transaction():
                db.execute(f"SET LOCAL {mode}")
                db.execute("UPDATE linkhooks.links SET destination = %s WHERE id = %s", [new, link_id])
            everywhere(f"{new}?utm_source=ig")

        with p.transaction():
            cached(p, "raw", "https://acme.com/linkhooks.restore?utm_source=ig")
            with db.transaction():
                db.execute("ALTER TABLE linkhooks.links DISABLE TRIGGER links_events")
                db.execute("UPDATE linkhooks.links SET disabled = true WHERE id = %s", [link_id])
                db.execute("ALTER TABLE linkhooks.links ENABLE TRIGGER links_events")
            assert resolve(p, "raw") is None
        standby.caught_up()
        assert resolve(s, "raw") is None


def test_worker_status_and_the_analyst_views_answer_on_a_standby(db, standby, receiver):
    subscribe(db, receiver, "/sb")
    link(db, "seen", campaign="spring")
    assert db.execute("SELECT linkhooks.record_click('seen', user_agent => %s)", [IPHONE]).fetchone()[0] == "https://acme.com/x"
    wait_for(lambda: db.execute("SELECT count(*) > 0 AND bool_and(status = 'delivered') FROM linkhooks.deliveries")
             .fetchone()[0], message="the primary's worker to deliver")
    delivered = db.execute("SELECT count(*) FROM linkhooks.deliveries").fetchone()[0]
    standby.caught_up()
    with standby.connect() as s:
        running, pid, queue_depth = s.execute(
            "SELECT running, pid, queue_depth FROM linkhooks.worker_status()").fetchone()
        # No worker runs during recovery (it starts when the standby is promoted).
        assert (running, pid, queue_depth) == (False, None, 0)
        for view in VIEWS:
            s.execute(f"SELECT * FROM linkhooks.{view}").fetchall()
        assert s.execute("SELECT clicks FROM linkhooks.link_stats WHERE slug = 'seen'").fetchone() == (1,)
        assert s.execute("SELECT count(*) FROM linkhooks.delivery_log WHERE status = 'delivered'").fetchone() == (delivered,)
        assert s.execute("SELECT count(*) FROM linkhooks.subscription_health WHERE name = 'sb'").fetchone() == (2,)


def test_the_readmes_redirect_service_resolves_on_the_standby_and_records_on_the_primary_as_a_writer(db, standby):
    [block] = code_blocks(section("## Redirects from read replicas"), "sql")
    (resolving, _), (lag, _), (inserting, _) = statements(block)
    link(db, "sale", "https://acme.com/winter-sale", max_clicks=2)
    db.execute("DROP ROLE IF EXISTS lh_redirector")
    db.execute("CREATE ROLE lh_redirector LOGIN")
    try:
        db.execute("SELECT linkhooks.grant_access('lh_redirector', 'writer')")
        standby.caught_up()
        as_writer = dict(host="127.0.0.1", user="lh_redirector", dbname="postgres", autocommit=True)
        with psycopg.connect(port=standby.port, **as_writer) as replica, \
                psycopg.connect(port=db.info.port, **as_writer) as primary:
            assert replica.execute(resolving).fetchone()[0] == "https://acme.com/winter-sale"
            assert replica.execute(lag).fetchone()[0] is not None
            primary.execute(inserting)
            primary.execute(inserting)
            # At the limit the primary refuses the next click (which a replica may have redirected
            # before replaying the limit).
            with pytest.raises(psycopg.errors.CheckViolation, match="has reached its max_clicks of 2"):
                primary.execute(inserting)
        assert db.execute("SELECT count(*) FROM linkhooks.clicks").fetchone()[0] == 2
        db.execute("SELECT linkhooks.revoke_access('lh_redirector', 'writer')")
    finally:
        db.execute("DROP ROLE IF EXISTS lh_redirector")


def test_a_subscriber_session_that_cached_a_link_sees_every_applied_change(pair):
    publisher, subscriber = pair
    with publisher.connect() as p, subscriber.connect() as s, subscriber.connect() as probe:
        p.execute("CREATE PUBLICATION links_pub FOR TABLE linkhooks.links")
        link_id = link(p, "lr", "https://acme.com/old")
        s.execute(f"CREATE SUBSCRIPTION links_sub CONNECTION 'host={publisher.dir} port={publisher.port} "
                  "user=postgres dbname=postgres' PUBLICATION links_pub")
        try:
            def applied(change, params, row):
                """Makes a change on the publisher; waits until a fresh subscriber query sees it."""
                p.execute(change, params)
                wait_for(lambda: probe.execute("SELECT destination, disabled, expires_at < now() FROM linkhooks.links "
                                               "WHERE slug = %s", [row[0]]).fetchone() == row[1],
                         message=f"the subscriber to apply {change}")

            wait_for(lambda: probe.execute("SELECT count(*) FROM linkhooks.links").fetchone()[0] == 1,
                     message="the initial copy")
            cached(s, "lr", "https://acme.com/old")
            # Applied links get their row in link_counts here, so link_stats lists them.
            assert s.execute("SELECT slug, clicks FROM linkhooks.link_stats").fetchall() == [("lr", 0)]

            applied("UPDATE linkhooks.links SET destination = 'https://acme.com/new' WHERE id = %s", [link_id],
                    ("lr", ("https://acme.com/new", False, None)))
            assert resolve(s, "lr") == "https://acme.com/new"
            applied("UPDATE linkhooks.links SET disabled = true, expired_url = 'https://acme.com/paused' WHERE id = %s",
                    [link_id], ("lr", ("https://acme.com/new", True, None)))
            assert resolve(s, "lr") == "https://acme.com/paused"
            # record_click reads through the same cache.
            assert s.execute("SELECT linkhooks.record_click('lr')").fetchone()[0] == "https://acme.com/paused"
            applied("UPDATE linkhooks.links SET disabled = false WHERE id = %s", [link_id],
                    ("lr", ("https://acme.com/new", False, None)))
            cached(s, "lr", "https://acme.com/new")
            applied("UPDATE linkhooks.links SET expires_at = now() - interval '1 minute', "
                    "expired_url = 'https://acme.com/over' WHERE id = %s", [link_id],
                    ("lr", ("https://acme.com/new", False, True)))
            assert resolve(s, "lr") == "https://acme.com/over"
            applied("DELETE FROM linkhooks.links WHERE id = %s", [link_id], ("lr", None))
            assert resolve(s, "lr") is None
            assert s.execute("SELECT count(*) FROM linkhooks.link_stats").fetchone() == (0,)

            link(p, "lr2", "https://acme.com/two")
            wait_for(lambda: probe.execute("SELECT count(*) FROM linkhooks.links").fetchone()[0] == 1,
                     message="the new link applied")
            cached(s, "lr2", "https://acme.com/two")
            applied("TRUNCATE linkhooks.links", [], ("lr2", None))
            assert resolve(s, "lr2") is None
            assert s.execute("SELECT count(*) FROM linkhooks.link_counts").fetchone() == (0,)
            # Apply only invalidated: the subscriber queued no events of its own for these changes.
            assert s.execute("SELECT count(*) FROM linkhooks.deliveries").fetchone() == (0,)
        finally:
            s.execute("DROP SUBSCRIPTION links_sub")
            p.execute("DROP PUBLICATION links_pub")


def test_a_subscriber_does_not_send_the_deliveries_it_receives(pair, receiver):
    """The subscriber has its own worker and a subscription (same id as the
    publisher's) pointing at the receiver. While deliveries arrive by logical
    replication its worker sends nothing; once the subscription is dropped (the
    node takes over), it delivers what is pending."""
    publisher, subscriber = pair
    with publisher.connect() as p, subscriber.connect() as s:
        subscribe(p, receiver, "/publisher")
        # Not link.miss: the test above resolved missing slugs here, whose misses are announced in their time.
        local_id, _ = subscribe(s, receiver, "/subscriber", event_types=["link.created", "link.clicked"])
        # Local rows must not collide with the ids arriving from the publisher.
        s.execute("SELECT setval('linkhooks.deliveries_id_seq', 1000)")
        # Inserts only: the subscriber's copies stay pending, the worst case for a resend.
        p.execute("CREATE PUBLICATION deliveries_pub FOR TABLE linkhooks.deliveries "
                  "WITH (publish = 'insert', publish_via_partition_root = true)")
        s.execute(f"CREATE SUBSCRIPTION deliveries_sub CONNECTION 'host={publisher.dir} port={publisher.port} "
                  "user=postgres dbname=postgres' PUBLICATION deliveries_pub")
        try:
            wait_for(lambda: s.execute("SELECT bool_and(srsubstate = 'r') FROM pg_subscription_rel").fetchone()[0],
                     message="the subscription to be ready")
            link(p, "rep")
            for _ in range(3):
                p.execute("SELECT linkhooks.record_click('rep', user_agent => %s)", [IPHONE])
            wait_for(lambda: len(receiver.received("/publisher")) == 4, message="the publisher's worker to deliver")
            wait_for(lambda: s.execute("SELECT count(*) FROM linkhooks.deliveries").fetchone()[0] == 4,
                     message="the deliveries to be applied on the subscriber")

            # Wake the subscriber's worker with a local event and let it run a loop after that.
            woken = s.execute("SELECT clock_timestamp()").fetchone()[0]
            s.execute("SELECT linkhooks.send_test(%s)", [local_id])
            wait_for(lambda: s.execute("SELECT last_loop > %s FROM linkhooks.worker_status()", [woken]).fetchone()[0],
                     message="the subscriber's worker to run after the wake-up")
            assert receiver.received("/subscriber") == []
            assert s.execute("SELECT count(*), sum(attempts) FROM linkhooks.deliveries "
                             "WHERE status = 'pending'").fetchone() == (5, 0)
            assert "deliveries is replicated into this database" in subscriber.log()
        finally:
            s.execute("DROP SUBSCRIPTION deliveries_sub")
            p.execute("DROP PUBLICATION deliveries_pub")

        # Taken over: the same worker now sends what is pending (which shows the rows were sendable all along).
        s.execute("SELECT linkhooks.send_test(%s)", [local_id])

        def takeover_state():
            """What the subscriber holds and sent, for a timeout's message."""
            rows = s.execute("SELECT id, status, attempts, next_attempt_at, last_error FROM linkhooks.deliveries "
                             "ORDER BY id").fetchall()
            sent = [r["json"]["type"] for r in receiver.received("/subscriber")]
            lines = [line for line in subscriber.log().splitlines() if "linkhooks" in line][-10:]
            return f"the subscriber to deliver after takeover: rows {rows}, sent {sent}, log {lines}"

        wait_for(lambda: s.execute("SELECT bool_and(status = 'delivered') FROM linkhooks.deliveries").fetchone()[0],
                 message=takeover_state)
        # Every pending event arrived, the publisher's and the local ones (at least once: a retry may repeat one).
        assert {r["json"]["id"] for r in receiver.received("/subscriber")} == {
            str(e) for (e,) in s.execute("SELECT event_id FROM linkhooks.deliveries").fetchall()}
        assert {r["json"]["type"] for r in receiver.received("/subscriber")} == {
            "link.created", "link.clicked", "webhook.test"}


def test_a_subscriber_taking_over_sends_rows_due_before_what_it_sent_itself(pair, receiver):
    """A node that delivered its own events, then received older pending rows by replication, sends them once it
    takes over: where its worker's claim starts walking (past what it already sent) must not hide them."""
    publisher, subscriber = pair
    with publisher.connect() as p, subscriber.connect() as s:
        # The publisher holds an event for a paused subscription: pending, due now.
        subscribe(p, receiver, "/held-upstream", id=50)
        p.execute("UPDATE linkhooks.subscriptions SET paused = true WHERE id = 50")
        link(p, "older")
        assert p.execute("SELECT count(*) FROM linkhooks.deliveries "
                         "WHERE subscription_id = 50 AND status = 'pending'").fetchone() == (1,)
        # Later, the subscriber delivers an event of its own to the same subscription id.
        subscribe(s, receiver, "/taker", id=50, event_types=["link.created"])
        s.execute("SELECT setval('linkhooks.deliveries_id_seq', greatest(2000, nextval('linkhooks.deliveries_id_seq')))")
        s.execute("SELECT linkhooks.send_test(50)")
        wait_for(lambda: s.execute("SELECT bool_and(status = 'delivered') FROM linkhooks.deliveries "
                                   "WHERE subscription_id = 50").fetchone()[0], message="the subscriber's own event")
        p.execute("CREATE PUBLICATION held_pub FOR TABLE linkhooks.deliveries WHERE (subscription_id = 50) "
                  "WITH (publish = 'insert', publish_via_partition_root = true)")
        s.execute(f"CREATE SUBSCRIPTION held_sub CONNECTION 'host={publisher.dir} port={publisher.port} "
                  "user=postgres dbname=postgres' PUBLICATION held_pub")
        try:
            wait_for(lambda: s.execute("SELECT count(*) FROM linkhooks.deliveries WHERE subscription_id = 50 "
                                       "AND status = 'pending'").fetchone()[0] == 1,
                     message="the publisher's held row copied")
        finally:
            s.execute("DROP SUBSCRIPTION held_sub")
            p.execute("DROP PUBLICATION held_pub")

        s.execute("SELECT linkhooks.send_test(50)")
        wait_for(lambda: s.execute("SELECT bool_and(status = 'delivered') FROM linkhooks.deliveries "
                                   "WHERE subscription_id = 50").fetchone()[0],
                 message=lambda: "the copied row sent after takeover: " + str(s.execute(
                     "SELECT id, status, next_attempt_at FROM linkhooks.deliveries WHERE subscription_id = 50 "
                     "ORDER BY id").fetchall()))
        assert sorted(r["json"]["type"] for r in receiver.received("/taker")) == [
            "link.created", "webhook.test", "webhook.test"]
        assert receiver.received("/held-upstream") == []
