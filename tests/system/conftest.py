import os

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from harness import Cluster, Destination, Receiver

# Fast retries and loopback targets for tests; everything else at its default.
SETTINGS = {
    "linkhooks.allow_private_targets": "on",
    "linkhooks.require_https": "off",
    "linkhooks.retry_schedule": "'150ms,300ms'",
    "linkhooks.max_attempts": "3",
    "linkhooks.default_timeout_ms": "2000",
    "linkhooks.base_url": "'https://go.acme.co'",
    "linkhooks.maintenance_interval": "'1s'",
    "max_prepared_transactions": "2",  # test_queue_floors prepares a transaction
}

TABLES = ["links", "clicks", "conversions", "campaigns", "subscriptions", "deliveries", "delivery_attempts", "dead_letters",
          "subscription_state", "rules", "link_counts", "link_hours", "campaign_counts", "milestones", "link_misses", "click_keys", "link_minutes", "campaign_minutes",
          "threshold_state", "digests", "destination_checks", "subscription_minutes", "subscription_latencies",
          "subscription_latency_hours",
          "country_minutes"]


# Set to a previous release (e.g. 0.1.0) to run every test against an install
# updated from it with ALTER EXTENSION ... UPDATE instead of a fresh one.
UPGRADE_FROM = os.environ.get("LINKHOOKS_UPGRADE_FROM")


@pytest.fixture(scope="session")
def cluster():
    c = Cluster(SETTINGS)
    c.start()
    with c.connect() as conn:
        if UPGRADE_FROM:
            conn.execute(sql.SQL("CREATE EXTENSION pg_linkhooks VERSION {}").format(sql.Literal(UPGRADE_FROM)))
            conn.execute("ALTER EXTENSION pg_linkhooks UPDATE")
        else:
            conn.execute("CREATE EXTENSION pg_linkhooks")
    yield c
    c.destroy()


@pytest.fixture
def clusters():
    """Makes clusters of a test's own (settings on top of SETTINGS; every database served unless they say
    otherwise), destroyed after it."""
    made = []

    def make(**settings):
        c = Cluster({**SETTINGS, "linkhooks.databases": "''", **settings})
        made.append(c)
        c.start()
        return c

    yield make
    for c in made:
        c.destroy()


def truncate_all(conn):
    """Empties every table of the extension and restarts their ids."""
    for attempt in range(5):  # the worker may hold locks in the other order; the detector picks one of us
        try:
            conn.execute("TRUNCATE " + ", ".join(f"linkhooks.{t}" for t in TABLES) + " RESTART IDENTITY")
            # Ids start again at 1: no id is below a floor a restore test left.
            conn.execute("UPDATE linkhooks.click_cursor SET id_floor = 0, conversion_id_floor = 0")
            return
        except psycopg.errors.DeadlockDetected:
            if attempt == 4:
                raise


@pytest.fixture
def db(cluster):
    """A connection to a clean schema."""
    with cluster.connect() as conn:
        truncate_all(conn)
        yield conn


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def destination():
    """A link destination on 127.0.0.1 that answers 500 until the test sets its status."""
    d = Destination(status=500)
    yield d
    d.close()


def subscribe(db, receiver, path, **cols):
    """Creates a subscription pointed at the receiver; returns (id, secret)."""
    cols = {"name": path.strip("/"), "url": receiver.url(path), **cols}
    cols = {k: Jsonb(v) if isinstance(v, dict) else v for k, v in cols.items()}
    names = ", ".join(cols)
    marks = ", ".join(["%s"] * len(cols))
    row = db.execute(f"INSERT INTO linkhooks.subscriptions ({names}) VALUES ({marks}) RETURNING id, secret",
                     list(cols.values())).fetchone()
    receiver.expect(path, [row[1]], hex_secret=row[1] if cols.get("signature_scheme") == "hex" else None)
    return row


def database(cluster, name):
    """A new, empty database; returns a connection to it."""
    with cluster.connect() as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {name}")
    return cluster.connect(dbname=name)


def drop_database(cluster, name):
    with cluster.connect() as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
