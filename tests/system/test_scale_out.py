"""Sharding on PL/Proxy (issue 19): three shard clusters, each with pg_linkhooks and its own
worker, and a router whose functions PL/Proxy runs on the shard of a link's (domain, slug),
or on every shard. The layout is docs/scale-out/shard.sql and router.sql, as
docs/scale-out.md sets it up. The same clicks and link changes made through the router and
on one node send the same webhooks, each verified with the one subscription's secret."""

import json
import os

import psycopg
import pytest

from conftest import SETTINGS, subscribe
from harness import Cluster, Router, wait_for
from test_links import IPHONE

SHARDS = 3


def shard_sql():
    with open(os.path.join(Router.LAYOUT, "shard.sql")) as f:
        return f.read()


@pytest.fixture(scope="module")
def shards():
    clusters = [Cluster(SETTINGS) for _ in range(SHARDS)]
    try:
        for k, shard in enumerate(clusters):
            shard.start()
            with shard.connect() as c:
                c.execute("CREATE EXTENSION pg_linkhooks")
                c.execute(shard_sql())
                c.execute("SELECT shard.number_ids(%s, %s)", [k, SHARDS])
        yield clusters
    finally:
        for shard in clusters:
            shard.destroy()


@pytest.fixture(scope="module")
def router(shards):
    """The router, set up as docs/scale-out.md says."""
    r = Router([(s.dir, s.port, "postgres") for s in shards])
    r.start()
    try:
        with r.connect(dbname="router") as conn:
            yield conn
    finally:
        r.destroy()


class OneNode:
    """The scenario's steps as the application writes them on one node."""

    def __init__(self, db):
        self.db = db

    def create(self, slug, destination, campaign=None, max_clicks=None):
        self.db.execute("INSERT INTO linkhooks.links (slug, destination, campaign, max_clicks) VALUES (%s, %s, %s, %s)",
                        [slug, destination, campaign, max_clicks])

    def click(self, slug):
        return self.db.execute("SELECT linkhooks.record_click(%s, user_agent => %s)", [slug, IPHONE]).fetchone()[0]

    def update(self, slug, changes):
        self.db.execute("UPDATE linkhooks.links SET destination = %s WHERE slug = %s", [changes["destination"], slug])

    def delete(self, slug):
        self.db.execute("DELETE FROM linkhooks.links WHERE slug = %s", [slug])


class Routed:
    """The same steps through the router."""

    def __init__(self, router):
        self.router = router

    def create(self, slug, destination, campaign=None, max_clicks=None):
        self.router.execute("SELECT linkhooks_router.create_link('', %s, %s, campaign => %s, max_clicks => %s)",
                            [slug, destination, campaign, max_clicks])

    def click(self, slug):
        return self.router.execute("SELECT linkhooks.record_click(%s, user_agent => %s)", [slug, IPHONE]).fetchone()[0]

    def update(self, slug, changes):
        self.router.execute("SELECT linkhooks_router.update_link('', %s, %s::jsonb)", [slug, json.dumps(changes)])

    def delete(self, slug):
        self.router.execute("SELECT linkhooks_router.delete_link('', %s)", [slug])


def scenario(app):
    """Thirteen links (one limited to two clicks), a click on each, the limited one clicked
    past its limit, one link changed and clicked again, one deleted; the redirect URLs."""
    for i in range(12):
        app.create(f"s{i}", f"https://acme.com/{i}", campaign="spring" if i % 2 else None)
    app.create("lim", "https://acme.com/lim", max_clicks=2)
    answers = [app.click(f"s{i}") for i in range(12)] + [app.click("lim") for _ in range(3)]
    app.update("s1", {"destination": "https://acme.com/one"})
    answers.append(app.click("s1"))
    app.delete("s2")
    return answers


# created, clicked, the limited link's two clicks, its link.expired, the click past its limit (a
# link.miss), updated, clicked again, deleted
EVENTS = 13 + 12 + 2 + 1 + 1 + 1 + 1 + 1


def without_ids(value):
    """A body without what differs between any two runs: ids, event ids and times."""
    if isinstance(value, dict):
        return {k: without_ids(v) for k, v in value.items() if k not in ("id", "timestamp", "expired_at", "first_seen", "last_seen")}
    if isinstance(value, list):
        return [without_ids(v) for v in value]
    return value


def test_every_webhook_through_the_router_arrives_as_from_one_node(db, receiver, shards, router):
    secret = db.execute("SELECT linkhooks.generate_secret()").fetchone()[0]
    receiver.expect("/scaled", [secret])
    assert sorted(r[0] for r in router.execute(
        "SELECT linkhooks_router.put_subscription(7, 'crm', %s, %s, filters => '{\"exclude_bots\": false}')",
        [receiver.url("/scaled"), secret])) == list(range(SHARDS)), "the subscription is on every shard"
    subscribe(db, receiver, "/single", filters={"exclude_bots": False})

    routed, single = scenario(Routed(router)), scenario(OneNode(db))
    assert routed == single and routed[-1] == "https://acme.com/one"
    for path in ("/scaled", "/single"):
        wait_for(lambda: len(receiver.received(path)) >= EVENTS, timeout=30, message=f"{EVENTS} webhooks at {path}")
    scaled = receiver.received("/scaled")
    assert all(r["verified_with"] == [secret] for r in scaled)
    assert len({r["headers"]["webhook-id"] for r in scaled}) == len(scaled) == EVENTS, \
        ("each event once", sorted(r["json"]["type"] for r in scaled))
    canonical = lambda requests: sorted(json.dumps(without_ids(r["json"]), sort_keys=True) for r in requests)  # noqa: E731
    assert canonical(scaled) == canonical(receiver.received("/single"))

    # Each shard numbers its links its own way (k + 1, k + 1 + n, …), so a link's id in a payload
    # names one link in the whole layout.
    for k, shard in enumerate(shards):
        with shard.connect() as c:
            ids = [r[0] for r in c.execute("SELECT id FROM linkhooks.links")]
        assert ids and all(i % SHARDS == (k + 1) % SHARDS for i in ids), f"shard {k} holds links, numbered its way"
    ids_by_slug = {}
    for r in scaled:
        ids_by_slug.setdefault(r["json"]["data"]["link"]["slug"], set()).add(r["json"]["data"]["link"]["id"])
    assert all(len(ids) == 1 for ids in ids_by_slug.values())
    assert len(set.union(*ids_by_slug.values())) == len(ids_by_slug) == 13

    # Reads: one link on its shard, campaign totals over every shard, as on one node.
    assert router.execute("SELECT linkhooks.resolve('s1')").fetchone()[0] == "https://acme.com/one"
    assert router.execute("SELECT clicks, human_clicks FROM linkhooks.link_stats('', 's1')").fetchone() == \
        db.execute("SELECT clicks, human_clicks FROM linkhooks.link_stats WHERE slug = 's1'").fetchone() == (2, 2)
    columns = "campaign, links, clicks, human_clicks, bot_clicks, qr_scans, conversions"
    assert router.execute(f"SELECT {columns} FROM linkhooks.campaign_stats ORDER BY 1").fetchall() == \
        db.execute(f"SELECT {columns} FROM linkhooks.campaign_stats WHERE links > 0 ORDER BY 1").fetchall()

    # A subscription change reaches every shard.
    assert sorted(r[0] for r in router.execute("SELECT linkhooks_router.drop_subscription(7)")) == list(range(SHARDS))
    for shard in shards:
        with shard.connect() as c:
            assert c.execute("SELECT count(*) FROM linkhooks.subscriptions").fetchone()[0] == 0


def test_a_shard_refuses_to_number_ids_out_of_range(shards):
    with shards[0].connect() as c:
        with pytest.raises(psycopg.errors.RaiseException, match="k must be 0 to n - 1"):
            c.execute("SELECT shard.number_ids(3, 3)")
