"""Links, the redirect lookup, click recording and enrichment (issue 2)."""

import threading

import psycopg
from psycopg.types.json import Jsonb
import pytest

IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 "
          "(KHTML, like Gecko) Version/17.2 Mobile/15E148 Safari/604.1")


def link(db, slug, destination="https://acme.com/x", **cols):
    cols = {"slug": slug, "destination": destination, **cols}
    names = ", ".join(cols)
    marks = ", ".join(["%s"] * len(cols))
    return db.execute(f"INSERT INTO linkhooks.links ({names}) VALUES ({marks}) RETURNING id", list(cols.values())).fetchone()[0]


def resolve(db, slug, domain=""):
    return db.execute("SELECT linkhooks.resolve(%s, %s)", [slug, domain]).fetchone()[0]


def test_resolve_answers_for_every_link_state(db):
    link(db, "active", "https://acme.com/a?x=1#frag", utm=Jsonb({"utm_source": "ig", "medium": "social"}))
    link(db, "timed", expires_at="2000-01-01", expired_url="https://acme.com/expired")
    link(db, "limited", max_clicks=1, expired_url="https://acme.com/sold-out")
    link(db, "off", disabled=True)
    link(db, "off2", disabled=True, expired_url="https://acme.com/paused")
    assert resolve(db, "active") == "https://acme.com/a?x=1&utm_source=ig&utm_medium=social#frag"
    assert resolve(db, "timed") == "https://acme.com/expired"
    assert resolve(db, "limited") == "https://acme.com/x"
    assert db.execute("SELECT linkhooks.record_click('limited')").fetchone()[0] == "https://acme.com/x"
    assert resolve(db, "limited") == "https://acme.com/sold-out"
    assert db.execute("SELECT linkhooks.record_click('limited')").fetchone()[0] == "https://acme.com/sold-out"
    assert resolve(db, "off") is None
    assert resolve(db, "off2") == "https://acme.com/paused"
    assert resolve(db, "unknown") is None
    assert db.execute("SELECT linkhooks.record_click('unknown')").fetchone()[0] is None
    # only the one active click on 'limited' was recorded; expired/disabled/unknown record nothing
    assert db.execute("SELECT count(*) FROM linkhooks.clicks").fetchone()[0] == 1


def test_slugs_are_per_domain(db):
    link(db, "sale", "https://acme.com/default")
    link(db, "sale", "https://acme.com/branded", domain="go.acme.co")
    assert resolve(db, "sale") == "https://acme.com/default"
    assert resolve(db, "sale", "go.acme.co") == "https://acme.com/branded"


def test_resolve_is_stable_and_uses_one_index_probe(db):
    assert db.execute("SELECT provolatile FROM pg_proc WHERE proname = 'resolve'").fetchone()[0] == "s"
    plan = db.execute("EXPLAIN SELECT destination FROM linkhooks.links WHERE domain = '' AND slug = 'x'").fetchall()
    assert "links_slug_unique_per_domain" in " ".join(r[0] for r in plan)


@pytest.mark.parametrize("cols, message", [
    ({"destination": "acme.com/no-scheme"}, "invalid destination: must be an absolute http or https URL"),
    ({"destination": "ftp://acme.com/file"}, "invalid destination: must use http or https"),
    ({"destination": "https://acme.com/" + "a" * 2048}, "invalid destination: must be at most 2048 characters"),
    ({"destination": "https://user:pw@acme.com/"}, "invalid destination: must not contain credentials"),
    ({"slug": ""}, "invalid slug: must not be empty"),
    ({"slug": "a" * 65}, "invalid slug: must be at most 64 characters"),
    ({"slug": "no spaces"}, "invalid slug: may contain only A-Z, a-z, 0-9, '-' and '_'"),
    ({"max_clicks": 0}, "invalid max_clicks: must be greater than 0"),
    ({"max_clicks": -5}, "invalid max_clicks: must be greater than 0"),
    ({"expired_url": "not-a-url"}, "invalid expired_url: must be an absolute http or https URL"),
    # Stored as written and handed to the redirect's Location header.
    ({"destination": " https://acme.com/"}, "invalid destination: must not contain spaces or control characters"),
    ({"expired_url": "https://acme.com/gone\r\nSet-Cookie: s=1"},
     "invalid expired_url: must not contain spaces or control characters"),
    ({"utm": Jsonb({"source": "x" * 401})}, "invalid utm: 'source' must be at most 400 characters (got 401)"),
    ({"expires_at": "infinity"}, "invalid expires_at: must be a time, not infinity (NULL: the link never expires)"),
])
def test_bad_links_are_refused_with_the_field_and_rule(db, cols, message):
    cols = {"slug": "ok", "destination": "https://acme.com/", **cols}
    with pytest.raises(psycopg.Error) as err:
        link(db, cols.pop("slug"), cols.pop("destination"), **cols)
    assert message in str(err.value)
    assert db.execute("SELECT count(*) FROM linkhooks.links").fetchone()[0] == 0


def test_duplicate_slug_in_a_domain_is_refused(db):
    link(db, "dup")
    with pytest.raises(psycopg.errors.UniqueViolation, match="duplicate slug: 'dup' already exists in domain ''"):
        link(db, "dup")
    assert db.execute("SELECT count(*) FROM linkhooks.links").fetchone()[0] == 1


def test_bad_clicks_are_refused_and_write_nothing(db):
    link_id = link(db, "c")
    with pytest.raises(psycopg.Error, match="invalid source: must be 'link' or 'qr'"):
        db.execute("INSERT INTO linkhooks.clicks (link_id, source) VALUES (%s, 'email')", [link_id])
    with pytest.raises(psycopg.Error, match="invalid source: must be 'link' or 'qr'"):
        db.execute("SELECT linkhooks.record_click('c', source => 'email')")
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="invalid link_id: link 999 does not exist"):
        db.execute("INSERT INTO linkhooks.clicks (link_id) VALUES (999)")
    for utm, message in [('"x"', "invalid utm: must be a JSON object"), ('{"evil": [1]}', "invalid utm: unknown key 'evil'")]:
        with pytest.raises(psycopg.Error, match=message):
            db.execute("INSERT INTO linkhooks.clicks (link_id, utm) VALUES (%s, %s)", [link_id, utm])
    assert db.execute("SELECT count(*) FROM linkhooks.clicks").fetchone()[0] == 0


@pytest.mark.parametrize("assignment, message", [
    ("clicked_at = '0044-03-15 BC'", "invalid clicked_at: must be on or after 2000-01-01 00:00 UTC"),
    ("clicked_at = 'infinity'", "invalid clicked_at: must be a time, not infinity"),
    ("country = 'USA'", "invalid country: must be a two-letter ISO 3166-1 code such as US (got 'USA')"),
    ("source = 'email'", "invalid source: must be 'link' or 'qr' (got 'email')"),
])
def test_an_update_of_a_click_is_checked_as_an_insert_is(db, assignment, message):
    link(db, "u")
    db.execute("SELECT linkhooks.record_click('u', country => 'DE')")
    with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
        db.execute(f"UPDATE linkhooks.clicks SET {assignment}")
    assert err.value.diag.message_primary == message
    assert db.execute("SELECT country, source FROM linkhooks.clicks").fetchone() == ("DE", "link")


def test_plain_insert_gets_the_same_enrichment_as_record_click(db):
    link_id = link(db, "e")
    db.execute("INSERT INTO linkhooks.clicks (link_id, ip, user_agent, referer, landing_url) VALUES (%s, '203.0.113.9', %s, 'https://t.co', "
               "'https://acme.com/?utm_source=tw&utm_campaign=launch')", [link_id, IPHONE])
    db.execute("SELECT linkhooks.record_click('e', '203.0.113.9', %s, source => 'qr')", [IPHONE])
    db.execute("INSERT INTO linkhooks.clicks (link_id, user_agent) VALUES (%s, 'Twitterbot/1.0')", [link_id])
    db.execute("INSERT INTO linkhooks.clicks (link_id) VALUES (%s)", [link_id])
    db.execute("INSERT INTO linkhooks.clicks (link_id, user_agent, device) VALUES (%s, %s, 'tablet')", [link_id, IPHONE])
    # Every derived column given: the trigger changes nothing and the row goes in as written.
    db.execute("INSERT INTO linkhooks.clicks (link_id, ip, user_agent, device, browser, os, is_bot) "
               "VALUES (%s, '198.51.100.7/24', %s, 'desktop', 'Lynx', 'Plan 9', true)", [link_id, IPHONE])
    rows = db.execute("SELECT device, browser, os, is_bot, utm, source FROM linkhooks.clicks ORDER BY id").fetchall()
    assert rows[0] == ("mobile", "Safari", "iOS", False, {"source": "tw", "campaign": "launch"}, "link")
    assert rows[1] == ("mobile", "Safari", "iOS", False, None, "qr")
    assert rows[2][0] == "bot" and rows[2][3] is True
    assert rows[3][0] == "bot" and rows[3][3] is True, "an empty user agent is a bot"
    assert rows[4][0] == "tablet", "a value the caller gives is kept"
    assert rows[5] == ("desktop", "Lynx", "Plan 9", True, None, "link")


def test_oversized_user_agent_and_referer_are_truncated_not_refused(db):
    link_id = link(db, "t")
    db.execute("INSERT INTO linkhooks.clicks (link_id, user_agent, referer) VALUES (%s, %s, %s)",
               [link_id, "U" * 5000, "https://r.example/" + "r" * 5000])
    ua, ref = db.execute("SELECT user_agent, referer FROM linkhooks.clicks").fetchone()
    assert len(ua) == 1024 and len(ref) == 1024


def test_max_clicks_is_exact_under_concurrency(cluster, db):
    link(db, "few", max_clicks=25, expired_url="https://acme.com/gone")
    answers = []

    def clicker():
        with cluster.connect() as c:
            for _ in range(10):
                answers.append(c.execute("SELECT linkhooks.record_click('few', user_agent => %s)", [IPHONE]).fetchone()[0])

    threads = [threading.Thread(target=clicker) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert answers.count("https://acme.com/x") == 25
    assert answers.count("https://acme.com/gone") == 55
    assert db.execute("SELECT count(*) FROM linkhooks.clicks").fetchone()[0] == 25
    # a plain INSERT past the limit is refused too
    with pytest.raises(psycopg.errors.CheckViolation, match="has reached its max_clicks of 25"):
        db.execute("INSERT INTO linkhooks.clicks (link_id) SELECT id FROM linkhooks.links WHERE slug = 'few'")


def test_rolled_back_click_does_not_count(cluster, db):
    link(db, "rb", max_clicks=1)
    with cluster.connect() as c:
        c.autocommit = False
        c.execute("SELECT linkhooks.record_click('rb')")
        c.rollback()
    assert resolve(db, "rb") == "https://acme.com/x"
