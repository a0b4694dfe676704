"""A worker for every database (issue 19): the launcher starts one wherever the extension is installed, with no
setting and no restart, stops it when the extension or the database goes, never stands in the way of DROP DATABASE,
and says so when max_worker_processes leaves no room. Each test runs a cluster of its own with no allow-list."""

import time

import psycopg
import pytest

from conftest import database, subscribe
from harness import wait_for
from test_links import link

NO_SLOT = "no background worker slot to start the pg_linkhooks worker for database \"crm\"; raise max_worker_processes"


def workers(cluster, kind="pg_linkhooks"):
    """{database: pid} of the delivery workers (or housekeepers) running."""
    with cluster.connect() as c:
        return dict(c.execute("SELECT datname, pid FROM pg_stat_activity WHERE backend_type = %s", [kind]).fetchall())


def statuses(conn):
    cur = conn.execute("SELECT * FROM linkhooks.worker_status()")
    return [dict(zip([d.name for d in cur.description], row)) for row in cur.fetchall()]


def status(conn):
    (row,) = statuses(conn)
    return row


def delivering(conn):
    return status(conn)["state"] == "delivering"


def slugs(receiver, path):
    return [r["json"]["data"]["link"]["slug"] for r in receiver.received(path)]


def installed(cluster, name):
    """A new database with the extension, whose worker delivers within seconds; returns a connection."""
    conn = database(cluster, name)
    conn.execute("CREATE EXTENSION pg_linkhooks")
    wait_for(lambda: delivering(conn), timeout=5, message=lambda: f"a worker in {name} within seconds: {status(conn)}")
    return conn


def test_create_extension_starts_delivery_in_each_database_without_a_setting_or_restart(clusters, receiver):
    c = clusters()
    # The launcher checked `postgres` at start: no extension there, so no worker stays.
    wait_for(lambda: workers(c) == {}, message="no worker where the extension is not installed")
    app, crm = installed(c, "app"), installed(c, "crm")
    try:
        for name, conn in (("app", app), ("crm", crm)):
            subscribe(conn, receiver, f"/{name}")
            link(conn, f"{name}-link")
        wait_for(lambda: slugs(receiver, "/app") == ["app-link"] and slugs(receiver, "/crm") == ["crm-link"],
                 message=lambda: f"each database's event from its own worker: {receiver.received()}")
        running = workers(c)
        assert set(running) == {"app", "crm"}
        assert status(app)["pid"] == running["app"] != running["crm"] == status(crm)["pid"]
        assert (status(app)["database"], status(crm)["database"]) == ("app", "crm")
    finally:
        app.close()
        crm.close()


def test_commits_wake_only_their_own_databases_worker(clusters, receiver):
    """Each wake costs the woken worker a transaction in its database: a burst of clicks in crm must not show as
    commits in app, while crm's worker delivers them."""
    c = clusters(autovacuum="off")  # autovacuum commits once per table it processes: not the workers' doing
    app, crm = installed(c, "app"), installed(c, "crm")
    try:
        subscribe(crm, receiver, "/crm", event_types=["link.clicked"], filters={"exclude_bots": False})
        link_id = link(crm, "burst")

        def app_commits():
            app.execute("SELECT pg_stat_clear_snapshot()")
            return app.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = 'app'").fetchone()[0]

        before = app_commits()
        clicks, deadline = 0, time.monotonic() + 3  # a worker sends its statistics at most once a second
        while time.monotonic() < deadline:
            crm.execute("INSERT INTO linkhooks.clicks (link_id) VALUES (%s)", [link_id])
            clicks += 1
        wait_for(lambda: len(receiver.received("/crm")) == clicks, message="crm's worker delivers the burst")
        assert clicks >= 100
        # app's housekeeper and idle polls commit a few times; a wake per click would be hundreds.
        assert app_commits() - before < 30
    finally:
        app.close()
        crm.close()


def test_dropping_the_extension_or_the_database_stops_its_worker_and_needs_no_force(clusters, receiver):
    c = clusters()
    app, crm = installed(c, "app"), installed(c, "crm")
    app.execute("DROP EXTENSION pg_linkhooks")
    wait_for(lambda: "app" not in workers(c), timeout=10, message="app's worker stopped after DROP EXTENSION")
    assert "pg_linkhooks: the extension was dropped from database \"app\"; its worker stops" in c.log()
    subscribe(crm, receiver, "/crm")
    link(crm, "still")
    wait_for(lambda: slugs(receiver, "/crm") == ["still"], message="crm delivers on")

    app.execute("CREATE EXTENSION pg_linkhooks")
    wait_for(lambda: delivering(app), timeout=5, message="app's worker back after CREATE EXTENSION")
    app.close()
    crm.close()
    # Each of these refuses to run while another session is connected to the database.
    with c.connect() as pg:
        pg.execute("ALTER DATABASE app RENAME TO app_renamed")
        pg.execute("CREATE DATABASE app_copy TEMPLATE app_renamed")
        pg.execute("DROP DATABASE crm")
    wait_for(lambda: set(workers(c)) == {"app_renamed", "app_copy"}, timeout=10,
             message=lambda: f"workers in the renamed database and its copy only: {workers(c)}")
    with c.connect(dbname="app_copy") as copy:
        assert status(copy)["state"] == "delivering"
    assert "FATAL" not in c.log(), "no worker tried to connect to the dropped database"


def test_a_role_that_does_not_own_the_database_cannot_stop_its_worker(clusters):
    """The hook stops a database's worker before DROP DATABASE and the like. Asked by a role that may not run
    them, it must not: the refusal would come after the stop, and anyone could take delivery down in a loop."""
    c = clusters()
    app = installed(c, "app")
    try:
        app.execute("CREATE ROLE mallory LOGIN CREATEDB")
        pid = status(app)["pid"]
        with psycopg.connect(host="127.0.0.1", port=c.port, user="mallory", dbname="postgres", autocommit=True) as m:
            for statement in ("DROP DATABASE app", "ALTER DATABASE app RENAME TO gone",
                              "ALTER DATABASE app SET TABLESPACE pg_default", "CREATE DATABASE copy TEMPLATE app"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    m.execute(statement)
                # A worker stopped is started again no sooner than a second later.
                assert workers(c).get("app") == pid, statement
    finally:
        app.close()


def test_without_a_process_slot_a_database_waits_with_a_warning_naming_max_worker_processes(clusters, receiver):
    # The launcher, and app's worker and housekeeper: nothing is left for crm's worker.
    c = clusters(max_worker_processes=3, max_logical_replication_workers=0, max_parallel_workers=0)
    app = installed(c, "app")
    wait_for(lambda: set(workers(c)) == set(workers(c, "pg_linkhooks housekeeper")) == {"app"},
             message="app's worker and housekeeper")
    crm = database(c, "crm")
    crm.execute("CREATE EXTENSION pg_linkhooks")
    try:
        wait_for(lambda: status(crm)["state"] == "waiting for a background worker slot (max_worker_processes)",
                 timeout=10, message=lambda: f"crm's status: {status(crm)}")
        assert NO_SLOT in c.log()
        subscribe(crm, receiver, "/crm")
        link(crm, "waited")
        assert status(crm)["running"] is False
        # app's worker and housekeeper go with its extension; crm's worker takes their slots.
        app.execute("DROP EXTENSION pg_linkhooks")
        wait_for(lambda: slugs(receiver, "/crm") == ["waited"], timeout=30,
                 message=lambda: f"crm's event once a slot is free: {status(crm)}")
        assert c.log().count(NO_SLOT) == 1, "one WARNING, not one per retry"
    finally:
        app.close()
        crm.close()


def test_a_terminated_launcher_comes_back_and_starts_the_workers_again(clusters, receiver):
    c = clusters()
    app = installed(c, "app")
    try:
        launcher = app.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_linkhooks launcher'").fetchone()[0]
        worker = status(app)["pid"]
        app.execute("SELECT pg_terminate_backend(%s)", [launcher])
        # One read of the status: the old worker is still delivering, then stopped (pid None) for a moment.
        wait_for(lambda: (s := status(app))["state"] == "delivering" and s["pid"] != worker, timeout=30,
                 message=lambda: f"a new worker under a new launcher: {status(app)}")
        assert len(workers(c)) == 1, "the old launcher's worker stopped: never two in one database"
        assert set(workers(c, "pg_linkhooks launcher").values()) - {launcher}, "a new launcher"
        subscribe(app, receiver, "/app")
        link(app, "after")
        wait_for(lambda: slugs(receiver, "/app") == ["after"], message="delivery after the launcher's restart")
    finally:
        app.close()


def test_linkhooks_databases_limits_the_workers_to_the_databases_it_names(clusters, receiver):
    c = clusters(**{"linkhooks.databases": "'app'"})
    app, crm = installed(c, "app"), database(c, "crm")
    crm.execute("CREATE EXTENSION pg_linkhooks")
    try:
        subscribe(crm, receiver, "/crm")
        link(crm, "listed-later")
        assert status(crm)["state"] == "not in linkhooks.databases"
        assert set(workers(c)) == {"app"}
        c.set("linkhooks.databases", "app, crm")
        wait_for(lambda: slugs(receiver, "/crm") == ["listed-later"], timeout=10,
                 message="crm's event once the setting names it")
        c.set("linkhooks.databases", "crm")
        wait_for(lambda: set(workers(c)) == {"crm"}, timeout=10, message="app's worker stopped when left out")
        # A backend reloads the configuration before its next statement but one, not at once.
        wait_for(lambda: status(app)["state"] == "not in linkhooks.databases", message="app's status")
    finally:
        app.close()
        crm.close()


def test_two_workers_share_the_queue_without_duplicates_and_hold_the_per_subscription_cap(clusters, receiver):
    """linkhooks.workers_per_database = 2: both claim from one queue (SKIP LOCKED), each event arrives once, and
    one subscription never has more requests in flight than ¾ of http_concurrency over both workers."""
    c = clusters(**{"linkhooks.workers_per_database": "2", "linkhooks.http_concurrency": "8"})
    app = database(c, "app")
    try:
        app.execute("CREATE EXTENSION pg_linkhooks")
        wait_for(lambda: [s["state"] for s in statuses(app)] == ["delivering", "delivering"], timeout=10,
                 message=lambda: f"two workers delivering: {statuses(app)}")
        pids = {s["pid"] for s in statuses(app)}
        assert len(pids) == 2 and set(workers(c, "pg_linkhooks housekeeper")) == {"app"}, "one housekeeper"
        events = 20_000
        sid, secret = subscribe(app, receiver, "/many")
        receiver.expect("/many", [secret], script=[(200, {}, 0.005)] * events)  # 5 ms: requests overlap
        app.execute("SELECT linkhooks.send_test(%s) FROM generate_series(1, %s)", [sid, events])
        busy = set()

        def done():
            busy.update(s["pid"] for s in statuses(app) if s["in_flight"])
            return len(receiver.received("/many")) >= events

        wait_for(done, timeout=120, message=lambda: f"{events} events: {len(receiver.received('/many'))} so far")
        ids = [r["headers"]["webhook-id"] for r in receiver.received("/many")]
        assert len(ids) == len(set(ids)) == events, "each event once"
        assert busy == pids, "both workers had requests in flight"
        assert receiver.peak["/many"] <= 6, "¾ of http_concurrency = 8, over both workers"
        # A request arrives before its worker records the outcome (in its next batch): wait for the records.
        delivered = "SELECT count(*) FILTER (WHERE status = 'delivered'), count(*) FROM linkhooks.deliveries"
        wait_for(lambda: app.execute(delivered).fetchone() == (events, events), timeout=30,
                 message=lambda: f"every delivery recorded as delivered: (delivered, all) = {app.execute(delivered).fetchone()}, "
                                 f"by status {app.execute('SELECT status, count(*) FROM linkhooks.deliveries GROUP BY 1').fetchall()}")
        # Each worker logs its attempts and either counts the log into the per-minute rollup: every attempt once,
        # though one worker's attempts commit while the other counts.
        counted = ("SELECT (SELECT coalesce(sum(attempts), 0) FROM linkhooks.subscription_minutes), "
                   "(SELECT count(*) FROM linkhooks.delivery_attempts)")
        wait_for(lambda: app.execute(counted).fetchone() == (events, events), timeout=30,
                 message=lambda: f"every attempt counted: (counted, logged) = {app.execute(counted).fetchone()}")
    finally:
        app.close()


def test_a_look_alike_linkhooks_schema_gets_no_worker_and_nothing_of_it_runs_as_superuser(clusters):
    """The workers are superuser sessions. A role that may create databases makes a schema called linkhooks with a
    deliveries table and the functions the housekeeper calls, written to make it a superuser. The launcher still
    checks that database, but finds no pg_linkhooks there: it says so, and nothing of the schema runs. The same role
    installing the extension itself (it is trusted) gets a worker; dropping it leaves a schema it cannot write."""
    c = clusters()
    with c.connect() as pg:
        pg.execute("CREATE ROLE mallory LOGIN CREATEDB")

    def as_mallory(dbname):
        return psycopg.connect(host="127.0.0.1", port=c.port, user="mallory", dbname=dbname, autocommit=True)

    with as_mallory("postgres") as m:
        m.execute("CREATE DATABASE evil")
        m.execute("CREATE DATABASE mine")
    with as_mallory("evil") as m:
        m.execute("CREATE TABLE public.ran (who text)")
        m.execute("CREATE SCHEMA linkhooks")
        m.execute("CREATE TABLE linkhooks.deliveries (id bigint)")
        for function in ("run_maintenance", "run_aggregation"):
            m.execute(f"CREATE FUNCTION linkhooks.{function}() RETURNS void LANGUAGE plpgsql AS $$ BEGIN "
                      "INSERT INTO public.ran VALUES (current_user); EXECUTE 'ALTER ROLE mallory SUPERUSER'; END $$")
        wait_for(lambda: 'database "evil" is not served: a schema "linkhooks" with a table "deliveries" is there, '
                         'but not the extension' in c.log(), timeout=15, message="the launcher checked evil")
        assert m.execute("SELECT count(*) FROM public.ran").fetchone()[0] == 0
    assert 'delivering for database "evil"' not in c.log()
    with c.connect() as pg:
        assert pg.execute("SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'").fetchone()[0] is False
    with as_mallory("mine") as m:
        m.execute("CREATE EXTENSION pg_linkhooks")
        wait_for(lambda: delivering(m), timeout=5, message=lambda: f"a worker in mine: {status(m)}")
        # Dropped, the schema stays the superuser's: no look-alike can be made in it.
        m.execute("DROP EXTENSION pg_linkhooks")
        wait_for(lambda: "mine" not in workers(c), timeout=10, message="mine's worker stopped")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            m.execute("CREATE TABLE linkhooks.deliveries (id bigint)")
    with c.connect() as pg:
        assert pg.execute("SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'").fetchone()[0] is False
