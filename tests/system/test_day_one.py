"""What a DBA and an on-call engineer meet on day one (issue 21): errors that
name the field without a Rust backtrace, settings checked when set, log lines
for reloads and disables, retry_now, clearing dead letters, and a writer that
can do what the README shows."""

import contextlib

import psycopg
import pytest

from conftest import subscribe
from harness import wait_for
from test_access import login, roles  # noqa: F401 (the roles fixture)
from test_links import IPHONE, link


def error_of(conn, statement, params=()):
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(statement, params)
    return caught.value


RUST_FRAMES = ("pgrx_pg_sys", "core::panicking", "std::panicking", "stack backtrace", "rust_begin_unwind")


def test_errors_name_the_field_and_carry_no_backtrace(cluster, db):
    """The cluster runs with RUST_BACKTRACE=1 (see harness.Cluster.start), as from a Rust developer's shell."""
    link(db, "sale", "https://acme.com/sale")
    for statement, message in [
        ("SELECT linkhooks.record_click(NULL)", "invalid slug: must not be null"),
        ("SELECT linkhooks.record_click('sale', source => 'email')", "invalid source: must be 'link' or 'qr'"),
        ("SELECT linkhooks.record_click('sale', domain => NULL)", "invalid domain: must not be null"),
        ("INSERT INTO linkhooks.conversions (click_id, name) VALUES (999999, 'x')",
         "invalid click_id: click 999999 does not exist"),
        ("SELECT linkhooks.rotate_secret(999999)", "invalid subscription_id: subscription 999999 does not exist"),
        ("SELECT linkhooks.retry_now()", "invalid delivery_id: give exactly one of delivery_id and subscription_id"),
        ("SELECT linkhooks.retry_now(999999)", "invalid delivery_id: delivery 999999 does not exist"),
    ]:
        err = error_of(db, statement)
        assert message in err.diag.message_primary, (statement, err.diag.message_primary)
        detail = err.diag.message_detail or ""
        assert not any(frame in detail for frame in RUST_FRAMES), (statement, detail)
    log = cluster.log()
    assert "invalid slug: must not be null" in log
    assert not any(frame in log for frame in RUST_FRAMES)
    assert db.execute("SELECT count(*) FROM linkhooks.clicks").fetchone()[0] == 0


@contextlib.contextmanager
def server_setting(cluster, name, value):
    """ALTER SYSTEM + reload, undone afterwards; waits until the worker has reloaded each time."""
    def reload(statement):
        with cluster.connect() as c:
            # A worker that is (re)starting would read the new value without logging a reload.
            wait_for(lambda: c.execute("SELECT running FROM linkhooks.worker_status()").fetchone()[0],
                     message="the worker running")
            before = cluster.log().count("worker reloaded its settings")
            c.execute(statement)
            c.execute("SELECT pg_reload_conf()")
        wait_for(lambda: cluster.log().count("worker reloaded its settings") > before, message="the worker's reload logged")
    reload(f"ALTER SYSTEM SET {name} = '{value}'")
    try:
        yield
    finally:
        reload(f"ALTER SYSTEM RESET {name}")


def test_settings_are_checked_when_set_and_the_workers_cannot_be_set_per_session(cluster, db):
    for name, value, detail in [
        ("linkhooks.retry_schedule", "banana", "must be a comma-separated list of delays"),
        ("linkhooks.retention", "7 dayz", "must be a duration like '30s', '7d' or '7 days'"),
        ("linkhooks.maintenance_interval", "0s", "must be longer than zero"),
        ("linkhooks.partition_interval", "30s", "must be at least 1 minute"),
        ("linkhooks.click_retention", "forever", "must be 'never' or a duration like '30s'"),
        ("linkhooks.dead_letter_retention", "until replayed", "must be 'never' or a duration like '30s'"),
    ]:
        err = error_of(db, f"ALTER SYSTEM SET {name} = '{value}'")
        assert f'invalid value for parameter "{name}"' in err.diag.message_primary
        assert detail in (err.diag.message_detail or ""), err.diag.message_detail
    # 0.4.0: a superuser's session-level SET allowed a loopback subscription the worker then never delivered.
    for name, value in [("linkhooks.allow_private_targets", "on"), ("linkhooks.require_https", "off"),
                        ("linkhooks.retention", "1d")]:
        with pytest.raises(psycopg.errors.CantChangeRuntimeParam):
            db.execute(f"SET {name} = '{value}'")


def test_retention_takes_postgres_interval_syntax(cluster, db, receiver):
    """0.4.0 accepted '7 days' and pruned nothing. Ten days, unlike the default 7d, keeps an 8-day-old row."""
    subscribe(db, receiver, "/kept", event_types=["link.clicked"], filters={"exclude_bots": False})
    link_id = link(db, "k")
    with server_setting(cluster, "linkhooks.retention", "10 days"):
        db.execute("INSERT INTO linkhooks.clicks (link_id) SELECT %s FROM generate_series(1, 2)", [link_id])
        wait_for(lambda: db.execute("SELECT count(*) FROM linkhooks.deliveries WHERE status = 'delivered'").fetchone()[0] == 2,
                 message="both delivered")
        old, recent = [r[0] for r in db.execute("SELECT id FROM linkhooks.deliveries ORDER BY id")]
        # Made and delivered that long ago (a day no partition covers: the rows move to the default partition).
        for id_, age in ((old, "12 days"), (recent, "8 days")):
            db.execute("UPDATE linkhooks.deliveries SET created_at = now() - %s::interval, delivered_at = now() - %s::interval "
                       "WHERE id = %s", [age, age, id_])
        db.execute("SELECT linkhooks.run_maintenance()")
        assert [r[0] for r in db.execute("SELECT id FROM linkhooks.deliveries")] == [recent]
    assert "invalid linkhooks.retention" not in cluster.log()


def test_dead_letters_are_kept_until_replayed_or_for_their_own_retention(cluster, db, receiver):
    sub_id, secret = subscribe(db, receiver, "/dead", event_types=["link.clicked"], filters={"exclude_bots": False},
                               max_attempts=1)
    receiver.expect("/dead", [secret], script=[(500, {}, 0)] * 3)
    db.execute("INSERT INTO linkhooks.clicks (link_id) SELECT %s FROM generate_series(1, 3)", [link(db, "dl")])
    letters = "SELECT delivery_id FROM linkhooks.dead_letters WHERE subscription_id = %s ORDER BY 1"
    wait_for(lambda: len(db.execute(letters, [sub_id]).fetchall()) == 3, message="three dead letters")
    fresh, replayed, old = [r[0] for r in db.execute(letters, [sub_id])]
    replay_id = db.execute("SELECT linkhooks.replay(%s)", [replayed]).fetchone()[0]
    wait_for(lambda: db.execute("SELECT status FROM linkhooks.deliveries WHERE id = %s", [replay_id]).fetchone()[0] == "delivered",
             message="the replay delivered")
    db.execute("UPDATE linkhooks.dead_letters SET replayed_at = now() - interval '8 days' WHERE delivery_id = %s", [replayed])
    db.execute("UPDATE linkhooks.dead_letters SET died_at = now() - interval '40 days' WHERE delivery_id = %s", [old])
    kept = "SELECT d.id FROM linkhooks.deliveries d WHERE d.id = ANY(%s) ORDER BY 1"

    # By default a dead letter stays until replayed, then as long as deliveries (linkhooks.retention, 7d).
    db.execute("SELECT linkhooks.run_maintenance()")
    assert [r[0] for r in db.execute(letters, [sub_id])] == [fresh, old]
    assert [r[0] for r in db.execute(kept, [[fresh, replayed, old, replay_id]])] == [fresh, old, replay_id], \
        "the replayed dead delivery goes with its dead letter; the replay is a delivery of its own"
    with server_setting(cluster, "linkhooks.dead_letter_retention", "30d"):
        db.execute("SELECT linkhooks.run_maintenance()")
        assert [r[0] for r in db.execute(letters, [sub_id])] == [fresh]
        assert [r[0] for r in db.execute(kept, [[fresh, old]])] == [fresh]


def test_auto_disables_are_logged_without_the_url(cluster, db, receiver):
    sub_id, _ = subscribe(db, receiver, "/logged-gone", event_types=["link.clicked"], filters={"exclude_bots": False})
    receiver.expect("/logged-gone", receiver.paths["/logged-gone"]["secrets"], script=[(410, {}, 0)])
    db.execute("INSERT INTO linkhooks.clicks (link_id) VALUES (%s)", [link(db, "g")])
    wait_for(lambda: f"subscription {sub_id} (logged-gone) disabled: endpoint answered 410 Gone" in cluster.log(),
             message="the disable logged")
    assert receiver.url("/logged-gone") not in cluster.log()


def test_retry_now_delivers_a_backed_off_delivery_and_admins_clear_dead_letters(cluster, db, roles, receiver):  # noqa: F811
    sub_id, _ = subscribe(db, receiver, "/later", event_types=["link.clicked"], filters={"exclude_bots": False})
    receiver.expect("/later", receiver.paths["/later"]["secrets"], script=[(500, {}, 0)])
    with server_setting(cluster, "linkhooks.retry_schedule", "1h"):
        db.execute("INSERT INTO linkhooks.clicks (link_id) VALUES (%s)", [link(db, "r")])
        delivery_id = wait_for(lambda: db.execute(
            "SELECT id FROM linkhooks.deliveries WHERE status = 'pending' AND attempts = 1 "
            "AND next_attempt_at > now() + interval '30 minutes'").fetchone(), message="the retry an hour out")[0]
        with login(cluster, "lh_admin") as admin:
            assert admin.execute("SELECT linkhooks.retry_now(subscription_id => %s)", [sub_id]).fetchone()[0] == 1
            wait_for(lambda: db.execute("SELECT status FROM linkhooks.deliveries WHERE id = %s",
                                        [delivery_id]).fetchone()[0] == "delivered", message="delivered after retry_now")
            err = error_of(admin, "SELECT linkhooks.retry_now(%s)", [delivery_id])
            assert f"delivery {delivery_id} is delivered; only pending deliveries can be retried" in err.diag.message_primary
    assert len(receiver.received("/later")) == 2

    # A dead letter the on-call engineer has dealt with is cleared by an admin, not by a writer.
    receiver.expect("/later", receiver.paths["/later"]["secrets"], script=[(500, {}, 0)] * 3)
    db.execute("INSERT INTO linkhooks.clicks (link_id) VALUES (%s)", [link(db, "d")])
    dead = wait_for(lambda: db.execute("SELECT delivery_id FROM linkhooks.dead_letters").fetchone(), message="a dead letter")[0]
    with login(cluster, "lh_writer") as writer:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            writer.execute("DELETE FROM linkhooks.dead_letters")
    with login(cluster, "lh_admin") as admin:
        assert admin.execute("DELETE FROM linkhooks.dead_letters WHERE delivery_id = %s", [dead]).rowcount == 1


def test_a_writer_can_do_what_the_readme_shows(cluster, db, roles, receiver):  # noqa: F811
    subscribe(db, receiver, "/w", event_types=["link.clicked", "qr.scanned", "link.converted"])
    link(db, "sale", "https://acme.com/sale")
    with login(cluster, "lh_writer") as w:
        w.execute("INSERT INTO linkhooks.clicks (link_id, ip, user_agent, source) "
                  "SELECT id, '198.51.100.7', %s, 'qr' FROM linkhooks.links WHERE slug = 'sale'", [IPHONE])
        url, click_id, event_id = w.execute(
            "SELECT * FROM linkhooks.record_click_returning('sale', user_agent => %s)", [IPHONE]).fetchone()
        assert url == "https://acme.com/sale" and click_id is not None and event_id is not None
        w.execute("INSERT INTO linkhooks.conversions (click_id, name, amount, currency) VALUES (%s, 'purchase', 49.90, 'USD')",
                  [click_id])
        assert w.execute("SELECT * FROM linkhooks.record_click_returning('nope')").fetchone() == (None, None, None)
    wait_for(lambda: len(receiver.received("/w")) == 3, message="three events delivered")
    by_type = {r["json"]["type"]: r for r in receiver.received("/w")}
    assert set(by_type) == {"qr.scanned", "link.clicked", "link.converted"}
    # The ids returned are the ones the webhooks carry.
    assert by_type["link.clicked"]["headers"]["webhook-id"] == str(event_id)
    assert by_type["link.converted"]["json"]["data"]["conversion"]["click_id"] == click_id


def test_country_codes_and_landing_urls_are_checked(db, receiver):
    subscribe(db, receiver, "/de", event_types=["link.clicked"], filters={"countries": ["DE"], "exclude_bots": False})
    link(db, "geo")
    link(db, "off", disabled=True)
    for call, message in [
        ("SELECT linkhooks.record_click('geo', country => 'USA')",
         "invalid country: must be a two-letter ISO 3166-1 code such as US (got 'USA')"),
        ("SELECT linkhooks.record_click('geo', landing_url => 'not a url')",
         "invalid landing_url: must be an absolute http(s) URL"),
        ("SELECT linkhooks.record_click('geo', landing_url => 'javascript:alert(1)')",
         "invalid landing_url: must be an absolute http(s) URL"),
        # Refused the same way when the link is unknown or inactive, and no miss is counted.
        ("SELECT linkhooks.record_click('nosuch', country => 'USA')",
         "invalid country: must be a two-letter ISO 3166-1 code such as US (got 'USA')"),
        ("SELECT linkhooks.record_click('off', source => 'email')", "invalid source: must be 'link' or 'qr' (got 'email')"),
        ("SELECT linkhooks.record_click('off', city => repeat('c', 201))", "invalid city"),
    ]:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=message.replace("(", r"\(").replace(")", r"\)")):
            db.execute(call)
    assert db.execute("SELECT count(*) FROM linkhooks.clicks").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM linkhooks.link_misses").fetchone()[0] == 0
    # A lower-case code is the same country: stored upper-case, and it matches the subscription's filter.
    db.execute("SELECT linkhooks.record_click('geo', country => 'de', landing_url => 'https://acme.com/geo?utm_source=x')")
    assert db.execute("SELECT country FROM linkhooks.clicks").fetchone()[0] == "DE"
    [event] = wait_for(lambda: receiver.received("/de"), message="the DE click delivered")
    assert event["json"]["data"]["click"]["country"] == "DE"


def test_links_inserted_without_a_slug_get_a_generated_one(db):
    slugs = [r[0] for r in db.execute("INSERT INTO linkhooks.links (destination) "
                                      "SELECT 'https://acme.com/p/' || g FROM generate_series(1, 500) g RETURNING slug")]
    assert len(set(slugs)) == 500
    assert all(len(s) == 7 and s.isalnum() and s.isascii() for s in slugs)
    assert db.execute("SELECT linkhooks.resolve(%s)", [slugs[41]]).fetchone()[0] == "https://acme.com/p/42"
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="invalid slug: must not be null"):
        db.execute("UPDATE linkhooks.links SET slug = NULL WHERE slug = %s", [slugs[0]])


def held(db, sub_id):
    return db.execute("SELECT count(*) FROM linkhooks.deliveries WHERE subscription_id = %s AND status = 'pending'",
                      [sub_id]).fetchone()[0]


def test_events_while_a_subscription_is_disabled_are_held_and_delivered_after_re_enabling(db, receiver):
    """0.4.0: events that happened while a subscription was disabled were never queued for it."""
    sub_id, _ = subscribe(db, receiver, "/off", event_types=["link.clicked"], filters={"exclude_bots": False})
    on_id, _ = subscribe(db, receiver, "/on", event_types=["link.created"])
    receiver.expect("/off", receiver.paths["/off"]["secrets"], script=[(410, {}, 0)])
    link_id = link(db, "off")
    db.execute("INSERT INTO linkhooks.clicks (link_id) VALUES (%s)", [link_id])
    wait_for(lambda: db.execute("SELECT held_since IS NOT NULL AND NOT enabled FROM linkhooks.subscriptions WHERE id = %s",
                                [sub_id]).fetchone()[0], message="disabled by the 410")
    during = [db.execute("INSERT INTO linkhooks.clicks (link_id) VALUES (%s) RETURNING event_id::text", [link_id]).fetchone()[0]
              for _ in range(5)]
    assert held(db, sub_id) == 5
    # A later event for another endpoint arrives while the held ones stay put.
    link(db, "barrier")
    wait_for(lambda: receiver.received("/on"), message="the other endpoint's event")
    assert len(receiver.received("/off")) == 1 and held(db, sub_id) == 5

    # They wait in order of occurrence, the order in which the worker claims due rows.
    due = [r[0] for r in db.execute("SELECT event_id::text FROM linkhooks.deliveries WHERE subscription_id = %s "
                                    "AND status = 'pending' ORDER BY next_attempt_at, id", [sub_id])]
    assert due == during

    db.execute("UPDATE linkhooks.subscriptions SET enabled = true WHERE id = %s", [sub_id])
    wait_for(lambda: len(receiver.received("/off")) == 6, message="the held events delivered")
    assert sorted(r["json"]["id"] for r in receiver.received("/off")[1:]) == sorted(during)
    assert all(r["verified_with"] for r in receiver.received("/off"))


def test_a_paused_subscription_holds_its_events_for_the_hold_window(cluster, db, roles, receiver):  # noqa: F811
    sub_id, _ = subscribe(db, receiver, "/paused", event_types=["link.created"])
    with login(cluster, "lh_admin") as admin:
        admin.execute("UPDATE linkhooks.subscriptions SET paused = true WHERE id = %s", [sub_id])
        link(db, "p1")
        assert held(db, sub_id) == 1
        admin.execute("UPDATE linkhooks.subscriptions SET paused = false WHERE id = %s", [sub_id])
    wait_for(lambda: len(receiver.received("/paused")) == 1, message="the held event delivered after the pause")

    db.execute("UPDATE linkhooks.subscriptions SET paused = true WHERE id = %s", [sub_id])
    link(db, "p2")
    with server_setting(cluster, "linkhooks.hold_window", "1s"):
        # Past the window, held events become dead letters and new ones are no longer queued for it.
        # By our maintenance run or the worker's (every second here), whichever comes first.
        dead = "SELECT count(*) FROM linkhooks.dead_letters WHERE subscription_id = %s"
        wait_for(lambda: db.execute("SELECT linkhooks.run_maintenance()") and
                 db.execute(dead, [sub_id]).fetchone()[0] == 1, message="the held event dead-lettered after the window")
        link(db, "p3")
        assert held(db, sub_id) == 0
        assert db.execute("SELECT last_error FROM linkhooks.dead_letters WHERE subscription_id = %s",
                          [sub_id]).fetchone()[0].startswith("held longer than linkhooks.hold_window")
    db.execute("UPDATE linkhooks.subscriptions SET paused = false WHERE id = %s", [sub_id])
    assert db.execute("SELECT linkhooks.replay_dead_letters(%s)", [sub_id]).fetchone()[0] == 1
    wait_for(lambda: len(receiver.received("/paused")) == 2, message="the dead-lettered event replayed")


def test_an_operations_endpoint_hears_of_disables_and_dead_letters_without_a_loop(db, receiver):
    ops, _ = subscribe(db, receiver, "/ops", event_types=["subscription.disabled", "delivery.dead"])
    everything, _ = subscribe(db, receiver, "/everything")  # NULL event_types: not the operational ones
    victim, _ = subscribe(db, receiver, "/victim", event_types=["webhook.test"])
    receiver.expect("/victim", receiver.paths["/victim"]["secrets"], script=[(500, {}, 0)] * 3 + [(410, {}, 0)])

    def heard(kind):
        return [r["json"]["data"] for r in receiver.received("/ops") if r["json"]["type"] == kind]

    db.execute("SELECT linkhooks.send_test(%s)", [victim])  # three 500s: a dead letter
    [dead] = wait_for(lambda: heard("delivery.dead"), message="delivery.dead for the 500s")
    assert dead["delivery"]["subscription_id"] == victim and dead["delivery"]["event_type"] == "webhook.test"
    assert (dead["delivery"]["attempts"], dead["delivery"]["last_status_code"]) == (3, 500)

    db.execute("SELECT linkhooks.send_test(%s)", [victim])  # 410: disabled, and that event is dead too
    [disabled] = wait_for(lambda: heard("subscription.disabled"), message="subscription.disabled for the 410")
    assert disabled["subscription"]["id"] == victim and disabled["subscription"]["name"] == "victim"
    assert disabled["subscription"]["reason"].startswith("endpoint answered 410 Gone")
    wait_for(lambda: len(heard("delivery.dead")) == 2, message="delivery.dead for the 410")
    assert all(r["verified_with"] for r in receiver.received("/ops"))
    assert db.execute("SELECT count(*) FROM linkhooks.deliveries WHERE subscription_id = %s AND event_type IN "
                      "('subscription.disabled', 'delivery.dead')", [everything]).fetchone()[0] == 0

    # The operations endpoint itself fails: its dead events do not announce themselves.
    receiver.expect("/ops", receiver.paths["/ops"]["secrets"], script=[(500, {}, 0)] * 6)
    other, _ = subscribe(db, receiver, "/other", event_types=["webhook.test"])
    receiver.expect("/other", receiver.paths["/other"]["secrets"], script=[(410, {}, 0)])
    db.execute("SELECT linkhooks.send_test(%s)", [other])
    wait_for(lambda: db.execute("SELECT count(*) FROM linkhooks.dead_letters WHERE subscription_id = %s",
                                [ops]).fetchone()[0] == 2, message="both operational events dead at /ops")
    count = "SELECT count(*) FROM linkhooks.deliveries WHERE event_type = 'delivery.dead'"
    assert db.execute(count).fetchone()[0] == 3  # the 500s, the 410, and /other's 410; none for /ops' own
    db.execute("SELECT linkhooks.run_maintenance()")
    assert db.execute(count).fetchone()[0] == 3


def test_recover_sends_what_a_subscription_missed_once_with_the_original_ids(db, receiver):
    """Events from before a subscription existed (or that its filters left out then): recover()
    queues what the clicks and the queue still hold, each with its original webhook-id."""
    subscribe(db, receiver, "/other")  # every event, IPs anonymized (the default)
    spring = link(db, "rec", campaign="spring")
    for source in ("link", "link", "qr"):
        db.execute("INSERT INTO linkhooks.clicks (link_id, user_agent, ip, country, source) "
                   "VALUES (%s, %s, '203.0.113.42', 'DE', %s)", [spring, IPHONE, source])
    db.execute("UPDATE linkhooks.links SET tags = '{x}' WHERE id = %s", [spring])
    autumn = link(db, "elsewhere", campaign="autumn")
    db.execute("INSERT INTO linkhooks.clicks (link_id, user_agent) VALUES (%s, %s)", [autumn, IPHONE])
    wait_for(lambda: len(receiver.received("/other")) == 7, message="the events of the other endpoint")
    originals = {r["json"]["id"]: r["json"] for r in receiver.received("/other")}

    late, _ = subscribe(db, receiver, "/late", filters={"campaign": "spring"}, ip_mode="full")
    result = db.execute("SELECT linkhooks.recover(%s, now() - interval '1 hour')", [late]).fetchone()[0]
    assert result == {"queued": 5, "complete": True, "continue_from": None}
    # Queued in order of occurrence (the order the worker claims them in).
    assert [r[0] for r in db.execute("SELECT event_type FROM linkhooks.deliveries WHERE subscription_id = %s ORDER BY id",
                                     [late])] == ["link.created", "link.clicked", "link.clicked", "qr.scanned", "link.updated"]
    wait_for(lambda: len(receiver.received("/late")) == 5, message="the recovered events")
    for got in (r["json"] for r in receiver.received("/late")):
        original = originals[got["id"]]
        assert got["type"] == original["type"] and got["data"]["link"]["slug"] == "rec"
        if "click" in got["data"]:
            # Rebuilt in this subscription's IP mode; otherwise the same click.
            assert got["data"]["click"]["ip_address"] == "203.0.113.42"
            assert original["data"]["click"]["ip_address"] == "203.0.113.0"
            assert {**got["data"]["click"], "ip_address": None} == {**original["data"]["click"], "ip_address": None}
        else:
            assert got == original
    assert all(r["verified_with"] for r in receiver.received("/late"))
    # Nothing is missing any more: a second call queues nothing.
    assert db.execute("SELECT linkhooks.recover(%s, now() - interval '1 hour')", [late]).fetchone()[0]["queued"] == 0

    for args, message in [
        ((late, "now() - interval '8 days'"), "invalid since: must be within linkhooks.retention (7d) of now"),
        ((late, "now() + interval '1 minute'"), "invalid until: must be after since"),
        ((99999, "now() - interval '1 hour'"), "invalid subscription_id: subscription 99999 does not exist"),
    ]:
        assert message in str(error_of(db, f"SELECT linkhooks.recover(%s, {args[1]})", [args[0]]))
