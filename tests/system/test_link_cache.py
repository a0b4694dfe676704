"""The per-session link cache (issue 6): a session that has cached a link
answers exactly what a query of the table would, whoever changed the link
and however."""

import psycopg
import pytest

from conftest import database, drop_database
from harness import wait_for
from test_links import IPHONE, link, resolve


@pytest.fixture
def other(cluster, db):
    """A second session, the one holding the cache."""
    with cluster.connect() as conn:
        yield conn


def test_a_committed_change_in_another_session_is_seen_at_once(db, other):
    link_id = link(db, "go", "https://acme.com/old")
    assert resolve(other, "go") == "https://acme.com/old"  # a first miss: read, not cached
    assert resolve(other, "go") == "https://acme.com/old"  # the second: cached now
    assert resolve(other, "go") == "https://acme.com/old"

    db.execute("UPDATE linkhooks.links SET destination = 'https://acme.com/new' WHERE id = %s", [link_id])
    assert resolve(other, "go") == "https://acme.com/new"
    db.execute("UPDATE linkhooks.links SET disabled = true, expired_url = 'https://acme.com/paused' WHERE id = %s", [link_id])
    assert resolve(other, "go") == "https://acme.com/paused"
    db.execute("UPDATE linkhooks.links SET slug = 'went' WHERE id = %s", [link_id])
    assert resolve(other, "go") is None
    db.execute("DELETE FROM linkhooks.links WHERE id = %s", [link_id])
    assert resolve(other, "went") is None


def test_an_uncommitted_change_is_invisible_to_others_and_visible_to_its_own_transaction(db, other):
    link_id = link(db, "go", "https://acme.com/old")
    assert resolve(db, "go") == resolve(other, "go") == "https://acme.com/old"
    assert resolve(db, "go") == resolve(other, "go") == "https://acme.com/old"  # cached by both
    with db.transaction():
        db.execute("UPDATE linkhooks.links SET destination = 'https://acme.com/new' WHERE id = %s", [link_id])
        assert resolve(db, "go") == "https://acme.com/new"
        assert resolve(other, "go") == "https://acme.com/old"
        db.execute("SAVEPOINT s")
        db.execute("UPDATE linkhooks.links SET destination = 'https://acme.com/newer' WHERE id = %s", [link_id])
        db.execute("ROLLBACK TO SAVEPOINT s")
        assert resolve(db, "go") == "https://acme.com/new"
    assert resolve(other, "go") == "https://acme.com/new"

    with pytest.raises(RuntimeError):
        with db.transaction():
            db.execute("UPDATE linkhooks.links SET destination = 'https://acme.com/rolled-back' WHERE id = %s", [link_id])
            assert resolve(db, "go") == "https://acme.com/rolled-back"
            raise RuntimeError("roll back")
    assert resolve(db, "go") == resolve(other, "go") == "https://acme.com/new"


def test_truncate_empties_every_cache(db, other):
    link(db, "go")
    assert resolve(other, "go") == resolve(other, "go") == "https://acme.com/x"  # cached on its second miss
    db.execute("TRUNCATE linkhooks.links CASCADE")
    assert resolve(other, "go") is None


def test_a_cached_link_expires_on_time(db, other):
    link(db, "soon", expired_url="https://acme.com/over", expires_at=None)
    other.execute("UPDATE linkhooks.links SET expires_at = now() + interval '1 second' WHERE slug = 'soon'")
    assert resolve(other, "soon") == resolve(other, "soon") == "https://acme.com/x"  # cached
    wait_for(lambda: resolve(other, "soon") == "https://acme.com/over", timeout=10, message="the cached link expired")


def test_click_limits_are_exact_with_the_cache(db, other):
    link(db, "two", max_clicks=2, expired_url="https://acme.com/sold-out")
    answers = [other.execute("SELECT linkhooks.record_click('two')").fetchone()[0] for _ in range(3)]
    assert answers == ["https://acme.com/x", "https://acme.com/x", "https://acme.com/sold-out"]
    assert resolve(db, "two") == "https://acme.com/sold-out"


def test_repeatable_read_keeps_its_snapshot(db, other):
    link_id = link(db, "go", "https://acme.com/old")
    other.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    try:
        assert resolve(other, "go") == "https://acme.com/old"
        db.execute("UPDATE linkhooks.links SET destination = 'https://acme.com/new' WHERE id = %s", [link_id])
        assert resolve(other, "go") == "https://acme.com/old"
    finally:
        other.execute("COMMIT")
    assert resolve(other, "go") == "https://acme.com/new"


def test_events_carry_the_current_link(db, other):
    db.execute("INSERT INTO linkhooks.subscriptions (name, url, event_types) "
                "VALUES ('crm', 'https://hooks.example.com/in', '{link.clicked}')")
    link_id = link(db, "go", campaign="spring")
    for _ in range(2):  # caches the link on its second miss
        other.execute("SELECT linkhooks.record_click('go', user_agent => %s)", [IPHONE])
    db.execute("UPDATE linkhooks.links SET campaign = 'summer' WHERE id = %s", [link_id])
    other.execute("INSERT INTO linkhooks.clicks (link_id, user_agent) VALUES (%s, %s)", [link_id, IPHONE])
    campaigns = [r[0] for r in db.execute("SELECT body::jsonb #>> '{data,link,campaign}' FROM linkhooks.deliveries "
                                          "WHERE event_type = 'link.clicked' ORDER BY id")]
    assert campaigns == ["spring", "spring", "summer"]
    db.execute("DELETE FROM linkhooks.clicks")
    db.execute("DELETE FROM linkhooks.links WHERE id = %s", [link_id])
    with pytest.raises(psycopg.Error, match=f"link {link_id} does not exist"):
        other.execute("INSERT INTO linkhooks.clicks (link_id) VALUES (%s)", [link_id])


def test_prepare_transaction_after_a_link_change_is_refused(db):
    link(db, "go")
    with pytest.raises(psycopg.Error, match="PREPARE TRANSACTION is not supported"):
        with db.transaction():
            db.execute("UPDATE linkhooks.links SET destination = 'https://acme.com/y' WHERE slug = 'go'")
            db.execute("PREPARE TRANSACTION 'p1'")


def test_no_cache_gives_the_same_answers(db, other):
    other.execute("SET linkhooks.link_cache_size = 0")
    link_id = link(db, "go", "https://acme.com/old")
    assert resolve(other, "go") == "https://acme.com/old"
    db.execute("UPDATE linkhooks.links SET destination = 'https://acme.com/new' WHERE id = %s", [link_id])
    assert resolve(other, "go") == "https://acme.com/new"


def test_resolve_in_a_parallel_worker_reads_the_table(db, other):
    link_id = link(db, "go", "https://acme.com/old")
    other.execute("SET force_parallel_mode = on")  # the call runs in a parallel worker
    assert "Gather" in other.execute("EXPLAIN SELECT linkhooks.resolve('go')").fetchone()[0]
    assert resolve(other, "go") == "https://acme.com/old"
    db.execute("UPDATE linkhooks.links SET destination = 'https://acme.com/new' WHERE id = %s", [link_id])
    assert resolve(other, "go") == "https://acme.com/new"


def test_a_session_finds_links_again_after_the_extension_is_recreated(cluster):
    """A session remembers where links and its indexes are; recreating them must not leave it pointing at the old ones."""
    try:
        with database(cluster, "lh_recreate") as admin, cluster.connect(dbname="lh_recreate") as session:
            admin.execute("CREATE EXTENSION pg_linkhooks")
            link(admin, "go", "https://acme.com/old")
            assert resolve(session, "go") == "https://acme.com/old"
            admin.execute("DROP EXTENSION pg_linkhooks CASCADE")
            admin.execute("CREATE EXTENSION pg_linkhooks")
            link(admin, "go", "https://acme.com/new")
            assert resolve(session, "go") == "https://acme.com/new"
    finally:
        drop_database(cluster, "lh_recreate")
