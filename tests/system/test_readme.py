"""The README is true: its tour runs as written, its payload examples have
exactly the fields real events have, and its settings and functions match the
extension (issue 5)."""

import json
import os
import re

import pytest

from conftest import subscribe
from harness import wait_for
from test_links import IPHONE

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
DOCS = ["README.md", "SECURITY.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs"))) if f.endswith(".md")]


def read(doc):
    with open(os.path.join(ROOT, doc)) as f:
        return f.read()


README = read("README.md")


def section(heading, doc="README.md"):
    """A document's text under a heading, up to the next heading of the same or a higher level."""
    text = read(doc)
    level = heading.split(" ")[0]
    start = text.index(heading + "\n")
    rest = text[start + len(heading) + 1:]
    ends = [m.start() for m in re.finditer(r"^#{1,%d} " % len(level), rest, re.M)]
    return rest[:ends[0]] if ends else rest


def code_blocks(text, lang):
    return re.findall(r"```%s\n(.*?)```" % lang, text, re.S)


def statements(sql):
    """(statement, expected first value or None) pairs. Statements end with ';' at the end of a
    line; a '-- → value' line right after one is the answer the README promises."""
    out, current = [], []
    for line in sql.splitlines():
        if line.startswith("-- →") and out:
            out[-1] = (out[-1][0], line[len("-- →"):].strip())
        elif line.startswith("--") or not line.strip():
            continue
        else:
            current.append(line)
            if line.rstrip().endswith(";"):
                out.append(("\n".join(current), None))
                current = []
    assert not current, "the tour ends with a complete statement"
    return out


def shown(value):
    """A value as psql shows it."""
    return {True: "t", False: "f"}.get(value, str(value)) if isinstance(value, bool) else str(value)


@pytest.fixture
def tour_roles(cluster):
    yield
    with cluster.connect() as c:
        for role in ("redirector", "dashboard"):
            if c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone():
                c.execute(f"DROP OWNED BY {role}")
                c.execute(f"DROP ROLE {role}")


def counting_state(db):
    """What the click counts read, for a failure message: the aggregator's cursor, the clicks and the counts."""
    return {"cursor": db.execute("SELECT snapshot::text, id_floor, updated_at FROM linkhooks.click_cursor").fetchall(),
            "now": db.execute("SELECT pg_current_snapshot()::text").fetchone()[0],
            "clicks": db.execute("SELECT id, link_id, txid::text, tableoid::regclass::text FROM linkhooks.clicks").fetchall(),
            "link_counts": db.execute("SELECT link_id, clicks FROM linkhooks.link_counts").fetchall()}


def test_tour_runs_as_written(db, tour_roles):
    # As on the demo cluster, the worker is up (at a cluster's start it takes a second).
    wait_for(lambda: db.execute("SELECT running FROM linkhooks.worker_status()").fetchone()[0], message="the worker")
    [tour] = code_blocks(section("## A five-minute tour"), "sql")
    steps = statements(tour)
    assert len(steps) >= 20
    checked = 0
    for sql, expected in steps:
        cur = db.execute(sql)
        if expected is not None:
            row = cur.fetchone()
            assert row is not None and shown(row[0]) == expected, (sql, counting_state(db))
            checked += 1
    assert checked >= 5, "the tour's promised answers were checked"
    # What the tour says it did, it did.
    assert db.execute("SELECT count(*) FROM linkhooks.deliveries WHERE event_type = 'webhook.test'").fetchone()[0] >= 1
    assert db.execute("SELECT has_function_privilege('redirector', 'linkhooks.record_click(text, inet, text, text, text, text, "
                      "text, text, text, text)', 'EXECUTE')").fetchone()[0]
    assert db.execute("SELECT count(*) FROM linkhooks.click_keys").fetchone()[0] == 1
    assert db.execute("SELECT slug, reason FROM linkhooks.link_misses").fetchall() == [("winter-sael", "unknown")]
    assert db.execute("SELECT has_table_privilege('dashboard', 'linkhooks.link_stats', 'SELECT')").fetchone()[0]


# Counts keyed by data (a country, a host), not by field name: compared as "a map".
COUNT_MAPS = {"countries", "devices", "referrers", "sources", "top_countries", "top_referrers"}


def shape(value, key=None):
    """The field names of a JSON value, recursively (list items and scalar values ignored)."""
    if key in COUNT_MAPS:
        return "map" if isinstance(value, dict) else value
    if isinstance(value, dict):
        return {k: shape(v, k) for k, v in value.items()}
    return None


def test_payload_examples_have_the_fields_real_events_have(db, receiver, destination):
    examples = {}
    for block in code_blocks(section("## Event payloads", "docs/payloads.md"), "json"):
        example = json.loads(block.replace("…", ""))
        examples[example["type"]] = example
    assert set(examples) == {"link.clicked", "qr.scanned", "link.converted", "link.created", "link.updated",
                             "link.expired", "campaign.completed", "webhook.test", "subscription.disabled",
                             "delivery.dead", "link.milestone", "campaign.milestone", "link.miss",
                             "link.threshold", "link.clicks.digest", "link.spike", "link.broken", "link.recovered"}
    # An operations endpoint, and one that answers 410 Gone: it is disabled and its event is dead.
    subscribe(db, receiver, "/ops", event_types=["subscription.disabled", "delivery.dead"])
    gone, _ = subscribe(db, receiver, "/gone", event_types=["webhook.test"])
    receiver.expect("/gone", receiver.paths["/gone"]["secrets"], script=[(410, {}, 0)])
    db.execute("SELECT linkhooks.send_test(%s)", [gone])

    sid, _ = subscribe(db, receiver, "/all", filters={"exclude_bots": False})
    db.execute("INSERT INTO linkhooks.campaigns (name, click_goal) VALUES ('winter-sale-2026', 2)")
    db.execute("""INSERT INTO linkhooks.rules (kind, campaign, settings) VALUES ('milestones', 'winter-sale-2026', '{"thresholds": [2]}')""")
    db.execute("""INSERT INTO linkhooks.rules (kind, settings) VALUES ('threshold', '{"clicks": 2, "window": "10m"}')""")
    db.execute("""INSERT INTO linkhooks.rules (kind, settings) VALUES ('spike', '{"min_clicks": 2, "baseline": "1h"}')""")
    db.execute("INSERT INTO linkhooks.links (slug, destination, campaign, tags, utm, max_clicks) VALUES "
               "('sale', 'https://acme.com/winter-sale', 'winter-sale-2026', '{social}', '{\"source\":\"instagram\",\"medium\":\"social\"}', 2)")
    db.execute("SELECT linkhooks.record_click('sale', ip => '203.0.113.42', user_agent => %s, referer => 'https://instagram.com/', "
               "landing_url => 'https://acme.com/winter-sale?utm_source=instagram&utm_medium=social&utm_campaign=winter-sale"
               "&utm_content=story')", [IPHONE])
    db.execute("SELECT linkhooks.record_click('sale', user_agent => %s, source => 'qr')", [IPHONE])
    db.execute("INSERT INTO linkhooks.conversions (click_id, name, amount, currency, metadata, external_id) "
               "SELECT min(id), 'purchase', 49.90, 'USD', '{\"order\": \"A-1001\"}', 'A-1001' FROM linkhooks.clicks")
    db.execute("SELECT linkhooks.record_click('sale')")  # past its max_clicks: a miss
    # A digest of last minute's clicks (that window has ended, so it is sent at once).
    subscribe(db, receiver, "/digest", event_types=["link.clicks.digest"], filters={"digest": "1m"})
    db.execute("INSERT INTO linkhooks.links (slug, destination) VALUES ('promo', 'https://acme.com/promo')")
    desktop = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"
    db.execute("INSERT INTO linkhooks.clicks (link_id, clicked_at, user_agent, country, referer, source) "
               "SELECT id, now() - interval '1 minute', ua, c, r, s FROM linkhooks.links, "
               "(VALUES (%s, 'US', 'https://instagram.com/', 'link'), (%s, 'DE', NULL, 'qr')) AS v(ua, c, r, s) "
               "WHERE slug = 'promo'", [IPHONE, desktop])
    db.execute("UPDATE linkhooks.links SET destination = 'https://acme.com/winter-sale-2'")
    db.execute("SELECT linkhooks.send_test(%s)", [sid])
    # A destination that fails, then answers: link.broken, then link.recovered.
    db.execute("INSERT INTO linkhooks.links (slug, destination, campaign, tags, utm) VALUES "
               "('landing', %s, 'winter-sale-2026', '{social}', '{\"source\":\"instagram\"}')", [destination.url("/")])
    db.execute("""INSERT INTO linkhooks.rules (kind, link_id, settings) SELECT 'health_check', id, '{"interval": "1s", "failures": 1}'
                  FROM linkhooks.links WHERE slug = 'landing'""")
    wait_for(lambda: any(r["json"]["type"] == "link.broken" for r in receiver.received("/all")), timeout=30,
             message="link.broken")
    destination.status = 200
    # Other links' events are not the examples' shape: the promo link's (for the digest) has no utm,
    # the landing link's are there for its health checks.
    def real_events():
        return {r["json"]["type"]: r for r in receiver.received("/all") + receiver.received("/ops") + receiver.received("/digest")
                if r["path"] == "/digest" or r["json"]["type"] in ("link.broken", "link.recovered")
                or (r["json"]["data"].get("link") or {}).get("slug") not in ("promo", "landing")}

    def missing():
        rows = db.execute("SELECT subscription_id, event_type, status, attempts FROM linkhooks.deliveries ORDER BY id").fetchall()
        return (f"one event of each type; missing {sorted(set(examples) - set(real_events()))}, "
                f"received {[(r['path'], r['json']['type']) for r in receiver.received()]}, queued {rows}, "
                f"counted {counting_state(db)}")

    real = wait_for(lambda: (lambda got: got if set(got) >= set(examples) else None)(real_events()), message=missing)
    for kind, example in examples.items():
        assert shape(real[kind]["json"]) == shape(example), kind
    assert '"amount":49.90' in real["link.converted"]["body"], "amounts keep their exact digits"


def test_settings_table_lists_every_setting_with_its_default(db):
    rows = re.findall(r"^\| `(linkhooks\.[a-z_]+)` \| (.*?) \|", read("docs/settings.md"), re.M)
    documented = {name: default.strip("`'") for name, default in rows}
    actual = dict(db.execute("SELECT name, coalesce(boot_val, '') FROM pg_settings WHERE name LIKE 'linkhooks.%'").fetchall())
    assert documented == actual


def test_every_function_is_documented(db):
    api = section("## Functions", "docs/sql-reference.md")
    functions = {r[0] for r in db.execute(
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'linkhooks' AND p.prorettype <> 'trigger'::regtype AND p.proname <> 'apply_access'").fetchall()}
    undocumented = {f for f in functions if f"`{f}(" not in api}
    assert functions and not undocumented


def test_every_table_column_is_documented(db):
    reference = read("docs/sql-reference.md")
    columns = db.execute("SELECT c.relname, a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
                         "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'linkhooks' "
                         "AND c.relkind IN ('r', 'p') AND NOT c.relispartition AND a.attnum > 0 AND NOT a.attisdropped").fetchall()
    assert len(columns) > 80
    for table, column in columns:
        start = reference.index(f"**`{table}`**")
        end = reference.find("**`", start + 1)
        assert f"`{column}`" in reference[start:end if end > 0 else None], f"{table}.{column}"


def test_the_front_page_is_short_and_every_link_resolves():
    assert len(README.splitlines()) < 250
    for doc in DOCS:
        text = read(doc)
        assert "DESIGN.md" not in text and "../shared" not in text, doc
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not target.startswith(("http://", "https://", "mailto:")):
                path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target))
                assert os.path.exists(path), f"{doc} links to {target}, which is not in the repository"


def test_local_testing_runs_as_written(cluster):
    [block] = code_blocks(section("## Local testing"), "sql")
    with cluster.connect() as c:
        try:
            for statement, _ in statements(block):
                c.execute(statement)
        finally:
            for name in ("linkhooks.allow_private_targets", "linkhooks.require_https"):
                c.execute(f"ALTER SYSTEM RESET {name}")
            c.execute("SELECT pg_reload_conf()")
