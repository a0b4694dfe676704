"""Attacks on the extension's privileges (issue 16). Each test logs in as the
hostile role, plants its own code where a careless lookup would find it
(pg_temp, a schema it owns, public), calls the API as that role would, and
asserts that nothing ran as the owner: the role is still not a superuser."""

import psycopg
import pytest

from conftest import subscribe
from harness import wait_for
from test_access import denied, login
from test_links import IPHONE, link

HOSTILE = "lh_hostile"
LEVELS = ["writer", "analyst", "admin"]

# A function that makes the hostile role a superuser, if whoever runs it may.
ESCALATE = f"""
CREATE FUNCTION {{schema}}.escalate() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    ALTER ROLE {HOSTILE} SUPERUSER;
    RETURN true;
EXCEPTION WHEN insufficient_privilege THEN
    RETURN true;
END $$"""


@pytest.fixture
def hostile(cluster):
    """A login role with one access level and a schema of its own, first on its search_path."""
    opened = []

    def make(level):
        with cluster.connect() as c:
            c.execute(f"DROP SCHEMA IF EXISTS {HOSTILE} CASCADE")
            c.execute(f"DROP OWNED BY {HOSTILE}") if exists(c) else None
            c.execute(f"DROP ROLE IF EXISTS {HOSTILE}")
            c.execute(f"CREATE ROLE {HOSTILE} LOGIN")
            c.execute(f"CREATE SCHEMA {HOSTILE} AUTHORIZATION {HOSTILE}")
            c.execute(f"ALTER ROLE {HOSTILE} SET search_path = {HOSTILE}, public")
            c.execute("SELECT linkhooks.grant_access(%s, %s)", [HOSTILE, level])
        opened.append(login(cluster, HOSTILE))
        return opened[-1]
    yield make
    for conn in opened:  # a failed test leaves it open, holding what it took
        conn.close()
    with cluster.connect() as c:
        c.execute(f"DROP SCHEMA IF EXISTS {HOSTILE} CASCADE")
        if exists(c):
            c.execute(f"DROP OWNED BY {HOSTILE}")
            c.execute(f"DROP ROLE {HOSTILE}")


def exists(c):
    return c.execute("SELECT true FROM pg_roles WHERE rolname = %s", [HOSTILE]).fetchone() is not None


def is_superuser(db):
    return db.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", [HOSTILE]).fetchone()[0]


def plant(conn, schema):
    """Every name a careless function would look up, shadowed in `schema`: types
    (domains whose CHECK escalates), functions and operators."""
    conn.execute(ESCALATE.format(schema=schema))
    for typ in ["inet", "text", "int8", "uuid", "jsonb"]:
        conn.execute(f"CREATE DOMAIN {schema}.{typ} AS pg_catalog.{typ} CHECK ({schema}.escalate())")
    for fn, args in [("now", ""), ("format", "pg_catalog.text, pg_catalog.text, pg_catalog.text"),
                     ("lower", "pg_catalog.text"), ("count", "pg_catalog.int8")]:
        params = ", ".join(f"a{i} {t}" for i, t in enumerate(filter(None, args.split(", "))))
        conn.execute(f"CREATE FUNCTION {schema}.{fn}({params}) RETURNS pg_catalog.text "
                     f"LANGUAGE sql AS $$ SELECT {schema}.escalate()::pg_catalog.text $$")
    for left, right in [("int8", "int8"), ("text", "text"), ("uuid", "uuid")]:
        conn.execute(f"CREATE FUNCTION {schema}.eq(pg_catalog.{left}, pg_catalog.{right}) RETURNS boolean "
                     f"LANGUAGE sql AS $$ SELECT {schema}.escalate() $$")
        conn.execute(f"CREATE OPERATOR {schema}.= (LEFTARG = pg_catalog.{left}, RIGHTARG = pg_catalog.{right}, "
                     f"FUNCTION = {schema}.eq)")
    # What a click limit and a campaign goal compute with: click_count + 1, < and >= on bigints.
    conn.execute(f"CREATE FUNCTION {schema}.lt(pg_catalog.int8, pg_catalog.int8) RETURNS boolean "
                 f"LANGUAGE sql AS $$ SELECT {schema}.escalate() $$")
    for op in ["<", ">="]:
        conn.execute(f"CREATE OPERATOR {schema}.{op} (LEFTARG = pg_catalog.int8, RIGHTARG = pg_catalog.int8, "
                     f"FUNCTION = {schema}.lt)")
    conn.execute(f"CREATE FUNCTION {schema}.plus(pg_catalog.int8, pg_catalog.int4) RETURNS pg_catalog.int8 "
                 f"LANGUAGE sql AS $$ SELECT {schema}.escalate()::pg_catalog.int4::pg_catalog.int8 $$")
    conn.execute(f"CREATE OPERATOR {schema}.+ (LEFTARG = pg_catalog.int8, RIGHTARG = pg_catalog.int4, "
                 f"FUNCTION = {schema}.plus)")


def test_a_writer_with_temp_objects_cannot_run_code_as_the_owner(cluster, db, hostile, receiver):
    """The 0.4.0 escalation: CREATE DOMAIN pg_temp.inet with a CHECK that runs the
    writer's function, then record_click(ip => ...) cast the ip to pg_temp.inet as the owner."""
    subscribe(db, receiver, "/sec", event_types=["link.clicked", "link.converted"])
    link_id = link(db, "sale", "https://acme.com/sale")
    # A click limit and a campaign goal make the click trigger run its UPDATEs too.
    db.execute("INSERT INTO linkhooks.campaigns (name, click_goal) VALUES ('goal', 3)")
    limited = link(db, "lim", "https://acme.com/lim", max_clicks=5, campaign="goal")
    with hostile("writer") as w:
        plant(w, "pg_temp")
        plant(w, HOSTILE)
        w.execute(f"SET search_path = pg_temp, {HOSTILE}, public, pg_catalog")
        assert w.execute("SELECT linkhooks.record_click('sale', ip => '198.51.100.7')").fetchone()[0] == \
            "https://acme.com/sale"
        assert w.execute("SELECT linkhooks.resolve('sale')").fetchone()[0] == "https://acme.com/sale"
        click_id = w.execute("INSERT INTO linkhooks.clicks (link_id, ip, user_agent, landing_url) "
                             "VALUES (%s, '203.0.113.9', %s, 'https://acme.com/?utm_source=x') RETURNING id",
                             [link_id, IPHONE]).fetchone()[0]
        w.execute("INSERT INTO linkhooks.conversions (click_id, name, metadata) VALUES (%s, 'buy', '{}')", [click_id])
        w.execute("INSERT INTO linkhooks.clicks (link_id, user_agent) VALUES (%s, %s)", [limited, IPHONE])
        assert w.execute("SELECT linkhooks.record_click('lim')").fetchone()[0] == "https://acme.com/lim"
        assert w.execute("SELECT url FROM linkhooks.record_click_returning('lim', ip => '198.51.100.8')").fetchone()[0] == \
            "https://acme.com/lim"
        # The reactive-event paths a writer reaches: idempotency keys, misses, external ids.
        for _ in range(2):
            assert w.execute("SELECT linkhooks.record_click('sale', idempotency_key => 'k-1')").fetchone()[0] == \
                "https://acme.com/sale"
        assert w.execute("SELECT linkhooks.record_click('no-such-slug')").fetchone()[0] is None
        w.execute("SELECT linkhooks.record_miss('other', '', 'unknown')")
        for _ in range(2):
            w.execute("INSERT INTO linkhooks.conversions (click_id, name, external_id) VALUES (%s, 'buy', 'order-1')",
                      [click_id])
    with cluster.connect() as c:  # the aggregator, as the worker runs it, over what the writer wrote
        c.execute("SELECT linkhooks.run_aggregation()")
    assert not is_superuser(db)
    assert db.execute("SELECT count(*) FROM linkhooks.link_misses").fetchone()[0] == 2
    assert db.execute("SELECT count(*) FROM linkhooks.conversions").fetchone()[0] == 2
    assert db.execute("SELECT count(*) FROM linkhooks.clicks").fetchone()[0] == 6
    assert db.execute("SELECT click_count FROM linkhooks.links WHERE id = %s", [limited]).fetchone()[0] == 3
    assert db.execute("SELECT click_count FROM linkhooks.campaigns").fetchone()[0] == 3


def test_an_admin_with_planted_objects_cannot_run_code_as_the_owner(cluster, db, hostile, receiver):
    """Every trigger and SECURITY DEFINER function an admin reaches, with the admin's objects first on its path."""
    sub_id, _ = subscribe(db, receiver, "/adm")
    with hostile("admin") as a:
        plant(a, "pg_temp")
        plant(a, HOSTILE)
        a.execute(f"SET search_path = pg_temp, {HOSTILE}, public, pg_catalog")
        link_id = a.execute("INSERT INTO linkhooks.links (slug, destination, tags, metadata, max_clicks) "
                            "VALUES ('adm', 'https://acme.com/a', '{x}', '{\"k\": 1}', 5) RETURNING id").fetchone()[0]
        a.execute("UPDATE linkhooks.links SET destination = 'https://acme.com/b' WHERE id = %s", [link_id])
        # links_counted follows the names into link_counts (it reads linkhooks.restore through current_setting).
        for schema in ("pg_temp", HOSTILE):
            a.execute(f"CREATE FUNCTION {schema}.current_setting(pg_catalog.text, boolean) RETURNS pg_catalog.text "
                      f"LANGUAGE sql AS $$ SELECT {HOSTILE}.escalate()::pg_catalog.text $$")
        a.execute("UPDATE linkhooks.links SET slug = 'adm2', campaign = 'c' WHERE id = %s", [link_id])
        a.execute("INSERT INTO linkhooks.campaigns (name, click_goal) VALUES ('c', 10)")
        a.execute("UPDATE linkhooks.campaigns SET click_goal = 20 WHERE name = 'c'")
        a.execute("UPDATE linkhooks.subscriptions SET name = 'renamed' WHERE id = %s", [sub_id])
        a.execute("SELECT linkhooks.send_test(%s)", [sub_id])
        a.execute("SELECT linkhooks.rotate_secret(%s)", [sub_id])
        a.execute("SELECT linkhooks.run_maintenance()")
        for kind, settings in [("milestones", '{"thresholds": [1, 2]}'), ("threshold", '{"clicks": 1, "window": "1m"}'),
                               ("spike", '{"min_clicks": 1}')]:
            a.execute("INSERT INTO linkhooks.rules (kind, link_id, settings) VALUES (%s, %s, %s)", [kind, link_id, settings])
        a.execute("UPDATE linkhooks.rules SET settings = settings WHERE link_id = %s", [link_id])
        a.execute("SELECT linkhooks.run_aggregation()")
        a.execute("DELETE FROM linkhooks.rules")
        a.execute("SELECT linkhooks.replay_dead_letters()")
        a.execute("SELECT linkhooks.retry_now(subscription_id => %s)", [sub_id])
        a.execute("UPDATE linkhooks.subscriptions SET paused = true WHERE id = %s", [sub_id])
        a.execute("SELECT * FROM linkhooks.worker_status()")
        a.execute("DELETE FROM linkhooks.links WHERE id = %s", [link_id])
        a.execute("DELETE FROM linkhooks.campaigns")
    assert not is_superuser(db)


def test_a_writer_with_planted_objects_cannot_run_code_as_the_owner_through_the_cursor_functions(db, hostile):
    """click_cursor_xmin() and attempt_cursor_id() run as the owner and are granted to PUBLIC: the
    least-privileged role reaches them."""
    with hostile("writer") as w:
        plant(w, "pg_temp")
        plant(w, HOSTILE)
        for typ in ["xid8", "pg_snapshot"]:
            w.execute(f"CREATE DOMAIN {HOSTILE}.{typ} AS pg_catalog.{typ} CHECK ({HOSTILE}.escalate())")
        w.execute(f"CREATE FUNCTION {HOSTILE}.pg_snapshot_xmin(pg_catalog.pg_snapshot) RETURNS pg_catalog.xid8 "
                  f"LANGUAGE sql AS $$ SELECT {HOSTILE}.escalate(); SELECT '1'::pg_catalog.xid8 $$")
        w.execute(f"SET search_path = pg_temp, {HOSTILE}, public, pg_catalog")
        assert w.execute("SELECT linkhooks.click_cursor_xmin()").fetchone()[0] is not None
        assert w.execute("SELECT linkhooks.attempt_cursor_id()").fetchone()[0] is not None
    assert not is_superuser(db)


def test_grant_access_ignores_functions_planted_in_the_callers_path(cluster, db, hostile):
    """A role that may create in public plants format(text, text, text), which beats
    pg_catalog's variadic format for a superuser whose search_path includes public."""
    hostile("writer").close()
    db.execute("SELECT linkhooks.run_maintenance()")  # partitions, whose grants grant_access also sets
    assert db.execute("SELECT count(*) FROM linkhooks.partitions WHERE range_start IS NOT NULL").fetchone()[0] > 0
    db.execute(f"GRANT CREATE ON SCHEMA public TO {HOSTILE}")
    try:
        with login(cluster, HOSTILE) as h:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):  # nor may it call what grant_access calls
                h.execute("SELECT linkhooks.grant_as_parent('clicks', 'clicks_default')")
            h.execute(ESCALATE.format(schema="public"))
            h.execute("CREATE FUNCTION public.format(a pg_catalog.text, b pg_catalog.text, c pg_catalog.text) "
                      "RETURNS pg_catalog.text LANGUAGE sql AS $$ SELECT public.escalate()::pg_catalog.text $$")
        db.execute("SET search_path = public, pg_catalog")
        db.execute("CREATE ROLE lh_victim")
        try:
            db.execute("SELECT linkhooks.grant_access('lh_victim', 'analyst')")
            db.execute("SELECT linkhooks.revoke_access('lh_victim', 'analyst')")
        finally:
            db.execute("DROP ROLE lh_victim")
            db.execute("RESET search_path")
        assert not is_superuser(db)
    finally:
        db.execute("DROP FUNCTION IF EXISTS public.format(text, text, text)")
        db.execute("DROP FUNCTION IF EXISTS public.escalate()")
        db.execute(f"REVOKE CREATE ON SCHEMA public FROM {HOSTILE}")


@pytest.mark.parametrize("level", ["writer", "analyst", "admin"])
def test_no_access_level_can_hold_counting_or_partition_maintenance_off(db, hostile, level):
    """The aggregator and maintain_partitions each run one at a time and skip while another run holds their lock,
    and calls with one idempotency key wait for each other. Advisory locks can be taken by any role, which could
    then stop counting, milestones and partition upkeep, or stall a key's redirects, for as long as it stays
    connected. The runs lock extension tables instead, which these levels may not lock, and keys take a lock no
    SQL function can."""
    attacker = hostile(level)
    attacker.execute("SELECT pg_advisory_lock(19521, k) FROM generate_series(1, 4) k")  # the keys runs once used
    attacker.execute("SELECT pg_advisory_lock(19528, hashtext('k-held'))")  # and calls with one idempotency key
    attacker.execute("BEGIN")
    for lock in ("LOCK TABLE linkhooks.click_cursor IN EXCLUSIVE MODE",
                 "LOCK TABLE ONLY linkhooks.clicks IN SHARE UPDATE EXCLUSIVE MODE",
                 "LOCK TABLE ONLY linkhooks.deliveries IN SHARE UPDATE EXCLUSIVE MODE",
                 "LOCK TABLE ONLY linkhooks.delivery_attempts IN SHARE UPDATE EXCLUSIVE MODE"):
        attacker.execute("SAVEPOINT s")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            attacker.execute(lock)
        attacker.execute("ROLLBACK TO SAVEPOINT s")
    link_id = db.execute("INSERT INTO linkhooks.links (slug, destination) VALUES ('held', 'https://acme.com/') "
                         "RETURNING id").fetchone()[0]
    db.execute("INSERT INTO linkhooks.clicks (link_id) VALUES (%s)", [link_id])
    wait_for(lambda: "skipped" not in db.execute("SELECT linkhooks.run_aggregation()").fetchone()[0]
             and db.execute("SELECT clicks FROM linkhooks.link_counts WHERE link_id = %s", [link_id]).fetchone() == (1,),
             message="counted while the attacker holds what it can")
    for table in ("clicks", "deliveries", "delivery_attempts"):
        # The housekeeper's own run (every second here) may hold the table for a moment; the attacker never does.
        wait_for(lambda: db.execute("SELECT linkhooks.maintain_partitions(%s, now(), '1 day', NULL)",
                                    [table]).fetchone()[0].get("partitions_busy", 0) == 0,
                 timeout=10, message=f"{table}'s partitions kept while the attacker holds what it can")
    db.execute("SET lock_timeout = '5s'")  # what a redirect with that key would otherwise wait for
    assert db.execute("SELECT linkhooks.record_click('held', idempotency_key => 'k-held')").fetchone()[0] == \
        "https://acme.com/"
    db.execute("RESET lock_timeout")
    attacker.close()


def test_every_function_that_runs_as_the_owner_pins_search_path(db):
    """Read from the catalog: every SECURITY DEFINER function, trigger function and
    access function of the extension has search_path = pg_catalog, pg_temp, but the
    clicks trigger, which pins it in its code. (Compiled functions that are neither look
    up no names: ratio() is PostgreSQL's numeric_div.)"""
    unpinned = db.execute("""
        SELECT p.oid::regprocedure::text
          FROM pg_proc p
          JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
          JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_linkhooks'
         WHERE (p.prosecdef OR p.prorettype = 'trigger'::regtype
                OR p.prolang NOT IN (SELECT oid FROM pg_language WHERE lanname IN ('c', 'internal')))
           AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false)
         ORDER BY 1""").fetchall()
    # The clicks trigger pins it in its code (src/triggers/mod.rs, with_catalog_search_path),
    # attacked in test_a_writer_with_temp_objects_cannot_run_code_as_the_owner.
    assert unpinned == [("linkhooks.clicks_trigger()",)]
    definers = db.execute("""
        SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'linkhooks' AND (p.prosecdef OR p.prorettype = 'trigger'::regtype)""").fetchone()[0]
    assert definers >= 12  # 6 SECURITY DEFINER functions and 6 trigger functions are checked above


def test_internal_columns_are_made_by_the_extension(cluster, db, hostile):
    """A writer cannot choose a click's or conversion's event id (webhook-id); an admin
    cannot write redirect_url or the counters; even the owner cannot set redirect_url."""
    link_id = link(db, "int", "https://acme.com/i")
    conversion_event = db.execute("INSERT INTO linkhooks.conversions (link_id, name) VALUES (%s, 'x') RETURNING event_id",
                                  [link_id]).fetchone()[0]
    with hostile("writer") as w:
        denied(w, "INSERT INTO linkhooks.clicks (link_id, event_id) VALUES (%s, %s)", [link_id, conversion_event])
        denied(w, "INSERT INTO linkhooks.conversions (link_id, name, event_id) VALUES (%s, 'y', %s)",
               [link_id, conversion_event])
        denied(w, "INSERT INTO linkhooks.clicks (id, link_id) VALUES (1000, %s)", [link_id])
    with hostile("admin") as a:
        denied(a, "UPDATE linkhooks.links SET redirect_url = 'javascript:alert(1)' WHERE id = %s", [link_id])
        denied(a, "UPDATE linkhooks.links SET click_count = 0, expired_at = NULL WHERE id = %s", [link_id])
        denied(a, "INSERT INTO linkhooks.links (slug, destination, redirect_url) VALUES ('j', 'https://a.co/', 'javascript:x')")
        denied(a, "UPDATE linkhooks.campaigns SET click_count = 0")
        a.execute("UPDATE linkhooks.links SET disabled = true WHERE id = %s", [link_id])  # public columns still work
    with pytest.raises(psycopg.errors.InvalidParameterValue,
                       match="invalid redirect_url: is kept by the extension from destination and utm"):
        db.execute("UPDATE linkhooks.links SET redirect_url = 'javascript:alert(1)' WHERE id = %s", [link_id])
    # On INSERT the given value is replaced by the derived one.
    db.execute("INSERT INTO linkhooks.links (slug, destination, redirect_url) VALUES ('j2', 'https://acme.com/j', 'javascript:x')")
    assert db.execute("SELECT linkhooks.resolve('j2')").fetchone()[0] == "https://acme.com/j"


def test_analysts_cannot_read_signatures_or_secrets(cluster, db, hostile, receiver):
    subscribe(db, receiver, "/sig", event_types=["link.created"])
    link(db, "sig")
    with hostile("analyst") as a:
        assert a.execute("SELECT count(*) FROM linkhooks.deliveries").fetchone()[0] == 1
        assert a.execute("SELECT event_type, body IS NOT NULL FROM linkhooks.deliveries").fetchone() == ("link.created", True)
        denied(a, "SELECT signature FROM linkhooks.deliveries")
        denied(a, "SELECT * FROM linkhooks.deliveries")
        denied(a, "SELECT secret FROM linkhooks.subscriptions")
        denied(a, "SELECT url FROM linkhooks.subscriptions")
        columns = [c.name for c in a.execute("SELECT * FROM linkhooks.delivery_log").description]
        assert not {"signature", "secret", "url"} & set(columns)


@pytest.mark.parametrize("column", ["name", "url", "secret", "enabled", "filters", "ip_mode", "created_at"])
def test_a_null_in_a_subscription_names_the_column_without_printing_the_row(db, column):
    """On 0.4.0 a NOT NULL violation printed "Failing row contains (...?token=..., whsec_...)"
    to the client and the server log."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    values = {"name": "n", "url": "https://hooks.example.com/x?token=SECRETTOKEN", "secret": secret, column: None}
    with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
        db.execute(f"INSERT INTO linkhooks.subscriptions ({', '.join(values)}) VALUES ({', '.join(['%s'] * len(values))})",
                   list(values.values()))
    text = f"{err.value} {err.value.diag.message_detail}"
    assert f"invalid {column}: must not be null" in text
    assert "SECRETTOKEN" not in text and secret not in text and "Failing row" not in text
    assert db.execute("SELECT count(*) FROM linkhooks.subscriptions").fetchone()[0] == 0


def test_sizes_are_bounded_with_errors_naming_the_field(db, receiver):
    subscribe(db, receiver, "/big", event_types=["link.clicked", "link.converted"])
    link_id = link(db, "big")
    huge = '{"x": "' + "y" * (20 * 1024 * 1024) + '"}'
    for statement, params, message in [
        ("INSERT INTO linkhooks.conversions (link_id, name, metadata) VALUES (%s, 'x', %s)", [link_id, huge],
         "invalid metadata: must be at most 16384 bytes as JSON"),
        ("INSERT INTO linkhooks.links (slug, destination, metadata) VALUES ('m', 'https://a.co/', %s)", [huge],
         "invalid metadata: must be at most 16384 bytes as JSON"),
        ("INSERT INTO linkhooks.clicks (link_id, city) VALUES (%s, %s)", [link_id, "c" * 201],
         "invalid city: must be at most 200 characters"),
        ("INSERT INTO linkhooks.clicks (link_id, country) VALUES (%s, %s)", [link_id, "c" * 201],
         "invalid country: must be a two-letter ISO 3166-1 code such as US"),
        ("INSERT INTO linkhooks.links (slug, destination, tags) VALUES ('t', 'https://a.co/', %s)",
         [[str(i) for i in range(51)]], "invalid tags: must have at most 50 tags"),
    ]:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
            db.execute(statement, params)
    # Nothing partial was written.
    assert db.execute("SELECT count(*) FROM linkhooks.clicks").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM linkhooks.conversions").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM linkhooks.deliveries").fetchone()[0] == 0

    # A landing URL comes from the request: stored capped, the click kept.
    db.execute("INSERT INTO linkhooks.clicks (link_id, landing_url) VALUES (%s, %s)", [link_id, "https://a.co/?" + "q" * 5000])
    assert db.execute("SELECT length(landing_url) FROM linkhooks.clicks").fetchone()[0] == 2048

    # The body limit is a setting; over it the write is refused and names it.
    db.execute("SET linkhooks.max_body_bytes = 1024")
    try:
        with pytest.raises(psycopg.errors.InvalidParameterValue,
                           match=r"invalid event body: the link.clicked event would be \d+ bytes, over linkhooks.max_body_bytes \(1024\)"):
            db.execute("INSERT INTO linkhooks.clicks (link_id, user_agent) VALUES (%s, %s)", [link_id, "u" * 1000])
    finally:
        db.execute("RESET linkhooks.max_body_bytes")
    assert db.execute("SELECT count(*) FROM linkhooks.clicks").fetchone()[0] == 1
