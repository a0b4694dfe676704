"""clicks, deliveries and delivery_attempts are partitioned by time (issue 18): partitions
are made ahead and dropped behind by the extension's own maintenance,
retention drops only what is due, and no row is refused or lost on the way. Tests that move the clock
run maintain_partitions with an as_of of their choice in a database of their
own, where no worker runs maintenance with the real clock."""

import os
import threading
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import psycopg
import pytest

from conftest import database, drop_database, subscribe
from harness import wait_for
from test_links import IPHONE, link
from test_upgrade import run_as_postgres

DAY = timedelta(days=1)
T0 = datetime(2026, 1, 10, 12, 0, tzinfo=timezone.utc)


def partitions(db):
    return [(name, start, end) for name, start, end in db.execute(
        "SELECT partition, range_start, range_end FROM linkhooks.partitions WHERE table_name = 'clicks'").fetchall()]


def maintain(db, as_of, keep=None, width="1 day", table="clicks"):
    return db.execute("SELECT linkhooks.maintain_partitions(%s, %s, %s::interval, %s::interval)",
                      [table, as_of, width, keep]).fetchone()[0]


def clicks_by_partition(db):
    return db.execute("SELECT tableoid::regclass::text, id FROM linkhooks.clicks ORDER BY id").fetchall()


@pytest.fixture
def own_db(cluster):
    with database(cluster, "lh_partitions") as conn:
        conn.execute("CREATE EXTENSION pg_linkhooks")
        yield conn
    drop_database(cluster, "lh_partitions")


def day(n):
    """Midnight UTC, n days after T0's."""
    return datetime(2026, 1, 10, tzinfo=timezone.utc) + n * DAY


def test_the_worker_keeps_partitions_ahead_and_clicks_deliveries_and_attempts_land_in_them(db, receiver):
    def covered(table):
        return db.execute("SELECT count(*) FROM linkhooks.partitions WHERE table_name = %s AND range_start <= "
                          "now() + interval '2 days' AND range_end > now() + interval '2 days'", [table]).fetchone()[0]
    for table in ("clicks", "deliveries", "delivery_attempts"):
        wait_for(lambda: covered(table) == 1, message=f"a partition of {table} for two days ahead, made by the worker")
    subscribe(db, receiver, "/p", event_types=["link.clicked"], filters={"exclude_bots": False})
    link(db, "p")
    db.execute("SELECT linkhooks.record_click('p', user_agent => %s)", [IPHONE])
    wait_for(lambda: db.execute("SELECT count(*) FROM linkhooks.delivery_attempts").fetchone()[0] == 1,
             message="the click delivered")
    for table, column in (("clicks", "clicked_at"), ("deliveries", "created_at"), ("delivery_attempts", "started_at")):
        partition, at = db.execute(f"SELECT tableoid::regclass::text, {column} FROM linkhooks.{table}").fetchone()
        assert partition == db.execute("SELECT 'linkhooks.' || partition FROM linkhooks.partitions WHERE table_name = %s "
                                       "AND %s >= range_start AND %s < range_end", [table, at, at]).fetchone()[0]
        assert not partition.endswith("_default"), table


def test_partitions_are_made_ahead_aligned_to_utc_days(own_db):
    assert maintain(own_db, T0)["partitions_created"] == 4
    assert partitions(own_db) == [(f"clicks_p202601{10 + n}_000000", day(n), day(n + 1)) for n in range(4)] + \
        [("clicks_default", None, None)]
    # A later run makes only what is missing, from where the last one ended.
    assert maintain(own_db, T0 + DAY)["partitions_created"] == 1
    assert partitions(own_db)[-2][1:] == (day(4), day(5))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="width must be at least 1 minute"):
        maintain(own_db, T0, width="30 seconds")


def test_retention_drops_only_what_is_due_and_keeps_the_counts(own_db):
    maintain(own_db, T0)
    link_id = link(own_db, "r")
    times = {"old": T0 - 300 * DAY, "day0": T0, "day1": T0 + DAY, "day2": T0 + 2 * DAY}
    for label, at in times.items():
        own_db.execute("INSERT INTO linkhooks.clicks (link_id, clicked_at, user_agent) VALUES (%s, %s, %s)",
                       [link_id, at, IPHONE])
    ids = dict(zip(times, [r[0] for r in own_db.execute("SELECT id FROM linkhooks.clicks ORDER BY id")]))
    assert dict(clicks_by_partition(own_db))["linkhooks.clicks_default"] == ids["old"], \
        "a click older than every partition is kept in the default partition"
    own_db.execute("SELECT linkhooks.run_aggregation()")

    # Two days later with a retention of 12 hours: day 0 ended 36 hours before, day 1
    # exactly 12 hours before (due), day 2 has not ended.
    done = maintain(own_db, T0 + 2 * DAY, keep="12 hours")
    assert (done["partitions_dropped"], done["rows_pruned"]) == (2, 1)
    assert [r[0] for r in own_db.execute("SELECT id FROM linkhooks.clicks ORDER BY id")] == [ids["day2"]]
    assert partitions(own_db)[0][1] == day(2)
    # Detached, the two days wait as tables of their own; the next run removes their files.
    expired = "SELECT count(*) FROM pg_class WHERE relname LIKE 'clicks\\_p%\\_expired'"
    assert own_db.execute(expired).fetchone()[0] == 2
    assert maintain(own_db, T0 + 2 * DAY, keep="12 hours")["expired_removed"] == 2
    assert own_db.execute(expired).fetchone()[0] == 0
    # The counts the views read stay: retention drops raw clicks, not what was counted.
    assert own_db.execute("SELECT clicks FROM linkhooks.link_stats").fetchone()[0] == 4


def test_a_click_no_partition_covers_is_kept_then_moved_into_a_partition_of_its_time(own_db):
    maintain(own_db, T0)
    link_id = link(own_db, "f")
    past, future = T0 - 40 * DAY, T0 + 10 * DAY
    inserted = own_db.execute("INSERT INTO linkhooks.clicks (link_id, clicked_at) VALUES (%s, %s), (%s, %s) "
                              "RETURNING id, event_id, clicked_at", [link_id, past, link_id, future]).fetchall()
    (past_id, _, _), (future_id, _, _) = inserted
    assert clicks_by_partition(own_db) == [("linkhooks.clicks_default", past_id), ("linkhooks.clicks_default", future_id)]
    # The next run gives the old click a partition of its day; the future one waits for its time.
    maintain(own_db, T0)
    assert clicks_by_partition(own_db) == [("linkhooks.clicks_p20251201_000000", past_id),
                                           ("linkhooks.clicks_default", future_id)]
    maintain(own_db, future)
    assert clicks_by_partition(own_db) == [("linkhooks.clicks_p20251201_000000", past_id),
                                           ("linkhooks.clicks_p20260120_000000", future_id)]
    assert own_db.execute("SELECT id, event_id, clicked_at FROM linkhooks.clicks ORDER BY id").fetchall() == inserted
    # A time no partition can hold is refused, naming the column.
    for endless in ("infinity", "-infinity"):
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="invalid clicked_at: must be a time, not infinity"):
            own_db.execute("INSERT INTO linkhooks.clicks (link_id, clicked_at) VALUES (%s, %s)", [link_id, endless])
    # So is a time before 2000: 44 BC and 44 AD would both be named clicks_p00440315_000000, and the second
    # partition, failing, would stop every maintenance run after it.
    for ancient in ("0044-03-15 00:00 UTC BC", "1999-12-31 23:59:59.999999 UTC"):
        with pytest.raises(psycopg.errors.InvalidParameterValue,
                           match="invalid clicked_at: must be on or after 2000-01-01 00:00 UTC"):
            own_db.execute("INSERT INTO linkhooks.clicks (link_id, clicked_at) VALUES (%s, %s), (%s, now())",
                           [link_id, ancient, link_id])
    first = own_db.execute("INSERT INTO linkhooks.clicks (link_id, clicked_at) VALUES (%s, '2000-01-01 00:00 UTC') "
                           "RETURNING id", [link_id]).fetchone()[0]
    maintain(own_db, T0)
    assert ("linkhooks.clicks_p20000101_000000", first) in clicks_by_partition(own_db)


def test_a_click_a_dba_trigger_moves_out_of_its_partition_is_still_refused(own_db):
    """PostgreSQL checks a partition's constraint again after the BEFORE ROW triggers; the clicks trigger hands each
    statement that check compiled once per session. A DBA's trigger that moves a click into another day must
    still get PostgreSQL's error, in every statement, each partition by its own bounds (a click of the 11th moved to
    the 10th is refused though the 10th's check is compiled already), and rows that stay are stored."""
    maintain(own_db, T0)
    link_id = link(own_db, "moved")
    own_db.execute("CREATE FUNCTION public.day_before() RETURNS trigger LANGUAGE plpgsql AS "
                   "$$ BEGIN NEW.clicked_at := NEW.clicked_at - interval '1 day'; RETURN NEW; END $$")
    own_db.execute("CREATE TRIGGER zz_day_before BEFORE INSERT ON linkhooks.clicks "
                   "FOR EACH ROW EXECUTE FUNCTION public.day_before()")  # fires after clicks_events
    one_row = "INSERT INTO linkhooks.clicks (link_id, clicked_at) VALUES (%s, %s)"
    two_rows = "INSERT INTO linkhooks.clicks (link_id, clicked_at) VALUES (%s, %s), (%s, %s)"
    for n, at in enumerate([T0, T0, T0 + DAY, T0]):
        with pytest.raises(psycopg.errors.FeatureNotSupported,
                           match="moving row to another partition during a BEFORE FOR EACH ROW trigger") as refused:
            if n < 3:
                own_db.execute(one_row, [link_id, at])
            else:
                own_db.execute(two_rows, [link_id, at, link_id, at])
        assert f'the row was to be in partition "linkhooks.clicks_p{at:%Y%m%d}_000000"' in refused.value.diag.message_detail
    own_db.execute("DROP TRIGGER zz_day_before ON linkhooks.clicks")
    own_db.execute(two_rows, [link_id, T0, link_id, T0 + DAY])
    own_db.execute(one_row, [link_id, T0])
    assert [p for p, _ in clicks_by_partition(own_db)] == [
        "linkhooks.clicks_p20260110_000000", "linkhooks.clicks_p20260111_000000", "linkhooks.clicks_p20260110_000000"]
    # A session keeps the checks of 16 partitions: one statement over 20 days, twice, drops checks its own
    # result relations still use. They stay alive to the statement's end, and each row is where it belongs.
    for n in range(0, 20, 3):
        maintain(own_db, T0 + n * DAY)
    own_db.execute("TRUNCATE linkhooks.clicks")
    own_db.execute("INSERT INTO linkhooks.clicks (link_id, clicked_at) "
                   "SELECT %s, %s + (n %% 20) * interval '1 day' FROM generate_series(0, 39) n", [link_id, T0])
    assert own_db.execute("SELECT tableoid::regclass::text, count(*) FROM linkhooks.clicks "
                          "GROUP BY 1 ORDER BY 1").fetchall() == \
        [(f"linkhooks.clicks_p{T0 + n * DAY:%Y%m%d}_000000", 2) for n in range(20)]


def test_an_update_moving_a_click_to_another_day_emits_claims_and_counts_nothing_again(own_db, receiver):
    """PostgreSQL 15 moves a row into another partition as a delete and an insert, and the insert fires the clicks
    trigger as for a new click. A DBA correcting clicks' times must get them stored as they were: no second event,
    no second claim on max_clicks (which would refuse the update of a full link's click), no second count toward a
    campaign's goal or in the counts. A MERGE that moves one click and inserts another emits for the new one only."""
    maintain(own_db, T0)
    subscribe(own_db, receiver, "/moved", filters={"exclude_bots": False})
    own_db.execute("INSERT INTO linkhooks.campaigns (name, click_goal) VALUES ('spring', 10)")
    limited = link(own_db, "limited", max_clicks=1, campaign="spring")
    unlimited = link(own_db, "unlimited", campaign="spring")
    own_db.execute("INSERT INTO linkhooks.clicks (link_id, clicked_at, user_agent, landing_url) "
                   "VALUES (%s, %s, %s, 'https://acme.com/?utm_source=ig'), (%s, %s, %s, NULL)",
                   [limited, T0, IPHONE, unlimited, T0, IPHONE])
    own_db.execute("SELECT linkhooks.run_aggregation()")

    def clicks():
        return own_db.execute("SELECT tableoid::regclass::text, to_jsonb(c) - 'clicked_at', clicked_at "
                              "FROM linkhooks.clicks c ORDER BY id").fetchall()

    def state():
        own_db.execute("SELECT linkhooks.run_aggregation()")
        return (own_db.execute("SELECT event_type, event_id FROM linkhooks.deliveries ORDER BY id").fetchall(),
                own_db.execute("SELECT slug, click_count FROM linkhooks.links ORDER BY id").fetchall(),
                own_db.execute("SELECT click_count, completed_at FROM linkhooks.campaigns").fetchall(),
                own_db.execute("SELECT slug, clicks FROM linkhooks.link_stats ORDER BY link_id").fetchall())

    before, queued = clicks(), state()
    assert [t for t, _ in queued[0]] == ["link.created", "link.created", "link.clicked", "link.expired", "link.clicked"]
    assert queued[1:] == ([("limited", 1), ("unlimited", 0)], [(2, None)], [("limited", 1), ("unlimited", 1)])
    own_db.execute("UPDATE linkhooks.clicks SET clicked_at = clicked_at + interval '1 day'")
    after = clicks()
    assert [(p, row, at - DAY) for p, row, at in after] == \
        [(p.replace(f"{T0:%Y%m%d}", f"{T0 + DAY:%Y%m%d}"), row, at) for p, row, at in before]
    assert state() == queued

    # One click moved back, one new click: only the new one is an event and a count.
    moved_id = before[1][1]["id"]
    own_db.execute("MERGE INTO linkhooks.clicks c USING (VALUES (%s::bigint), (0)) v(id) ON c.id = v.id "
                   "WHEN MATCHED THEN UPDATE SET clicked_at = c.clicked_at - interval '1 day' "
                   "WHEN NOT MATCHED THEN INSERT (link_id, clicked_at) VALUES (%s, %s)", [moved_id, unlimited, T0])
    events, links, campaigns, counted = state()
    assert events[:5] == queued[0] and [t for t, _ in events[5:]] == ["link.clicked"]
    assert (links, campaigns, counted) == (queued[1], [(3, None)], [("limited", 1), ("unlimited", 2)])
    assert own_db.execute("SELECT tableoid::regclass::text, to_jsonb(c) - 'clicked_at' FROM linkhooks.clicks c "
                          "WHERE id = %s", [moved_id]).fetchone() == before[1][:2]


def test_a_backfill_over_more_days_than_a_session_keeps_compiles_each_partition_check_once(own_db):
    """A transaction of one-row INSERTs going round 20 days' partitions (more than the 16 checks a session keeps
    between transactions) compiles each partition's check once, not once a statement, so its memory stays that of 20
    checks however many clicks it writes; its end keeps 16."""
    for n in range(0, 20, 3):
        maintain(own_db, T0 + n * DAY)
    link_id = link(own_db, "backfill")
    checks = "SELECT count(*) FROM pg_backend_memory_contexts WHERE name = 'pg_linkhooks partition check'"
    with own_db.transaction():
        own_db.execute("DO $$ BEGIN FOR n IN 0..599 LOOP "
                       "INSERT INTO linkhooks.clicks (link_id, clicked_at) "
                       f"VALUES ({link_id}, '{T0.isoformat()}'::timestamptz + (n % 20) * interval '1 day'); "
                       "END LOOP; END $$")
        assert own_db.execute(checks).fetchone()[0] == 20
    assert own_db.execute(checks).fetchone()[0] == 16
    assert own_db.execute("SELECT count(*), count(DISTINCT tableoid) FROM linkhooks.clicks").fetchone() == (600, 20)


def test_attempts_are_kept_for_the_retention_a_partition_at_a_time(own_db):
    assert maintain(own_db, T0, table="delivery_attempts")["partitions_created"] == 4
    for at in (T0 - 300 * DAY, T0, T0 + 2 * DAY):
        own_db.execute("INSERT INTO linkhooks.delivery_attempts (delivery_id, attempt, started_at, duration_ms, status_code) "
                       "VALUES (1, 1, %s, 3.5, 200)", [at])
    done = maintain(own_db, T0 + 2 * DAY, keep="12 hours", table="delivery_attempts")
    assert (done["partitions_dropped"], done["rows_pruned"]) == (2, 1)
    assert own_db.execute("SELECT tableoid::regclass::text, started_at FROM linkhooks.delivery_attempts").fetchall() == \
        [("linkhooks.delivery_attempts_p20260112_000000", T0 + 2 * DAY)]
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="table_name must be clicks, deliveries or delivery_attempts"):
        maintain(own_db, T0, table="links")


def test_retention_drops_a_day_of_deliveries_whole_keeping_the_unfinished_ones(own_db):
    assert maintain(own_db, T0, table="deliveries")["partitions_created"] == 4
    rows = {}
    for name, status, created, delivered in (
            ("delivered long ago", "delivered", T0, T0),
            ("pending", "pending", T0, None),
            ("delivering", "delivering", T0, None),
            ("dead, with its dead letter", "dead", T0, None),
            ("dead, its dead letter pruned", "dead", T0, None),
            ("delivered within the retention", "delivered", T0 + DAY, T0 + 2 * DAY),
            ("of a day retention keeps", "pending", T0 + 2 * DAY, None)):
        rows[name] = own_db.execute(
            "INSERT INTO linkhooks.deliveries (event_id, subscription_id, event_type, body, signed_at, signature, status, "
            "created_at, delivered_at, next_attempt_at) VALUES (linkhooks.uuidv7(), 1, 'link.clicked', '{}', 0, 's', %s, %s, %s, %s) "
            "RETURNING id, event_id, next_attempt_at", [status, created, delivered, created + DAY]).fetchone()
    own_db.execute("INSERT INTO linkhooks.dead_letters (delivery_id, event_id, subscription_id, event_type, attempts) "
                   "SELECT id, event_id, 1, 'link.clicked', 8 FROM linkhooks.deliveries WHERE id = %s",
                   [rows["dead, with its dead letter"][0]])
    done = maintain(own_db, T0 + 2 * DAY, keep="12 hours", table="deliveries")
    assert (done["partitions_dropped"], done["rows_kept"], done["rows_pruned"]) == (2, 4, 0)
    kept = {r[0]: r[1:] for r in own_db.execute(
        "SELECT id, tableoid::regclass::text, event_id, next_attempt_at FROM linkhooks.deliveries").fetchall()}
    default = "linkhooks.deliveries_default"
    assert kept == {
        rows["pending"][0]: (default, *rows["pending"][1:]),
        rows["delivering"][0]: (default, *rows["delivering"][1:]),
        rows["dead, with its dead letter"][0]: (default, *rows["dead, with its dead letter"][1:]),
        rows["delivered within the retention"][0]: (default, *rows["delivered within the retention"][1:]),
        rows["of a day retention keeps"][0]: ("linkhooks.deliveries_p20260112_000000", *rows["of a day retention keeps"][1:]),
    }, "ids, event ids and due times kept; the finished rows and the day they were in are gone"
    # The next run removes the detached days; the kept rows stay where they are, older than any partition.
    again = maintain(own_db, T0 + 2 * DAY, keep="12 hours", table="deliveries")
    assert (again["expired_removed"], again["rows_kept"]) == (2, 0)
    assert own_db.execute("SELECT count(*) FROM linkhooks.deliveries_default").fetchone()[0] == 4
    assert own_db.execute("SELECT min(range_start) FROM linkhooks.partitions WHERE table_name = 'deliveries'").fetchone()[0] \
        == day(2)


def test_hundreds_of_partitions_do_not_make_the_views_look_costly_enough_to_compile(own_db):
    """Joined to an unanalyzed cursor (counted as a thousand rows), 300 partitions' scans
    looked costly enough for JIT, which then took 8 s a query here."""
    assert own_db.execute("SELECT pg_jit_available() AND current_setting('jit')::boolean").fetchone()[0], \
        "this server would compile plans costly enough"
    link_id = link(own_db, "j")
    own_db.execute("SET session_replication_role = replica")
    own_db.execute("INSERT INTO linkhooks.clicks (event_id, link_id, clicked_at) "
                   "SELECT gen_random_uuid(), %s, %s - g * interval '1 day' FROM generate_series(1, 300) g", [link_id, T0])
    own_db.execute("RESET session_replication_role")
    for _ in range(3):  # at most 100 partitions a run
        maintain(own_db, T0)
    assert len(partitions(own_db)) > 300
    for view in ("link_stats", "link_daily_clicks", "uncounted_clicks"):
        plan = own_db.execute(f"EXPLAIN (FORMAT JSON) SELECT * FROM linkhooks.{view}").fetchone()[0][0]
        assert "JIT" not in plan, view
    assert "jit=off" in own_db.execute("SELECT proconfig FROM pg_proc WHERE proname = 'run_aggregation'").fetchone()[0]


def test_the_planner_expects_only_the_clicks_after_the_cursor_to_be_uncounted(own_db):
    """With the cursor in a subquery the planner expected a share of every click (0.5% of
    them) not counted yet; at 10M clicks that plan cost enough to be JIT-compiled, 300 ms a
    query. It reads click_cursor_xmin() when it estimates."""
    maintain(own_db, "now")
    link_id = link(own_db, "e")
    own_db.execute("SET session_replication_role = replica")  # a bulk load, counted before the cursor moves
    own_db.execute("INSERT INTO linkhooks.clicks (event_id, link_id, txid) "
                   "SELECT gen_random_uuid(), %s, pg_current_xact_id() FROM generate_series(1, 200000)", [link_id])
    own_db.execute("RESET session_replication_role")
    own_db.execute("SELECT linkhooks.run_aggregation()")
    own_db.execute("ANALYZE linkhooks.clicks")
    plan = own_db.execute("EXPLAIN (FORMAT JSON) SELECT * FROM linkhooks.uncounted_clicks").fetchone()[0][0]["Plan"]
    assert plan["Plan Rows"] < 100, plan["Plan Rows"]
    assert own_db.execute("SELECT count(*) FROM linkhooks.uncounted_clicks").fetchone()[0] == 0


def test_clicks_inserted_while_maintenance_attaches_their_partition_are_not_refused(cluster, own_db):
    """Before the first maintenance (right after CREATE EXTENSION) clicks go to the default partition. An INSERT
    routed there just before maintenance attached the partition for its time failed that partition's constraint
    once the ATTACH committed: a click refused. Their deliveries, which the queue routes itself, likewise: each
    session must see the new partition (or write into the default partition a row it may no longer hold)."""
    lid = link(own_db, "race")
    own_db.execute("INSERT INTO linkhooks.subscriptions (name, url, event_types, filters) "
                   "VALUES ('race', 'http://127.0.0.1:9/closed', '{link.clicked}', '{\"exclude_bots\": false}')")
    stop, errors, inserted = threading.Event(), [], []

    def insert():
        with cluster.connect(dbname="lh_partitions") as conn:
            while not stop.is_set():
                try:
                    conn.execute("INSERT INTO linkhooks.clicks (link_id) VALUES (%s)", [lid])
                    inserted.append(1)
                except psycopg.Error as e:
                    errors.append(str(e))

    threads = [threading.Thread(target=insert) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(inserted) >= 200, message="clicks going into the default partition")
        assert maintain(own_db, datetime.now(timezone.utc))["partitions_created"] >= 1
        assert maintain(own_db, datetime.now(timezone.utc), table="deliveries")["partitions_created"] >= 1
        after = len(inserted)
        wait_for(lambda: len(inserted) >= after + 200, message="clicks after the partition was attached")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert own_db.execute("SELECT count(*) FROM linkhooks.clicks").fetchone()[0] == len(inserted)
    assert own_db.execute("SELECT count(*) FROM linkhooks.deliveries").fetchone()[0] == len(inserted)
    assert own_db.execute("SELECT count(*) FROM linkhooks.deliveries_default").fetchone()[0] == 0, \
        "every delivery in the partition of its time, the ones written before it was made moved there"


def test_a_read_waiting_for_maintenance_sees_the_rows_it_moved_out_of_the_default_partition(cluster, own_db):
    """Attaching a partition locks the default partition. A query that had read the partitions before waited
    there, then ran with the partitions as they were and a snapshot that saw the move: the rows moved out of the
    default partition were in neither place (a click briefly missing from link_stats, or never counted by the
    aggregator: rare failures of the README tour). A move now locks the table itself, so readers wait before
    they read the partitions."""
    lid = link(own_db, "moved")
    own_db.execute("INSERT INTO linkhooks.clicks (link_id, clicked_at) VALUES (%s, %s)", [lid, T0 - 30 * DAY])
    with cluster.connect(dbname="lh_partitions") as mover, cluster.connect(dbname="lh_partitions") as reader:
        pid = reader.info.backend_pid
        counted = []
        with mover.transaction():
            assert maintain(mover, T0)["partitions_created"] >= 1
            read = threading.Thread(target=lambda: counted.append(
                reader.execute("SELECT count(*) FROM linkhooks.clicks").fetchone()[0]))
            read.start()
            wait_for(lambda: mover.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                                           [pid]).fetchone()[0] == "Lock", message="the read waiting for the move")
        read.join()
        assert counted == [1], "the moved click, read through its new partition"


def test_a_drop_that_would_wait_for_a_lock_waits_for_the_next_run(cluster, own_db):
    maintain(own_db, T0)
    with cluster.connect(dbname="lh_partitions") as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM linkhooks.clicks")  # an analyst's report holds its lock
        done = maintain(own_db, T0 + 3 * DAY, keep="1 day")
        assert done["partitions_dropped"] == 0 and done["partitions_busy"] >= 1
        reader.execute("COMMIT")
    assert maintain(own_db, T0 + 3 * DAY, keep="1 day")["partitions_dropped"] == 2
    # A detached partition's table is dropped by the next run; a reader holding it (a pg_dump started just after
    # the detach) makes that run skip the drop, not fail and roll back the rest of maintenance.
    expired = "linkhooks.clicks_p20260110_000000_expired"
    with cluster.connect(dbname="lh_partitions") as reader:
        reader.execute("BEGIN")
        reader.execute(f"SELECT count(*) FROM {expired}")
        done = maintain(own_db, T0 + 4 * DAY, keep="1 day")
        assert (done["expired_removed"], done["partitions_dropped"], done["partitions_busy"]) == (1, 1, 1)
        reader.execute("COMMIT")
    assert maintain(own_db, T0 + 4 * DAY, keep="1 day")["expired_removed"] == 2  # it, and the one detached since
    assert own_db.execute("SELECT to_regclass(%s)", [expired]).fetchone()[0] is None


def test_only_the_owner_may_run_partition_maintenance(cluster, own_db):
    own_db.execute("DROP ROLE IF EXISTS lh_part_admin")
    own_db.execute("CREATE ROLE lh_part_admin LOGIN")
    try:
        own_db.execute("SELECT linkhooks.grant_access('lh_part_admin', 'admin')")
        with psycopg.connect(host="127.0.0.1", port=cluster.port, user="lh_part_admin", dbname="lh_partitions",
                             autocommit=True) as admin:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                admin.execute("SELECT linkhooks.maintain_partitions('clicks', now() + interval '1 year', '1 day', '1 day')")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                admin.execute("SELECT linkhooks.use_pg_partman('clicks', interval '1 second')")
            # Moving rows between the queue's partitions (and detaching its default partition) is the owner's too.
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                admin.execute("SELECT linkhooks.maintain_partitions('deliveries', now() + interval '1 year', '1 day', '1 day')")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                admin.execute("SELECT linkhooks.keep_unfinished_deliveries('deliveries_default', now())")
            # run_maintenance (admins may run it) uses the settings and the real clock.
            assert admin.execute("SELECT linkhooks.run_maintenance() -> 'partitions' -> 'clicks' ->> 'partitions_dropped'").fetchone()[0] == "0"
        own_db.execute("SELECT linkhooks.revoke_access('lh_part_admin', 'admin')")
    finally:
        own_db.execute("DROP ROLE IF EXISTS lh_part_admin")


def test_pg_partman_takes_the_partitions_over_keeping_every_row_and_the_extensions_default(cluster):
    """pg_partman (Debian's 4.7) names partitions by their start in its session's time zone
    and orders them by those names: a database whose zone is not UTC shows both."""
    dump = os.path.join(cluster.dir, "lh_partman.dump")
    names = "SELECT partition, range_start, range_end FROM linkhooks.partitions WHERE table_name = 'clicks' AND range_end IS NOT NULL"
    rows = "SELECT tableoid::regclass::text, id, event_id, clicked_at FROM linkhooks.clicks ORDER BY id"
    try:
        with cluster.connect() as c:
            c.execute("DROP DATABASE IF EXISTS lh_partman WITH (FORCE)")
            c.execute("CREATE DATABASE lh_partman")
            c.execute("ALTER DATABASE lh_partman SET timezone = 'America/New_York'")
        with cluster.connect(dbname="lh_partman") as db:
            db.execute("CREATE EXTENSION pg_linkhooks")
            with pytest.raises(psycopg.errors.UndefinedObject, match="pg_partman is not installed in this database"):
                db.execute("SELECT linkhooks.use_pg_partman('clicks')")
            db.execute("CREATE SCHEMA partman")
            db.execute("CREATE EXTENSION pg_partman SCHEMA partman")
            maintain(db, "now")
            link_id = link(db, "pm", "https://acme.com/pm")
            db.execute("INSERT INTO linkhooks.subscriptions (name, url) VALUES ('pm', 'https://hooks.example.com/pm')")
            # Ten days old (in the default partition until it is sorted) and now.
            for at in ("now() - interval '10 days'", "now()"):
                db.execute(f"INSERT INTO linkhooks.clicks (link_id, clicked_at) VALUES (%s, {at})", [link_id])
            before = db.execute(rows).fetchall()

            done = db.execute("SELECT linkhooks.use_pg_partman('clicks', retention => '7 days')").fetchone()[0]
            assert (done["pg_partman_schema"], done["width"]) == ("partman", "1 day")
            for name, start, end in db.execute(names):
                assert name == "clicks_p" + start.astimezone(ZoneInfo("America/New_York")).strftime("%Y_%m_%d")
                assert end - start == DAY and start.astimezone(timezone.utc).time() == datetime.min.time(), \
                    "still UTC days, as linkhooks made them"
            after = db.execute(rows).fetchall()
            assert [r[1:] for r in after] == [r[1:] for r in before], "every click kept with its ids and time"
            assert not any(r[0].endswith("_default") for r in after), "the old click was sorted into a partition of its day"
            assert db.execute("SELECT template_table, retention, infinite_time_partitions FROM partman.part_config "
                              "WHERE parent_table = 'linkhooks.clicks'").fetchone() == ("linkhooks.clicks_default", "7 days", True)
            assert db.execute("SELECT pg_get_expr(c.relpartbound, c.oid), d.deptype FROM pg_class c "
                              "JOIN pg_depend d ON d.objid = c.oid AND d.refclassid = 'pg_extension'::regclass "
                              "WHERE c.oid = 'linkhooks.clicks_default'::regclass").fetchone() == ("DEFAULT", "e"), \
                "the default partition is still the extension's, so a restore's CREATE EXTENSION makes it"
            with pytest.raises(psycopg.errors.ObjectInUse, match="already managed by pg_partman"):
                db.execute("SELECT linkhooks.use_pg_partman('clicks')")

            # linkhooks' maintenance leaves the table to pg_partman, whose maintenance makes
            # partitions ahead (with the default partition's keys and indexes) and drops behind.
            listed = db.execute(names).fetchall()
            assert db.execute("SELECT linkhooks.run_maintenance() -> 'partitions' -> 'clicks'").fetchone()[0] == \
                {"managed_by": "pg_partman"}
            assert db.execute(names).fetchall() == listed
            db.execute("UPDATE partman.part_config SET premake = premake + 2 WHERE parent_table = 'linkhooks.clicks'")
            db.execute("SELECT partman.run_maintenance('linkhooks.clicks')")
            listed = db.execute(names).fetchall()
            assert all(a[2] == b[1] for a, b in zip(listed, listed[1:])), "no gap between partitions"
            assert listed[0][1] > before[0][3] and len(db.execute(rows).fetchall()) == 1, "the ten-day-old click dropped"
            newest = db.execute(f"SELECT 'linkhooks.' || max(partition) FROM ({names}) p").fetchone()[0]
            indexes = "SELECT indisprimary, regexp_replace(pg_get_indexdef(indexrelid), '^.* USING ', '') " \
                      "FROM pg_index WHERE indrelid = %s::regclass ORDER BY 2"
            assert db.execute(indexes, [newest]).fetchall() == db.execute(indexes, ["linkhooks.clicks_default"]).fetchall()
            # Clicks go on as before: in the partition of their day, each queuing its event.
            queued = "SELECT count(*) FROM linkhooks.deliveries"
            before_click = db.execute(queued).fetchone()[0]
            db.execute("SELECT linkhooks.record_click('pm', user_agent => %s)", [IPHONE])
            assert db.execute(queued).fetchone()[0] == before_click + 1
            assert not db.execute(rows).fetchall()[-1][0].endswith("_default")

            run_as_postgres(cluster, "pg_dump", "-Fc", "-f", dump, "lh_partman")
            with database(cluster, "lh_partman_restored") as restored:
                run_as_postgres(cluster, "pg_restore", "-d", "lh_partman_restored", dump,
                                env={"PGOPTIONS": "-c session_replication_role=replica"})
                assert restored.execute(rows).fetchall() == db.execute(rows).fetchall()
                assert restored.execute(names).fetchall() == db.execute(names).fetchall()
                restored.execute("SELECT partman.run_maintenance('linkhooks.clicks')")
                assert restored.execute("SELECT linkhooks.record_click('pm')").fetchone()[0] == "https://acme.com/pm"
    finally:
        drop_database(cluster, "lh_partman")
        drop_database(cluster, "lh_partman_restored")
