"""Access levels: each test logs in as a role given one level with
linkhooks.grant_access and proves what it can and cannot do (issue 5)."""

import psycopg
from psycopg import sql
import pytest

from conftest import subscribe
from harness import wait_for
from test_links import IPHONE, link

ROLES = {"lh_writer": "writer", "lh_analyst": "analyst", "lh_admin": "admin"}


@pytest.fixture(scope="module")
def roles(cluster):
    with cluster.connect() as c:
        for role, access in ROLES.items():
            c.execute(f"DROP ROLE IF EXISTS {role}")
            c.execute(f"CREATE ROLE {role} LOGIN")
            c.execute("SELECT linkhooks.grant_access(%s, %s)", [role, access])
    yield
    with cluster.connect() as c:
        for role in ROLES:
            c.execute(f"DROP OWNED BY {role}")
            c.execute(f"DROP ROLE {role}")


def login(cluster, role):
    return psycopg.connect(host="127.0.0.1", port=cluster.port, user=role, dbname="postgres", autocommit=True)


def denied(conn, sql, params=()):
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(sql, params)


def test_writer_resolves_and_records_clicks_and_nothing_else(cluster, db, roles, receiver):
    subscribe(db, receiver, "/clicks", event_types=["link.clicked", "link.converted"])
    link_id = link(db, "w", "https://acme.com/w")
    with login(cluster, "lh_writer") as w:
        assert w.execute("SELECT linkhooks.resolve('w')").fetchone()[0] == "https://acme.com/w"
        assert w.execute("SELECT linkhooks.record_click('w', user_agent => %s)", [IPHONE]).fetchone()[0] == "https://acme.com/w"
        click_id = w.execute("INSERT INTO linkhooks.clicks (link_id, user_agent) VALUES (%s, %s) RETURNING id",
                             [link_id, IPHONE]).fetchone()[0]
        w.execute("INSERT INTO linkhooks.conversions (click_id, name) VALUES (%s, 'signup')", [click_id])

        for table in ["campaigns", "subscriptions", "deliveries", "delivery_attempts", "dead_letters",
                      "delivery_log", "subscription_health", "link_stats"]:
            denied(w, f"SELECT count(*) FROM linkhooks.{table}")
        denied(w, "SELECT ip, user_agent FROM linkhooks.clicks")
        # A link's id by its slug, for a plain INSERT of a click; nothing else of links.
        assert w.execute("SELECT id FROM linkhooks.links WHERE domain = '' AND slug = 'w'").fetchone()[0] == link_id
        denied(w, "SELECT destination FROM linkhooks.links")
        denied(w, "UPDATE linkhooks.links SET destination = 'https://evil.example/' WHERE id = %s", [link_id])
        denied(w, "INSERT INTO linkhooks.links (slug, destination) VALUES ('x', 'https://acme.com/')")
        denied(w, "DELETE FROM linkhooks.clicks")
        denied(w, "INSERT INTO linkhooks.deliveries (event_id, subscription_id, event_type, body, signed_at, signature) "
                  "VALUES (gen_random_uuid(), 1, 'link.clicked', '{}', 0, 'v1,x')")
        denied(w, "INSERT INTO linkhooks.subscriptions (name, url) VALUES ('mine', 'https://hooks.example.com/')")
        for call in ["linkhooks.send_test(1)", "linkhooks.replay(1)", "linkhooks.replay_dead_letters()",
                     "linkhooks.rotate_secret(1)", "linkhooks.run_maintenance()", "linkhooks.worker_status()",
                     "linkhooks.grant_access('lh_writer', 'admin')"]:
            denied(w, f"SELECT {call}")

    # What the writer did is real: two clicks, a conversion, and their webhooks.
    assert db.execute("SELECT count(*) FROM linkhooks.clicks WHERE link_id = %s", [link_id]).fetchone()[0] == 2
    assert db.execute("SELECT device FROM linkhooks.clicks WHERE id = %s", [click_id]).fetchone()[0] == "mobile"
    wait_for(lambda: sorted(r["json"]["type"] for r in receiver.received("/clicks")) ==
             ["link.clicked", "link.clicked", "link.converted"], message="the writer's events delivered")


def test_analyst_reads_everything_but_secrets_and_writes_nothing(cluster, db, roles, receiver):
    subscribe(db, receiver, "/a", event_types=["link.created"])
    link_id = link(db, "an", campaign="c1")
    db.execute("INSERT INTO linkhooks.clicks (link_id, user_agent, referer) VALUES (%s, %s, 'https://t.co/x')", [link_id, IPHONE])
    db.execute("INSERT INTO linkhooks.conversions (link_id, name) VALUES (%s, 'lead')", [link_id])
    wait_for(lambda: db.execute("SELECT count(*) FROM linkhooks.deliveries WHERE status = 'delivered'").fetchone()[0] == 1,
             message="a delivered row")
    with login(cluster, "lh_analyst") as a:
        for table, n in [("links", 1), ("clicks", 1), ("conversions", 1), ("campaigns", 0), ("deliveries", 1),
                         ("delivery_attempts", 1), ("dead_letters", 0), ("delivery_log", 1), ("subscription_health", 2),
                         ("link_stats", 1), ("link_daily_clicks", 1), ("link_click_breakdown", 6), ("campaign_stats", 1),
                         ("click_facts", 1)]:
            assert a.execute(f"SELECT count(*) FROM linkhooks.{table}").fetchone()[0] == n, table
        assert a.execute("SELECT name, enabled, event_types FROM linkhooks.subscriptions").fetchall() == \
            [("a", True, ["link.created"])]
        assert a.execute("SELECT running FROM linkhooks.worker_status()").fetchone()[0] is True
        assert a.execute("SELECT human_clicks, conversions FROM linkhooks.link_stats").fetchone() == (1, 1)

        for column in ["secret", "previous_secret", "url", "*"]:
            denied(a, f"SELECT {column} FROM linkhooks.subscriptions")
        denied(a, "SELECT * FROM linkhooks.subscription_state")
        denied(a, "INSERT INTO linkhooks.links (slug, destination) VALUES ('x', 'https://acme.com/')")
        denied(a, "UPDATE linkhooks.links SET disabled = true")
        denied(a, "DELETE FROM linkhooks.clicks")
        denied(a, "INSERT INTO linkhooks.clicks (link_id) VALUES (%s)", [link_id])
        denied(a, "UPDATE linkhooks.deliveries SET status = 'pending'")
        for call in ["linkhooks.record_click('an')", "linkhooks.send_test(1)", "linkhooks.replay(1)",
                     "linkhooks.replay_dead_letters()", "linkhooks.rotate_secret(1)", "linkhooks.generate_secret()"]:
            denied(a, f"SELECT {call}")


def test_admin_manages_links_and_subscriptions_and_replays(cluster, db, roles, receiver):
    receiver.expect("/adm", [], script=[(500, {}, 0)])
    with login(cluster, "lh_admin") as m:
        link_id = m.execute("INSERT INTO linkhooks.links (slug, destination) VALUES ('adm', 'https://acme.com/') "
                            "RETURNING id").fetchone()[0]
        m.execute("UPDATE linkhooks.links SET destination = 'https://acme.com/new' WHERE id = %s", [link_id])
        m.execute("INSERT INTO linkhooks.campaigns (name, click_goal) VALUES ('q3', 10)")
        sub_id, secret = m.execute("INSERT INTO linkhooks.subscriptions (name, url, max_attempts, event_types) "
                                   "VALUES ('adm', %s, 1, '{webhook.test}') RETURNING id, secret",
                                   [receiver.url("/adm")]).fetchone()
        receiver.expect("/adm", [secret], script=[(500, {}, 0)])
        m.execute("SELECT linkhooks.send_test(%s)", [sub_id])
        wait_for(lambda: m.execute("SELECT count(*) FROM linkhooks.dead_letters").fetchone()[0] == 1, message="dead letter")
        assert m.execute("SELECT linkhooks.replay_dead_letters()").fetchone()[0] == 1
        wait_for(lambda: m.execute("SELECT count(*) FROM linkhooks.delivery_log WHERE status = 'delivered'").fetchone()[0] == 1,
                 message="the replay delivered")
        new_secret = m.execute("SELECT linkhooks.rotate_secret(%s)", [sub_id]).fetchone()[0]
        assert m.execute("SELECT secret FROM linkhooks.subscriptions WHERE id = %s", [sub_id]).fetchone()[0] == new_secret
        assert "links_expired" in m.execute("SELECT linkhooks.run_maintenance()").fetchone()[0]
        assert m.execute("SELECT count(*) FROM linkhooks.subscription_health").fetchone()[0] == 2
        m.execute("DELETE FROM linkhooks.links WHERE id = %s", [link_id])

        denied(m, "UPDATE linkhooks.deliveries SET status = 'delivered'")
        denied(m, "UPDATE linkhooks.dead_letters SET replayed_at = now()")  # clearing them (DELETE) is allowed
        denied(m, "INSERT INTO linkhooks.delivery_attempts (delivery_id, attempt, started_at, duration_ms) VALUES (1, 1, now(), 1)")
        denied(m, "DELETE FROM linkhooks.clicks")
        denied(m, "SELECT linkhooks.grant_access('lh_admin', 'writer')")
        denied(m, "SELECT linkhooks.record_click('adm')")
    assert len([r for r in receiver.received("/adm") if r["verified_with"] == [secret]]) == 2


def test_revoke_access_takes_it_back(cluster, db, roles):
    link(db, "rv")
    with cluster.connect() as c:
        c.execute("DROP ROLE IF EXISTS lh_temp")
        c.execute("CREATE ROLE lh_temp LOGIN")
        try:
            statements = [r[0] for r in c.execute("SELECT linkhooks.grant_access('lh_temp', 'writer')").fetchall()]
            assert statements[0] == "GRANT USAGE ON SCHEMA linkhooks TO lh_temp"
            with login(cluster, "lh_temp") as t:
                assert t.execute("SELECT linkhooks.resolve('rv')").fetchone()[0] == "https://acme.com/x"
            c.execute("SELECT linkhooks.revoke_access('lh_temp', 'writer')")
            with login(cluster, "lh_temp") as t:
                denied(t, "SELECT linkhooks.resolve('rv')")
                denied(t, "INSERT INTO linkhooks.clicks (link_id) VALUES (1)")
        finally:
            c.execute("DROP OWNED BY lh_temp")
            c.execute("DROP ROLE lh_temp")


def test_grant_access_refuses_bad_input_and_quotes_role_names(cluster, db):
    with pytest.raises(psycopg.Error, match=r"invalid access: must be 'writer', 'analyst', 'admin' or 'owner' \(got 'root'\)"):
        db.execute("SELECT linkhooks.grant_access('postgres', 'root')")
    with pytest.raises(psycopg.Error, match="invalid role_name: role nobody_here does not exist"):
        db.execute("SELECT linkhooks.grant_access('nobody_here', 'analyst')")
    odd = 'Odd "role"; DROP TABLE x'
    db.execute("CREATE ROLE {} LOGIN".format(sql.Identifier(odd).as_string(db)))
    try:
        statements = [r[0] for r in db.execute("SELECT linkhooks.grant_access(%s, 'analyst')", [odd]).fetchall()]
        assert statements[-1] == 'GRANT EXECUTE ON FUNCTION linkhooks.worker_status() TO "Odd ""role""; DROP TABLE x"'
        assert db.execute("SELECT has_table_privilege(%s, 'linkhooks.links', 'SELECT')", [odd]).fetchone()[0]
    finally:
        db.execute(sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(odd)))
