"""Bulk ingest (issue 20): COPY and multi-row INSERT store the same clicks and queue the same events as the
same clicks inserted one by one, also when they cross a link's max_clicks."""

import json

import psycopg
import pytest
from psycopg import sql

from conftest import subscribe, truncate_all
from test_events import CLOSED
from test_links import IPHONE, link

CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
COLUMNS = ["event_id", "link_id", "clicked_at", "source", "ip", "user_agent", "referer", "country", "landing_url"]
LIMIT = 3  # max_clicks of the limited link; the batch has two clicks on it past the limit


def fresh_schema(db, receiver):
    """The same links and subscriptions (same ids) every time: humans and bots, QR, a limited link."""
    truncate_all(db)
    ids = {slug: link(db, slug, **cols) for slug, cols in [("plain", {}), ("poster", {"campaign": "spring"}),
                                                          ("limited", {"max_clicks": LIMIT})]}
    subscribe(db, receiver, "/humans", url=CLOSED)
    subscribe(db, receiver, "/everything", url=CLOSED, filters={"exclude_bots": False}, ip_mode="full")
    return ids


def batch(ids):
    """Forty clicks: phones, desktops and a crawler, link and QR, five on the limited link (two past its limit)."""
    rows = []
    for i in range(40):
        slug = "limited" if i % 8 == 5 else ("plain", "poster")[i % 2]
        rows.append((f"00000000-0000-7000-8000-{i:012d}", ids[slug], f"2026-12-01T10:00:{i:02d}Z",
                     "qr" if i % 5 == 0 else "link", f"203.0.113.{i}", (IPHONE, CHROME, GOOGLEBOT, None)[i % 4],
                     "https://news.example/" if i % 3 else None, ("US", "de", None)[i % 3],
                     f"https://acme.com/?utm_source=mail&utm_campaign=c{i % 2}" if i % 7 == 0 else None))
    assert sum(r[1] == ids["limited"] for r in rows) == LIMIT + 2
    return rows


def stored(db):
    """Every click (all columns but the id and transaction) and every click event's deliveries, in a fixed order."""
    clicks = db.execute("SELECT to_jsonb(c) - 'id' - 'txid' FROM linkhooks.clicks c ORDER BY event_id").fetchall()
    deliveries = db.execute("SELECT subscription_id, event_type, body FROM linkhooks.deliveries "
                            "WHERE event_type <> 'link.created' ORDER BY event_type, event_id, subscription_id").fetchall()
    return [c[0] for c in clicks], [(s, t, without_times(json.loads(body))) for s, t, body in deliveries]


def without_times(body):
    """A body minus what differs between two runs of the same clicks: the ids and times of events made at insert."""
    if body["type"] == "link.expired":
        del body["id"], body["timestamp"], body["data"]["expired_at"]
    return body


def insert_one_by_one(db, rows):
    """Each click in its own statement; returns how many were refused for their link's max_clicks."""
    refused = 0
    for row in rows:
        try:
            db.execute(f"INSERT INTO linkhooks.clicks ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})", row)
        except psycopg.errors.CheckViolation as e:
            assert f"has reached its max_clicks of {LIMIT}" in str(e)
            refused += 1
    return refused


def copy(db, rows):
    with db.transaction(), db.cursor().copy(f"COPY linkhooks.clicks ({', '.join(COLUMNS)}) FROM STDIN") as c:
        for row in rows:
            c.write_row(row)


def insert_multirow(db, rows):
    values = sql.SQL(", ").join(sql.SQL("({})").format(sql.SQL(", ").join(map(sql.Literal, row))) for row in rows)
    db.execute(sql.SQL("INSERT INTO linkhooks.clicks ({}) VALUES {}").format(
        sql.SQL(", ").join(map(sql.Identifier, COLUMNS)), values))


def merge(db, rows):
    """MERGE with only an INSERT action: the clicks of a staging set that are not stored yet."""
    columns = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
    db.execute(sql.SQL("MERGE INTO linkhooks.clicks c USING (SELECT * FROM json_populate_recordset(NULL::linkhooks.clicks, %s)) v "
                       "ON c.event_id = v.event_id WHEN NOT MATCHED THEN INSERT ({}) VALUES ({})").format(
        columns, sql.SQL(", ").join(sql.SQL("v.{}").format(sql.Identifier(c)) for c in COLUMNS)),
        [json.dumps([dict(zip(COLUMNS, row)) for row in rows])])


@pytest.mark.parametrize("bulk", [copy, insert_multirow, merge], ids=["COPY", "multi-row INSERT", "MERGE"])
def test_bulk_statements_store_the_same_clicks_and_queue_the_same_events_as_one_by_one(db, receiver, bulk):
    rows = batch(fresh_schema(db, receiver))
    assert insert_one_by_one(db, rows) == 2
    one_by_one = stored(db)
    clicks, deliveries = one_by_one
    # The batch is what it claims to be: enriched humans and bots, QR scans, UTM from landing URLs, the limit reached.
    assert {c["device"] for c in clicks} == {"mobile", "desktop", "bot"}
    assert {c["source"] for c in clicks} == {"link", "qr"} and any(c["utm"] for c in clicks)
    assert {t for _, t, _ in deliveries} == {"link.clicked", "qr.scanned", "link.expired"}
    assert len(clicks) == len(rows) - 2
    assert len([d for d in deliveries if d[0] == 2]) > len([d for d in deliveries if d[0] == 1])  # bots to one only

    rows = batch(fresh_schema(db, receiver))
    notices = []
    db.add_notice_handler(lambda n: notices.append(n.message_primary))
    bulk(db, rows)
    assert stored(db) == one_by_one
    # The loader is told what was skipped, and not refused: the valid clicks of the batch are stored.
    assert notices == ["pg_linkhooks: 2 click(s) past their link's max_clicks were not recorded"]
    # A statement whose only clicks are past their limit is refused, as a one-row INSERT of one is.
    with pytest.raises(psycopg.errors.CheckViolation, match=f"has reached its max_clicks of {LIMIT}"):
        bulk(db, [("00000000-0000-7000-8000-999999999999",) + rows[5][1:]] * 2)
    assert stored(db) == one_by_one


def test_a_failed_statement_in_a_savepoint_leaves_the_next_ones_their_own_limits(cluster, db, receiver):
    ids = fresh_schema(db, receiver)
    limited, plain = ids["limited"], ids["plain"]
    notices = []
    with cluster.connect() as c:
        c.add_notice_handler(lambda n: notices.append(n.message_primary))
        with c.transaction():
            # A COPY that fails part-way (a bad country) inside a savepoint, after it stored clicks.
            with pytest.raises(psycopg.errors.InvalidParameterValue, match="invalid country"):
                with c.transaction(), c.cursor().copy("COPY linkhooks.clicks (link_id, country) FROM STDIN") as cp:
                    for country in ("US", "US", "USA"):
                        cp.write_row((plain, country))
            # A data-modifying CTE crossing the limit: the clicks up to it are stored, the rest skipped.
            stored_ids = c.execute("WITH c AS (INSERT INTO linkhooks.clicks (link_id) SELECT %s FROM generate_series(1, 5) "
                                   "RETURNING id) SELECT count(*) FROM c", [limited]).fetchone()[0]
            assert stored_ids == LIMIT
            # A one-row INSERT past the limit is refused, in its own savepoint.
            with pytest.raises(psycopg.errors.CheckViolation, match=f"has reached its max_clicks of {LIMIT}"):
                with c.transaction():
                    c.execute("INSERT INTO linkhooks.clicks (link_id) VALUES (%s)", [limited])
            c.execute("INSERT INTO linkhooks.clicks (link_id) VALUES (%s)", [plain])
    assert notices == ["pg_linkhooks: 2 click(s) past their link's max_clicks were not recorded"]
    assert db.execute("SELECT link_id, count(*) FROM linkhooks.clicks GROUP BY 1 ORDER BY 1").fetchall() == \
        [(plain, 1), (limited, LIMIT)]
    assert db.execute("SELECT count(*) FROM linkhooks.deliveries WHERE event_type = 'link.clicked'").fetchone()[0] == LIMIT + 1


@pytest.mark.parametrize("bulk", [copy, insert_multirow], ids=["COPY", "multi-row INSERT"])
def test_clicks_inserted_by_a_trigger_during_a_bulk_statement_get_their_deliveries_too(db, receiver, bulk):
    """A statement of several clicks keeps its insert into deliveries open until it ends. A click inserted by a
    trigger between two of its rows is a statement of its own, with its own insert; each click gets its
    deliveries, the transaction's next statement sees them all, and no relation is left open."""
    ids = fresh_schema(db, receiver)
    db.execute(sql.SQL("CREATE FUNCTION public.echo() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                       "INSERT INTO linkhooks.clicks (link_id, user_agent) VALUES ({}, {}); RETURN NEW; END $$").format(
                           sql.Literal(ids["poster"]), sql.Literal(IPHONE)))
    # Fires after the clicks trigger (triggers fire by name) for each click on "plain".
    db.execute(sql.SQL("CREATE TRIGGER echo BEFORE INSERT ON linkhooks.clicks FOR EACH ROW "
                       "WHEN (NEW.link_id = {}) EXECUTE FUNCTION public.echo()").format(sql.Literal(ids["plain"])))
    rows = [(f"00000000-0000-7000-8000-{i:012d}", ids["plain"], f"2026-12-01T10:00:{i:02d}Z", "link",
             "203.0.113.1", IPHONE, None, None, None) for i in range(4)]
    notices = []
    db.add_notice_handler(lambda n: notices.append(f"{n.severity}: {n.message_primary}"))
    try:
        with db.transaction():
            bulk(db, rows)
            per_click = db.execute(
                "SELECT c.link_id, count(d.id) FROM linkhooks.clicks c LEFT JOIN linkhooks.deliveries d "
                "ON d.event_id = c.event_id AND d.event_type = 'link.clicked' GROUP BY c.event_id, c.link_id "
                "ORDER BY 1, 2").fetchall()
            assert per_click == [(ids["plain"], 2)] * 4 + [(ids["poster"], 2)] * 4
    finally:
        db.execute("DROP TRIGGER echo ON linkhooks.clicks")
        db.execute("DROP FUNCTION public.echo()")
    assert notices == []
