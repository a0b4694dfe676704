"""The claim starts each subscription's walk of the due index at a floor, so a snapshot held open elsewhere
does not slow it (issue 18). A floor must never pass a row that can still commit: these tests open a
transaction, let the worker claim rows committed after it began (moving the floor past its start), then
make it queue or re-time a delivery and commit. Its row must arrive at once, not at the next sweep (5 min)."""

import time

import psycopg

from conftest import subscribe
from harness import wait_for
from test_day_one import server_setting
from test_links import link


def move_the_floor_past(db, receiver, path, link_id, since):
    """Clicks, each delivered before the next, until one was claimed well after `since` (a monotonic time):
    the worker reads a fresh horizon at least every 20 ms, so its floor is past the moment `since` stands for."""
    sent = 0
    while True:
        db.execute("INSERT INTO linkhooks.clicks (link_id) VALUES (%s)", [link_id])
        sent += 1
        wait_for(lambda: len(receiver.received(path)) >= sent, message="a click delivered")
        if time.monotonic() - since > 0.2:
            return sent


def assert_arrives_with_the_rest(receiver, path, referer, sent):
    """The late click (told apart by its referer) arrives at once, beside the `sent` clicks before it."""
    wait_for(lambda: any(r["json"]["data"]["click"]["referer"] == referer for r in receiver.received(path)),
             timeout=10, message=f"the click from {referer} delivered")
    assert len(receiver.received(path)) == sent + 1


def test_a_transaction_begun_before_the_floor_moved_still_gets_its_delivery(cluster, db, receiver):
    subscribe(db, receiver, "/late", event_types=["link.clicked"], filters={"exclude_bots": False})
    link_id = link(db, "late")
    with cluster.connect() as slow:
        slow.execute("BEGIN")
        slow.execute("SELECT 1")  # the transaction has started (no id yet)
        sent = move_the_floor_past(db, receiver, "/late", link_id, time.monotonic())
        slow.execute("INSERT INTO linkhooks.clicks (link_id, referer) VALUES (%s, 'https://late.example/')", [link_id])
        slow.execute("COMMIT")
    assert_arrives_with_the_rest(receiver, "/late", "https://late.example/", sent)


def test_retry_now_in_an_old_transaction_is_not_left_below_the_floor(cluster, db, receiver):
    subscribe(db, receiver, "/later", event_types=["link.clicked"], filters={"exclude_bots": False})
    receiver.expect("/later", receiver.paths["/later"]["secrets"], script=[(500, {}, 0)])
    link_id = link(db, "r")
    with server_setting(cluster, "linkhooks.retry_schedule", "1h"):
        db.execute("INSERT INTO linkhooks.clicks (link_id) VALUES (%s)", [link_id])
        delivery_id = wait_for(lambda: db.execute(
            "SELECT id FROM linkhooks.deliveries WHERE status = 'pending' AND attempts = 1").fetchone(),
            message="the retry an hour out")[0]
        with cluster.connect() as slow:
            slow.execute("BEGIN")
            slow.execute("SELECT 1")
            move_the_floor_past(db, receiver, "/later", link_id, time.monotonic())
            assert slow.execute("SELECT linkhooks.retry_now(%s)", [delivery_id]).fetchone()[0] == 1
            slow.execute("COMMIT")
        wait_for(lambda: db.execute("SELECT status FROM linkhooks.deliveries WHERE id = %s",
                                    [delivery_id]).fetchone()[0] == "delivered", timeout=10,
                 message="delivered after retry_now")


def test_a_prepared_transaction_holds_the_floors_until_it_commits(cluster, db, receiver):
    subscribe(db, receiver, "/prepared", event_types=["link.clicked"], filters={"exclude_bots": False})
    link_id = link(db, "p")
    with cluster.connect() as slow:
        slow.execute("BEGIN")
        slow.execute("INSERT INTO linkhooks.clicks (link_id, referer) VALUES (%s, 'https://prepared.example/')",
                     [link_id])
        slow.execute("PREPARE TRANSACTION 'lh_floor'")
    try:
        # Prepared, it has no start time the worker could read: other deliveries go on meanwhile.
        sent = move_the_floor_past(db, receiver, "/prepared", link_id, time.monotonic())
    finally:
        db.execute("COMMIT PREPARED 'lh_floor'")
    assert_arrives_with_the_rest(receiver, "/prepared", "https://prepared.example/", sent)


def test_a_held_snapshot_does_not_stop_delivery(cluster, db, receiver):
    subscribe(db, receiver, "/held", event_types=["link.clicked"], filters={"exclude_bots": False})
    link_id = link(db, "h")
    with cluster.connect() as analyst:
        analyst.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with analyst.transaction():
            before = analyst.execute("SELECT count(*) FROM linkhooks.deliveries").fetchone()[0]
            db.execute("INSERT INTO linkhooks.clicks (link_id) SELECT %s FROM generate_series(1, 300)", [link_id])
            wait_for(lambda: len(receiver.received("/held")) == 300, message="300 clicks delivered")
            wait_for(lambda: db.execute("SELECT count(*) FILTER (WHERE status = 'delivered') FROM linkhooks.deliveries "
                                        "WHERE event_type = 'link.clicked'").fetchone()[0] == 300,
                     message="300 rows recorded delivered")
            assert analyst.execute("SELECT count(*) FROM linkhooks.deliveries").fetchone()[0] == before
