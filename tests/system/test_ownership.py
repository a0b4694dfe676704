"""The ownership model (issue 21): the extension is trusted, so the owner of a
database who is not a superuser installs it, administers it, dumps and restores
it; and cannot use it, or the schema it lives in, to act as a superuser."""

import os
import subprocess

import psycopg
import pytest

from harness import BIN
from test_links import IPHONE

OWNER, WRITER = "lh_app_owner", "lh_app_writer"
DATABASES = ["lh_app", "lh_app_copy"]


def connect(cluster, user, dbname="lh_app"):
    return psycopg.connect(host="127.0.0.1", port=cluster.port, user=user, dbname=dbname, autocommit=True)


def run_as(cluster, user, tool, *args, env=None):
    result = subprocess.run([f"{BIN}/{tool}", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", user, *args],
                            capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    return result


def drop_all(c):
    for name in DATABASES:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    for role in (WRITER, OWNER):
        if c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone():
            # Parameter privileges live cluster-wide; nothing else is left once the databases are gone.
            c.execute(f"REVOKE ALL ON PARAMETER linkhooks.restore FROM {role}")
            c.execute(f"DROP ROLE {role}")


@pytest.fixture
def app(cluster):
    """An `lh_app` database owned by a role that is not a superuser, and a connection as it."""
    with cluster.connect() as c:
        drop_all(c)
        c.execute(f"CREATE ROLE {OWNER} LOGIN")
        c.execute(f"CREATE ROLE {WRITER} LOGIN")
        c.execute(f"CREATE DATABASE lh_app OWNER {OWNER}")
    with connect(cluster, OWNER) as owner:
        yield owner
    with cluster.connect() as c:
        drop_all(c)


def test_a_database_owner_installs_administers_dumps_and_restores(cluster, app):
    app.execute("CREATE EXTENSION pg_linkhooks")
    assert app.execute("SELECT e.extowner::regrole::text, r.rolsuper, n.nspowner::regrole::text "
                       "FROM pg_extension e JOIN pg_roles r ON r.oid = e.extowner "
                       "JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pg_linkhooks'").fetchone() == \
        (OWNER, False, "postgres"), "the installer owns the extension; its objects and schema stay the superuser's"
    # Administers: subscriptions (secrets included), links, rules, and who may do what.
    app.execute("INSERT INTO linkhooks.subscriptions (name, url) VALUES ('crm', 'https://hooks.example.com/crm')")
    assert app.execute("SELECT secret FROM linkhooks.subscriptions").fetchone()[0].startswith("whsec_")
    app.execute("INSERT INTO linkhooks.links (slug, destination) VALUES ('sale', 'https://acme.com/sale')")
    app.execute("""INSERT INTO linkhooks.rules (kind, settings) VALUES ('milestones', '{"thresholds": [1]}')""")
    app.execute("SELECT linkhooks.grant_access(%s, 'writer')", [WRITER])
    with connect(cluster, WRITER) as writer:
        assert writer.execute("SELECT linkhooks.record_click('sale', user_agent => %s)", [IPHONE]).fetchone()[0] == \
            "https://acme.com/sale"
    app.execute("INSERT INTO linkhooks.conversions (click_id, name, external_id) SELECT id, 'order', 'A-1' FROM linkhooks.clicks")
    app.execute("SELECT linkhooks.run_aggregation()")
    app.execute("SELECT linkhooks.run_maintenance()")  # dated partitions, as the housekeeper makes them
    assert app.execute("SELECT count(*) FROM linkhooks.partitions WHERE range_start IS NOT NULL").fetchone()[0] > 0
    app.execute("ALTER EXTENSION pg_linkhooks UPDATE")  # its owner may (a NOTICE: already at the latest)
    tables = ["links", "clicks", "conversions", "subscriptions", "deliveries", "rules", "link_counts", "milestones"]
    source = {t: app.execute(f"SELECT * FROM linkhooks.{t} ORDER BY 1").fetchall() for t in tables}
    assert sorted(r[3] for r in source["deliveries"]) == ["link.clicked", "link.converted", "link.created", "link.milestone"]

    # Dumps its own database, and restores it into another it owns, without emitting anything again
    # (without the dump's GRANTs, which only a superuser may replay: levels are handed out again).
    # The partitions maintenance made are the superuser's tables, in the superuser's schema: the owner
    # restores their rows through their tables (--load-via-partition-root) and lets maintenance make
    # them again (docs/operations.md, "Backups": this is its recipe).
    dump = os.path.join(cluster.dir, "lh_app.dump")
    run_as(cluster, OWNER, "pg_dump", "-Fc", "--load-via-partition-root", "-f", dump, "lh_app")
    with cluster.connect() as c:
        c.execute(f"CREATE DATABASE lh_app_copy OWNER {OWNER}")
    listing = os.path.join(cluster.dir, "lh_app.list")
    subprocess.run(["bash", "-c", f"{BIN}/pg_restore -l {dump} | awk "
                    "'!/ linkhooks (clicks|deliveries|delivery_attempts)_p[0-9]/ || (/ TABLE DATA / && !/_expired /)' "
                    f"> {listing}"], check=True)
    run_as(cluster, OWNER, "pg_restore", "--no-owner", "--no-acl", "-L", listing, "-d", "lh_app_copy", dump,
           env={"PGOPTIONS": "-c linkhooks.restore=on"})
    with connect(cluster, OWNER, "lh_app_copy") as copy:
        copy.execute("SELECT linkhooks.run_maintenance()")
        assert copy.execute("SELECT count(*) FROM linkhooks.clicks_default").fetchone()[0] == 0, "moved to partitions"
        for table in tables:
            assert copy.execute(f"SELECT * FROM linkhooks.{table} ORDER BY 1").fetchall() == source[table], table
        # Restore mode was that session's only: the triggers work again, identities continue.
        assert copy.execute("SHOW linkhooks.restore").fetchone()[0] == "off"
        copy.execute("INSERT INTO linkhooks.links (slug, destination) VALUES ('after', 'https://acme.com/after')")
        assert copy.execute("SELECT count(*) FROM linkhooks.deliveries").fetchone()[0] == len(source["deliveries"]) + 1
        assert copy.execute("SELECT max(id) FROM linkhooks.links").fetchone()[0] == max(r[0] for r in source["links"]) + 1
        copy.execute("SELECT linkhooks.grant_access(%s, 'writer')", [WRITER])
    with connect(cluster, WRITER, "lh_app_copy") as writer:
        assert writer.execute("SELECT linkhooks.record_click('after')").fetchone()[0] == "https://acme.com/after"
    assert not app.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]


def test_restore_mode_is_the_owners_alone(cluster, app):
    app.execute("CREATE EXTENSION pg_linkhooks")
    app.execute("SELECT linkhooks.grant_access(%s, 'writer')", [WRITER])
    app.execute("SET linkhooks.restore = on")  # granted to the installer
    with connect(cluster, WRITER) as writer:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match='permission denied to set parameter "linkhooks.restore"'):
            writer.execute("SET linkhooks.restore = on")
        # And levels are the owner's to hand out.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            writer.execute("SELECT linkhooks.grant_access(%s, 'admin')", [WRITER])


def test_a_database_owner_cannot_turn_the_install_against_the_superuser(cluster, app):
    # A schema prepared with the installer's own objects: refused, nothing installed.
    app.execute("CREATE SCHEMA linkhooks")
    app.execute("CREATE FUNCTION linkhooks.now() RETURNS timestamptz LANGUAGE sql AS 'SELECT ''2000-01-01''::timestamptz'")
    with pytest.raises(psycopg.Error, match='schema "linkhooks" must be empty before CREATE EXTENSION pg_linkhooks'):
        app.execute("CREATE EXTENSION pg_linkhooks")
    assert app.execute("SELECT count(*) FROM pg_extension WHERE extname = 'pg_linkhooks'").fetchone()[0] == 0
    # An empty one, opened to everybody: installed, and then the superuser's alone.
    app.execute("DROP FUNCTION linkhooks.now()")
    app.execute("GRANT ALL ON SCHEMA linkhooks TO PUBLIC")
    app.execute("CREATE EXTENSION pg_linkhooks")
    assert app.execute("SELECT nspowner::regrole::text, nspacl::text[] FROM pg_namespace WHERE nspname = 'linkhooks'").fetchone() == \
        ("postgres", ["postgres=UC/postgres", "=U/postgres", f"{OWNER}=U/postgres"]), \
        "the superuser's, and the CREATE granted to PUBLIC before is gone"
    for attack in [
        "CREATE FUNCTION linkhooks.now() RETURNS timestamptz LANGUAGE sql AS 'SELECT now()'",
        "CREATE TABLE linkhooks.planted (x int)",
        "DROP TABLE linkhooks.deliveries",
        "ALTER TABLE linkhooks.clicks DISABLE TRIGGER ALL",
        "CREATE TRIGGER planted BEFORE INSERT ON linkhooks.clicks FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()",
        "ALTER FUNCTION linkhooks.run_maintenance() SECURITY INVOKER",
        "ALTER VIEW linkhooks.link_stats RENAME TO link_stats_old",
    ]:
        with pytest.raises(psycopg.Error):
            app.execute(attack)
    # Releases before 0.5.0 were not trusted: a database owner cannot install one to update from.
    app.execute("DROP EXTENSION pg_linkhooks")  # its owner may; the empty schema stays the superuser's
    with pytest.raises(psycopg.Error, match="before 0.5.0 install for superusers only"):
        app.execute("CREATE EXTENSION pg_linkhooks VERSION '0.4.0'")
    assert not app.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
