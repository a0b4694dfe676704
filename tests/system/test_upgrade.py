"""Moving an installation: ALTER EXTENSION UPDATE from the previous release
gives exactly what a fresh install gives, from each earlier release, and
pg_dump/pg_restore keep every row (issue 5). The whole suite also runs against
an install updated from the first release: LINKHOOKS_UPGRADE_FROM=0.1.0
(scripts/test.sh does both)."""

import os
import subprocess

import pytest
from psycopg import sql

from conftest import database, drop_database, subscribe
from harness import BIN, wait_for
from test_links import IPHONE

# Earlier releases; scripts/test.sh installs their install scripts from tests/upgrade/.
PREVIOUS = ["0.1.0", "0.2.0", "0.3.0", "0.4.0"]

# Everything about the extension's objects a user can observe, one line each.
CATALOG = """
WITH members AS (
    SELECT d.classid, d.objid
    FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
    WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e' AND e.extname = 'pg_linkhooks'
), rels AS (
    SELECT c.oid, c.relname, c.relkind, c.relacl FROM pg_class c JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = c.oid
), procs AS (
    SELECT p.oid, p.proacl FROM pg_proc p JOIN members m ON m.classid = 'pg_proc'::regclass AND m.objid = p.oid
)
SELECT 'member ' || pg_describe_object(classid, objid, 0) FROM members
UNION ALL
SELECT format('column %s.%s #%s %s notnull=%s identity=%s default=%s acl=%s', r.relname, a.attname,
              row_number() OVER (PARTITION BY r.oid ORDER BY a.attnum), format_type(a.atttypid, a.atttypmod),
              a.attnotnull, a.attidentity, pg_get_expr(ad.adbin, ad.adrelid), a.attacl)
FROM rels r
JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef ad ON ad.adrelid = r.oid AND ad.adnum = a.attnum
UNION ALL
SELECT format('constraint %s.%s %s', r.relname, c.conname, pg_get_constraintdef(c.oid)) FROM rels r JOIN pg_constraint c ON c.conrelid = r.oid
UNION ALL
SELECT 'index ' || pg_get_indexdef(i.indexrelid) FROM rels r JOIN pg_index i ON i.indrelid = r.oid
UNION ALL
SELECT 'trigger ' || pg_get_triggerdef(t.oid) FROM rels r JOIN pg_trigger t ON t.tgrelid = r.oid AND NOT t.tgisinternal
UNION ALL
SELECT format('relation %s kind=%s acl=%s comment=%s', r.relname, r.relkind, r.relacl, obj_description(r.oid, 'pg_class')) FROM rels r
UNION ALL
SELECT format('view %s %s', r.relname, pg_get_viewdef(r.oid)) FROM rels r WHERE r.relkind = 'v'
UNION ALL
SELECT format('function %s acl=%s comment=%s', pg_get_functiondef(p.oid), p.proacl, obj_description(p.oid, 'pg_proc')) FROM procs p
UNION ALL
SELECT 'dumped ' || c::regclass::text FROM pg_extension e, unnest(e.extconfig) c WHERE e.extname = 'pg_linkhooks'
UNION ALL
SELECT 'schema linkhooks acl=' || nspacl::text FROM pg_namespace WHERE nspname = 'linkhooks'
ORDER BY 1
"""


def catalog(conn):
    return [r[0] for r in conn.execute(CATALOG).fetchall()]


def fill(conn):
    """A little of everything, written the way users write it."""
    conn.execute("INSERT INTO linkhooks.campaigns (name, click_goal) VALUES ('launch', 100)")
    conn.execute("INSERT INTO linkhooks.links (slug, destination, campaign, utm) "
                 "VALUES ('up', 'https://acme.com/up', 'launch', '{\"source\": \"mail\"}')")
    conn.execute("INSERT INTO linkhooks.subscriptions (name, url) VALUES ('crm', 'https://hooks.example.com/in')")
    conn.execute("SELECT linkhooks.record_click('up', user_agent => %s, referer => 'https://news.example.org/')", [IPHONE])
    conn.execute("INSERT INTO linkhooks.conversions (link_id, name, amount) "
                 "SELECT id, 'purchase', 12.50 FROM linkhooks.links WHERE slug = 'up'")


@pytest.fixture(params=PREVIOUS)
def previous_release(cluster, request):
    with cluster.connect() as c:
        versions = [r[0] for r in c.execute(
            "SELECT version FROM pg_available_extension_versions WHERE name = 'pg_linkhooks'").fetchall()]
    assert request.param in versions, (f"pg_linkhooks {request.param} is not installed; scripts/test.sh installs "
                                       f"tests/upgrade/pg_linkhooks--{request.param}.sql into the extension directory")
    return request.param


def test_update_from_previous_release_equals_fresh_install(cluster, previous_release):
    try:
        with database(cluster, "lh_fresh") as fresh, database(cluster, "lh_upgraded") as upgraded:
            fresh.execute("CREATE EXTENSION pg_linkhooks")
            upgraded.execute(sql.SQL("CREATE EXTENSION pg_linkhooks VERSION {}").format(sql.Literal(previous_release)))
            fill(upgraded)
            secret = upgraded.execute("SELECT secret FROM linkhooks.subscriptions").fetchone()[0]
            # An attempt as that release's worker wrote it (no worker serves this database).
            if previous_release == "0.1.0":  # it did not record the subscription
                upgraded.execute("INSERT INTO linkhooks.delivery_attempts (delivery_id, attempt, started_at, duration_ms, status_code) "
                                 "SELECT id, 1, now(), 3.5, 500 FROM linkhooks.deliveries WHERE event_type = 'link.clicked'")
            else:
                upgraded.execute("INSERT INTO linkhooks.delivery_attempts "
                                 "(delivery_id, attempt, started_at, duration_ms, status_code, subscription_id) "
                                 "SELECT id, 1, now(), 3.5, 500, subscription_id FROM linkhooks.deliveries "
                                 "WHERE event_type = 'link.clicked'")
            clicks = "SELECT id, event_id, link_id, clicked_at FROM linkhooks.clicks ORDER BY id"
            clicks_before = upgraded.execute(clicks).fetchall()
            deliveries = "SELECT id, event_id, subscription_id, status, next_attempt_at, created_at FROM linkhooks.deliveries ORDER BY id"
            deliveries_before = upgraded.execute(deliveries).fetchall()
            upgraded.execute("ALTER EXTENSION pg_linkhooks UPDATE")

            # clicks and deliveries became partitioned; their rows, ids and event ids are all kept, in *_history.
            assert upgraded.execute(clicks).fetchall() == clicks_before and clicks_before
            assert upgraded.execute(deliveries).fetchall() == deliveries_before and deliveries_before
            for table in ("clicks", "deliveries", "delivery_attempts"):
                assert upgraded.execute(f"SELECT DISTINCT tableoid::regclass::text FROM linkhooks.{table}").fetchall() == \
                    [(f"linkhooks.{table}_history",)]
            assert upgraded.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_linkhooks'").fetchone()[0] == \
                fresh.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_linkhooks'").fetchone()[0]
            before, after = catalog(fresh), catalog(upgraded)
            missing, extra = sorted(set(before) - set(after)), sorted(set(after) - set(before))
            assert (missing, extra) == ([], []), \
                "an upgraded install differs from a fresh one:\n" + "\n".join([f"- {m}" for m in missing] + [f"+ {e}" for e in extra])
            assert len(before) > 100, "the catalog snapshot covers the extension's objects"

            # Rows written by the previous release work with the new surface.
            assert upgraded.execute("SELECT secret FROM linkhooks.subscriptions").fetchone()[0] == secret
            assert upgraded.execute("SELECT clicks, human_clicks, conversions FROM linkhooks.link_stats").fetchone() == (1, 1, 1)
            # The update counted the click into the rollups the views read (nothing is left uncounted).
            assert upgraded.execute("SELECT clicks FROM linkhooks.link_daily_clicks").fetchall() == [(1,)]
            assert upgraded.execute("SELECT clicks, conversions FROM linkhooks.link_counts").fetchall() == [(1, 1)]
            assert upgraded.execute("SELECT count(*) FROM linkhooks.uncounted_clicks").fetchone()[0] == 0
            assert upgraded.execute("SELECT count(*) FROM linkhooks.subscription_health").fetchone()[0] == 2
            assert upgraded.execute("SELECT failed_attempts FROM linkhooks.subscription_health WHERE period = '1h'").fetchone()[0] == 1, \
                "attempts from the earlier release are attributed to their subscription"
            assert upgraded.execute("SELECT linkhooks.record_click('up', user_agent => %s)", [IPHONE]).fetchone()[0] == "https://acme.com/up?utm_source=mail"
            assert upgraded.execute("SELECT count(*) FROM linkhooks.delivery_log WHERE event_type = 'link.clicked'").fetchone()[0] == 2
            # The identity carries on after the rows written before the update.
            assert upgraded.execute("SELECT max(id) FROM linkhooks.clicks").fetchone()[0] == clicks_before[-1][0] + 1
            assert upgraded.execute("SELECT min(id) FROM linkhooks.deliveries WHERE id > %s",
                                    [deliveries_before[-1][0]]).fetchone()[0] == deliveries_before[-1][0] + 1
            # Workers serve `postgres` only here (linkhooks.databases): the status says so.
            wait_for(lambda: upgraded.execute("SELECT running, state FROM linkhooks.worker_status()").fetchone() ==
                     (False, "not in linkhooks.databases"), message="the status of a database left out of the allow-list")
    finally:
        drop_database(cluster, "lh_fresh")
        drop_database(cluster, "lh_upgraded")


def run_as_postgres(cluster, tool, *args, env=None):
    result = subprocess.run(["runuser", "-u", "postgres", "--", f"{BIN}/{tool}", "-h", cluster.dir, "-p", str(cluster.port),
                             "-U", "postgres", *args], capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr


def test_dump_and_restore_keep_every_row_without_emitting_again(cluster):
    dump = os.path.join(cluster.dir, "lh_source.dump")
    tables = ["links", "campaigns", "clicks", "conversions", "subscriptions", "deliveries"]
    try:
        with database(cluster, "lh_source") as source:
            source.execute("CREATE EXTENSION pg_linkhooks")
            # Clicks in a dated partition made by maintenance (not one of the extension's
            # objects) and, older than every partition, in the default one.
            source.execute("SELECT linkhooks.maintain_partitions('clicks', now(), '1 day', NULL)")
            fill(source)
            source.execute("INSERT INTO linkhooks.clicks (link_id, clicked_at) "
                           "SELECT id, now() - interval '30 days' FROM linkhooks.links")
            run_as_postgres(cluster, "pg_dump", "-Fc", "-f", dump, "lh_source")
            with database(cluster, "lh_restored") as restored:
                run_as_postgres(cluster, "pg_restore", "-d", "lh_restored", dump,
                                env={"PGOPTIONS": "-c session_replication_role=replica"})
                for table in tables:
                    query = f"SELECT * FROM linkhooks.{table} ORDER BY 1"
                    assert restored.execute(query).fetchall() == source.execute(query).fetchall(), table
                where = "SELECT tableoid::regclass::text, id FROM linkhooks.clicks ORDER BY id"
                assert restored.execute(where).fetchall() == source.execute(where).fetchall()
                assert {r[0] for r in restored.execute(where)} == {"linkhooks.clicks_default", "linkhooks." +
                    source.execute("SELECT partition FROM linkhooks.partitions WHERE now() >= range_start AND now() < range_end").fetchone()[0]}
                listing = "SELECT * FROM linkhooks.partitions WHERE range_start IS NOT NULL"
                assert restored.execute(listing).fetchall() and \
                    [r[:4] for r in restored.execute(listing)] == [r[:4] for r in source.execute(listing)]
                # Identity sequences continue, triggers work again, and new events are queued.
                restored.execute("INSERT INTO linkhooks.links (slug, destination) VALUES ('after', 'https://acme.com/after')")
                assert restored.execute("SELECT linkhooks.record_click('after', user_agent => %s)", [IPHONE]).fetchone()[0] == "https://acme.com/after"
                assert restored.execute("SELECT count(*) FROM linkhooks.deliveries").fetchone()[0] == \
                    source.execute("SELECT count(*) FROM linkhooks.deliveries").fetchone()[0] + 2
    finally:
        drop_database(cluster, "lh_source")
        drop_database(cluster, "lh_restored")


def test_an_updated_install_dumps_and_restores_with_its_clicks_history(cluster):
    """The update keeps 0.4.0's clicks table as the partition clicks_history, no longer one
    of the extension's objects: pg_dump dumps it like any table, with its rows."""
    dump = os.path.join(cluster.dir, "lh_updated.dump")
    clicks = "SELECT tableoid::regclass::text, id, event_id, clicked_at FROM linkhooks.clicks ORDER BY id"
    try:
        with database(cluster, "lh_updated") as source:
            source.execute("CREATE EXTENSION pg_linkhooks VERSION '0.4.0'")
            fill(source)
            source.execute("ALTER EXTENSION pg_linkhooks UPDATE")
            source.execute("SELECT linkhooks.maintain_partitions('clicks', now(), '1 day', NULL)")
            source.execute("SELECT linkhooks.record_click('up', user_agent => %s)", [IPHONE])
            assert {r[0] for r in source.execute(clicks)} == {"linkhooks.clicks_history"}, \
                "today's clicks go to clicks_history, which covers the day of the update"
            run_as_postgres(cluster, "pg_dump", "-Fc", "-f", dump, "lh_updated")
            with database(cluster, "lh_updated_restored") as restored:
                run_as_postgres(cluster, "pg_restore", "-d", "lh_updated_restored", dump,
                                env={"PGOPTIONS": "-c session_replication_role=replica"})
                assert restored.execute(clicks).fetchall() == source.execute(clicks).fetchall()
                listing = "SELECT table_name, partition, range_start::text, range_end::text FROM linkhooks.partitions"
                assert restored.execute(listing).fetchall() == source.execute(listing).fetchall()
                assert restored.execute("SELECT linkhooks.record_click('up')").fetchone()[0].startswith("https://acme.com/up")
    finally:
        drop_database(cluster, "lh_updated")
        drop_database(cluster, "lh_updated_restored")


def test_the_update_refuses_clicks_no_partition_can_hold_and_changes_nothing(cluster):
    import psycopg
    try:
        with database(cluster, "lh_endless") as db:
            db.execute("CREATE EXTENSION pg_linkhooks VERSION '0.4.0'")
            fill(db)
            db.execute("SET session_replication_role = replica")  # as a restore wrote it
            db.execute("INSERT INTO linkhooks.clicks (event_id, link_id, clicked_at) "
                       "SELECT gen_random_uuid(), id, 'infinity' FROM linkhooks.links")
            db.execute("RESET session_replication_role")
            with pytest.raises(psycopg.errors.InvalidParameterValue,
                               match="linkhooks.clicks has rows with clicked_at = infinity, which no partition can hold"):
                db.execute("ALTER EXTENSION pg_linkhooks UPDATE")
            assert db.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_linkhooks'").fetchone()[0] == "0.4.0"
            db.execute("UPDATE linkhooks.clicks SET clicked_at = now() WHERE clicked_at = 'infinity'")
            db.execute("ALTER EXTENSION pg_linkhooks UPDATE")
            assert db.execute("SELECT count(*) FROM linkhooks.clicks").fetchone()[0] == 2
    finally:
        drop_database(cluster, "lh_endless")


def test_the_update_gives_a_schema_a_dba_made_before_0_4_0_was_installed_to_the_superuser(cluster):
    """0.4.0 installed into a schema a DBA had made kept the DBA as its owner, who could then put objects in it that
    code running as a superuser would use. The workers serve only an extension whose schema a superuser owns: the
    update takes the schema over."""
    try:
        with database(cluster, "lh_dbaschema") as db:
            db.execute("DROP ROLE IF EXISTS schema_dba")
            db.execute("CREATE ROLE schema_dba")
            db.execute("CREATE SCHEMA linkhooks AUTHORIZATION schema_dba")
            db.execute("CREATE EXTENSION pg_linkhooks VERSION '0.4.0'")
            owner = "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'linkhooks'"
            assert db.execute(owner).fetchone()[0] == "schema_dba"
            db.execute("ALTER EXTENSION pg_linkhooks UPDATE")
            assert db.execute(owner).fetchone()[0] == "postgres"
    finally:
        drop_database(cluster, "lh_dbaschema")
        with cluster.connect() as c:
            c.execute("DROP ROLE IF EXISTS schema_dba")


def test_a_worker_delivering_through_the_update_logs_attempts_as_0_5_0_does_at_once(clusters, receiver):
    """Between the library's restart and ALTER EXTENSION UPDATE the worker uses 0.4.0's tables as they are; after the
    update it must use 0.5.0's (attempt latencies, per-minute health) at once, not once a subscription changes."""
    cluster = clusters()  # its worker serves every database
    with database(cluster, "lh_live") as db:
        db.execute("CREATE EXTENSION pg_linkhooks VERSION '0.4.0'")
        sub_id, _ = subscribe(db, receiver, "/live")
        db.execute("INSERT INTO linkhooks.links (slug, destination) VALUES ('before', 'https://acme.com/b')")
        wait_for(lambda: len(receiver.received("/live")) == 1, timeout=30, message="delivery under 0.4.0")
        db.execute("ALTER EXTENSION pg_linkhooks UPDATE")
        db.execute("INSERT INTO linkhooks.links (slug, destination) VALUES ('after', 'https://acme.com/a')")
        wait_for(lambda: len(receiver.received("/live")) == 2, message="delivery after the update")
        attempt = ("SELECT a.latency_ms FROM linkhooks.delivery_attempts a JOIN linkhooks.deliveries d "
                   "ON d.id = a.delivery_id WHERE d.body::jsonb -> 'data' -> 'link' ->> 'slug' = 'after'")
        assert wait_for(lambda: db.execute(attempt).fetchone(), message="the attempt logged")[0] is not None
        wait_for(lambda: db.execute("SELECT coalesce(sum(succeeded), 0) FROM linkhooks.subscription_minutes "
                                    "WHERE subscription_id = %s", [sub_id]).fetchone()[0] >= 1,
                 message="the attempt counted per minute")


def test_before_the_update_links_applied_in_replica_role_are_not_served_stale(cluster):
    """The 0.4.0 schema has no replica-role trigger on links, so nothing tells a cache of a link that logical
    replication applies (replica role): until the update, redirects read the table."""
    try:
        with database(cluster, "lh_old_schema") as db, cluster.connect(dbname="lh_old_schema") as s:
            db.execute("CREATE EXTENSION pg_linkhooks VERSION '0.4.0'")
            db.execute("INSERT INTO linkhooks.links (slug, destination) VALUES ('old', 'https://acme.com/o')")
            for _ in range(2):
                assert s.execute("SELECT linkhooks.resolve('old')").fetchone()[0] == "https://acme.com/o"
            with db.transaction():
                db.execute("SET LOCAL session_replication_role = replica")
                db.execute("UPDATE linkhooks.links SET disabled = true WHERE slug = 'old'")
            assert s.execute("SELECT linkhooks.resolve('old')").fetchone()[0] is None
    finally:
        drop_database(cluster, "lh_old_schema")


def test_an_updated_install_hands_over_to_pg_partman_once_clicks_history_is_detached(cluster):
    """pg_partman reads each partition's bounds and cannot read clicks_history's MINVALUE."""
    import psycopg
    try:
        with database(cluster, "lh_updated_partman") as db:
            db.execute("CREATE EXTENSION pg_linkhooks VERSION '0.4.0'")
            fill(db)
            db.execute("ALTER EXTENSION pg_linkhooks UPDATE")
            db.execute("CREATE SCHEMA partman")
            db.execute("CREATE EXTENSION pg_partman SCHEMA partman")
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="clicks_history") as refused:
                db.execute("SELECT linkhooks.use_pg_partman('clicks')")
            hint = refused.value.diag.message_hint
            assert "ALTER TABLE linkhooks.clicks DETACH PARTITION linkhooks.clicks_history" in hint
            assert db.execute("SELECT count(*) FROM partman.part_config").fetchone()[0] == 0, "nothing changed"
            db.execute("ALTER TABLE linkhooks.clicks DETACH PARTITION linkhooks.clicks_history")
            db.execute("SELECT linkhooks.use_pg_partman('clicks')")
            assert db.execute("SELECT count(*) FROM linkhooks.clicks_history").fetchone()[0] == 1, "kept as a table"
            assert db.execute("SELECT linkhooks.record_click('up')").fetchone()[0].startswith("https://acme.com/up")
    finally:
        drop_database(cluster, "lh_updated_partman")


def test_update_to_0_5_0_narrows_grants_made_before_it(cluster):
    """Roles given a level at 0.4.0 held whole tables: after the update a writer can no
    longer choose an event id and an analyst can no longer read signatures."""
    import psycopg
    try:
        with database(cluster, "lh_grants") as db:
            db.execute("CREATE EXTENSION pg_linkhooks VERSION '0.4.0'")
            for role, level in [("lh_up_writer", "writer"), ("lh_up_analyst", "analyst"), ("lh_up_admin", "admin")]:
                db.execute(f"DROP ROLE IF EXISTS {role}")
                db.execute(f"CREATE ROLE {role} LOGIN")
                db.execute("SELECT linkhooks.grant_access(%s, %s)", [role, level])
            db.execute("ALTER EXTENSION pg_linkhooks UPDATE TO '0.5.0'")
            link_id = db.execute("INSERT INTO linkhooks.links (slug, destination) VALUES ('g', 'https://acme.com/') "
                                 "RETURNING id").fetchone()[0]

            def as_role(role):
                return psycopg.connect(host="127.0.0.1", port=cluster.port, user=role, dbname="lh_grants", autocommit=True)

            with as_role("lh_up_writer") as w:
                assert w.execute("INSERT INTO linkhooks.clicks (link_id) VALUES (%s) RETURNING id", [link_id]).fetchone()
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    w.execute("INSERT INTO linkhooks.clicks (link_id, event_id) VALUES (%s, gen_random_uuid())", [link_id])
            with as_role("lh_up_analyst") as a:
                assert a.execute("SELECT count(*) FROM linkhooks.deliveries").fetchone()[0] >= 0
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    a.execute("SELECT signature FROM linkhooks.deliveries")
            with as_role("lh_up_admin") as a:
                a.execute("UPDATE linkhooks.links SET disabled = true WHERE id = %s", [link_id])
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    a.execute("UPDATE linkhooks.links SET redirect_url = 'javascript:x' WHERE id = %s", [link_id])
            # Revoking a level removes what the update left behind as well.
            for role, level in [("lh_up_writer", "writer"), ("lh_up_analyst", "analyst"), ("lh_up_admin", "admin")]:
                db.execute("SELECT linkhooks.revoke_access(%s, %s)", [role, level])
                assert db.execute("SELECT count(*) FROM information_schema.column_privileges "
                                  "WHERE grantee = %s AND table_schema = 'linkhooks'", [role]).fetchone()[0] == 0, role
    finally:
        drop_database(cluster, "lh_grants")
        with cluster.connect() as c:
            for role in ["lh_up_writer", "lh_up_analyst", "lh_up_admin"]:
                c.execute(f"DROP ROLE IF EXISTS {role}")
