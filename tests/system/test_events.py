"""Triggers turn link activity into signed deliveries in the same transaction (issue 3)."""

import json
import threading

import psycopg
import pytest
from standardwebhooks.webhooks import Webhook

from conftest import database, drop_database, subscribe
from harness import wait_for
from test_links import IPHONE, link


def queued(db, event_type=None):
    rows = db.execute("SELECT event_type, body, signed_at, signature, event_id::text, subscription_id "
                      "FROM linkhooks.deliveries ORDER BY id").fetchall()
    return [r for r in rows if event_type is None or r[0] == event_type]


CLOSED = "http://127.0.0.1:9/closed"  # nothing listens: rows stay queued for inspection


@pytest.fixture
def sub(db, receiver):
    return subscribe(db, receiver, "/events", url=CLOSED)


def test_click_payload_matches_the_contract_and_verifies(db, sub):
    _, secret = sub
    link(db, "sale", "https://acme.com/winter-sale", campaign="winter-sale-2026", tags=["social"])
    db.execute("SELECT linkhooks.record_click('sale', '203.0.113.42', %s, 'https://instagram.com', 'US', 'San Francisco', "
               "landing_url => 'https://acme.com/?utm_source=instagram&utm_medium=social&utm_campaign=winter-sale&utm_content=story')",
               [IPHONE])
    [(kind, body, signed_at, signature, event_id, _)] = queued(db, "link.clicked")
    assert kind == "link.clicked"
    event = json.loads(body)
    assert list(event) == ["id", "type", "timestamp", "data"]
    assert event["id"] == event_id and event["type"] == "link.clicked"
    assert event["data"]["link"] == {"id": 1, "domain": "", "slug": "sale", "short_url": "https://go.acme.co/sale",
                                     "destination": "https://acme.com/winter-sale", "campaign": "winter-sale-2026",
                                     "tags": ["social"]}
    click = event["data"]["click"]
    assert click["ip_address"] == "203.0.113.0"
    assert (click["device"], click["browser"], click["os"], click["bot"], click["source"]) == ("mobile", "Safari", "iOS", False, "link")
    assert (click["country"], click["city"], click["referer"]) == ("US", "San Francisco", "https://instagram.com")
    assert event["data"]["utm"] == {"source": "instagram", "medium": "social", "campaign": "winter-sale", "content": "story"}
    # the stored signature is a Standard Webhooks signature over the exact body
    Webhook(secret).verify(body, {"webhook-id": event_id, "webhook-timestamp": str(signed_at), "webhook-signature": signature})


def test_qr_scan_is_one_event(db, sub):
    link(db, "qr")
    db.execute("SELECT linkhooks.record_click('qr', user_agent => %s, source => 'qr')", [IPHONE])
    assert [r[0] for r in queued(db) if r[0] != "link.created"] == ["qr.scanned"]


def test_link_lifecycle_events(db, sub):
    link_id = link(db, "life", campaign="c1")
    db.execute("UPDATE linkhooks.links SET destination = 'https://acme.com/new' WHERE id = %s", [link_id])
    db.execute("UPDATE linkhooks.links SET destination = destination WHERE id = %s", [link_id])  # no change, no event
    db.execute("DELETE FROM linkhooks.links WHERE id = %s", [link_id])
    events = [(r[0], json.loads(r[1])["data"]) for r in queued(db)]
    assert [e[0] for e in events] == ["link.created", "link.updated", "link.deleted"]
    assert events[1][1]["changed"] == ["destination"]
    assert events[1][1]["changes"] == {"destination": {"from": "https://acme.com/x", "to": "https://acme.com/new"}}
    assert all(e[1]["link"]["slug"] == "life" and e[1]["link"]["campaign"] == "c1" for e in events)


def test_link_updated_carries_each_changed_value(db, sub):
    """0.4.0 named the changed fields only; the new values of fields outside the link object were lost."""
    link_id = link(db, "vals", tags=["a"])
    db.execute("UPDATE linkhooks.links SET max_clicks = 10, disabled = true, tags = '{a,b}', "
               "expires_at = '2027-01-01T00:00:00Z', utm = '{\"source\": \"ig\"}' WHERE id = %s", [link_id])
    [(_, body, *_)] = queued(db, "link.updated")
    changes = json.loads(body)["data"]["changes"]
    assert changes == {
        "tags": {"from": ["a"], "to": ["a", "b"]},
        "utm": {"from": None, "to": {"source": "ig"}},
        "expires_at": {"from": None, "to": "2027-01-01T00:00:00.000Z"},
        "max_clicks": {"from": None, "to": 10},
        "disabled": {"from": False, "to": True},
    }


def test_conversion_event(db, sub):
    link_id = link(db, "buy")
    click_id = db.execute("INSERT INTO linkhooks.clicks (link_id, user_agent) VALUES (%s, %s) RETURNING id", [link_id, IPHONE]).fetchone()[0]
    db.execute("INSERT INTO linkhooks.conversions (click_id, name, amount, currency) VALUES (%s, 'purchase', 49.90, 'USD')", [click_id])
    [(_, body, *_)] = queued(db, "link.converted")
    data = json.loads(body)["data"]
    assert data["link"]["id"] == link_id
    assert data["conversion"]["amount"] == 49.90 and '"amount":49.90' in body
    assert data["conversion"]["click_id"] == click_id
    for bad, message in [("(NULL, 'x', 1, 'USD')", "a conversion needs link_id or click_id"),
                         ("(999, 'x', 1, 'USD')", "invalid link_id: link 999 does not exist"),
                         (f"({link_id}, '', 1, 'USD')", "invalid name"),
                         (f"({link_id}, 'x', 1, 'dollars')", "invalid currency")]:
        with pytest.raises(psycopg.Error, match=message):
            db.execute(f"INSERT INTO linkhooks.conversions (link_id, name, amount, currency) VALUES {bad}")


def test_rolled_back_work_queues_nothing(cluster, db, sub):
    link(db, "rb")
    with cluster.connect() as c:
        c.autocommit = False
        c.execute("SELECT linkhooks.record_click('rb', user_agent => %s)", [IPHONE])
        c.execute("INSERT INTO linkhooks.links (slug, destination) VALUES ('rb2', 'https://acme.com/')")
        c.rollback()
    assert [r[0] for r in queued(db)] == ["link.created"]


def test_link_expired_fires_exactly_once_under_concurrent_clicks(cluster, db, sub):
    link(db, "last", max_clicks=10)

    def clicker():
        with cluster.connect() as c:
            for _ in range(5):
                c.execute("SELECT linkhooks.record_click('last', user_agent => %s)", [IPHONE])

    threads = [threading.Thread(target=clicker) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(queued(db, "link.expired")) == 1
    assert json.loads(queued(db, "link.expired")[0][1])["data"]["reason"] == "max_clicks"
    assert len(queued(db, "link.clicked")) == 10


def test_time_expiry_and_campaign_end_are_found_by_maintenance(db, sub):
    link_id = link(db, "old")
    db.execute("INSERT INTO linkhooks.campaigns (name, ends_at) VALUES ('spring', now() - interval '1 minute')")
    db.execute("UPDATE linkhooks.links SET expires_at = now() - interval '1 second' WHERE id = %s", [link_id])
    # This run or the worker's own (every second here) finds them; either way exactly once.
    db.execute("SELECT linkhooks.run_maintenance()")
    again = db.execute("SELECT linkhooks.run_maintenance()").fetchone()[0]
    assert again["links_expired"] == 0 and again["campaigns_completed"] == 0
    [expired] = queued(db, "link.expired")
    [completed] = queued(db, "campaign.completed")
    assert json.loads(expired[1])["data"]["reason"] == "expires_at"
    assert json.loads(completed[1])["data"]["campaign"]["reason"] == "ends_at"


@pytest.mark.parametrize("statement, message", [
    ("INSERT INTO linkhooks.campaigns (name, click_goal, ends_at) VALUES ('forever', 10, 'infinity')",
     "invalid ends_at: must be a time, not infinity (NULL: the campaign has no end)"),
    ("INSERT INTO linkhooks.campaigns (name, ends_at) VALUES ('never', '-infinity')", "invalid ends_at"),
    ("INSERT INTO linkhooks.conversions (link_id, name, occurred_at) "
     "SELECT id, 'purchase', 'infinity' FROM linkhooks.links", "invalid occurred_at: must be a time, not infinity"),
])
def test_infinite_times_are_refused_before_they_break_clicks_or_maintenance(db, sub, statement, message):
    link(db, "inf", campaign="forever")
    with pytest.raises(psycopg.Error, match=message.replace("(", r"\(").replace(")", r"\)")):
        db.execute(statement)
    for table in ("campaigns", "conversions"):
        assert db.execute(f"SELECT count(*) FROM linkhooks.{table}").fetchone()[0] == 0
    db.execute("SELECT linkhooks.record_click('inf')")
    assert db.execute("SELECT linkhooks.run_maintenance()").fetchone()[0]["campaigns_completed"] == 0


def test_campaign_goal_completes_once_under_concurrency(cluster, db, sub):
    db.execute("INSERT INTO linkhooks.campaigns (name, click_goal) VALUES ('launch', 20)")
    link(db, "l1", campaign="launch")
    link(db, "l2", campaign="launch")

    def clicker(slug):
        with cluster.connect() as c:
            for _ in range(10):
                c.execute("SELECT linkhooks.record_click(%s, user_agent => %s)", [slug, IPHONE])

    threads = [threading.Thread(target=clicker, args=(s,)) for s in ["l1", "l2"] * 2]
    [t.start() for t in threads]
    [t.join() for t in threads]
    done = queued(db, "campaign.completed")
    assert len(done) == 1
    assert json.loads(done[0][1])["data"]["campaign"]["click_goal"] == 20


def test_filters_and_event_types(db, receiver):
    subscribe(db, receiver, "/all", url=CLOSED)
    subscribe(db, receiver, "/clicks-only", url=CLOSED, event_types=["link.clicked"])
    subscribe(db, receiver, "/winter", url=CLOSED, filters={"campaign": "winter"})
    subscribe(db, receiver, "/tagged", url=CLOSED, filters={"tags": ["vip"]})
    subscribe(db, receiver, "/us-mobile", url=CLOSED, filters={"countries": ["US"], "device": "mobile"})
    subscribe(db, receiver, "/with-bots", url=CLOSED, filters={"exclude_bots": False})
    subscribe(db, receiver, "/off", url=CLOSED, enabled=False)
    link(db, "w", campaign="winter", tags=["vip"])
    db.execute("SELECT linkhooks.record_click('w', user_agent => %s, country => 'US')", [IPHONE])
    db.execute("SELECT linkhooks.record_click('w', user_agent => %s, country => 'FR')", [IPHONE])
    db.execute("SELECT linkhooks.record_click('w', user_agent => 'Googlebot/2.1', country => 'US')")
    got = db.execute("SELECT s.name, d.event_type, count(*) FROM linkhooks.deliveries d JOIN linkhooks.subscriptions s "
                     "ON s.id = d.subscription_id GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
    assert got == [("all", "link.clicked", 2), ("all", "link.created", 1),
                   ("clicks-only", "link.clicked", 2),
                   ("tagged", "link.clicked", 2), ("tagged", "link.created", 1),
                   ("us-mobile", "link.clicked", 1), ("us-mobile", "link.created", 1),
                   ("winter", "link.clicked", 2), ("winter", "link.created", 1),
                   ("with-bots", "link.clicked", 3), ("with-bots", "link.created", 1)]


def test_ip_modes(db, receiver):
    for mode in ["full", "anonymized", "omit"]:
        subscribe(db, receiver, f"/{mode}", ip_mode=mode, url=CLOSED)
    link(db, "ip")
    db.execute("SELECT linkhooks.record_click('ip', '2001:db8:abcd:12::7', %s)", [IPHONE])
    db.execute("SELECT linkhooks.record_click('ip', '198.51.100.77', %s)", [IPHONE])
    rows = db.execute("SELECT s.ip_mode, d.body FROM linkhooks.deliveries d JOIN linkhooks.subscriptions s ON s.id = d.subscription_id "
                      "WHERE d.event_type = 'link.clicked' ORDER BY d.id").fetchall()
    ips = {}
    for mode, body in rows:
        ips.setdefault(mode, []).append(json.loads(body)["data"]["click"]["ip_address"])
    assert ips == {"full": ["2001:db8:abcd:12::7", "198.51.100.77"],
                   "anonymized": ["2001:db8:abcd::", "198.51.100.0"],
                   "omit": [None, None]}


@pytest.mark.parametrize("cols, message", [
    ({"url": "ftp://hooks.example.com/"}, "invalid url: must use http or https"),
    ({"url": "not-a-url"}, "invalid url: must be an absolute http or https URL"),
    ({"url": "https://user:pw@hooks.example.com/"}, "invalid url: must not contain credentials"),
    ({"event_types": ["link.clicked", "link.exploded"]}, "invalid event_types: 'link.exploded' is not an event type"),
    ({"filters": {"colour": "red"}}, "invalid filters: unknown key 'colour'"),
    ({"filters": {"tags": "x", "device": "phone"}}, "invalid filters.device"),
    ({"filters": {"exclude_bots": "yes"}}, "invalid filters.exclude_bots"),
    ({"ip_mode": "partial"}, "invalid ip_mode: must be 'full', 'anonymized' or 'omit'"),
    ({"signature_scheme": "md5"}, "invalid signature_scheme: must be 'standard' or 'hex'"),
    ({"timeout_ms": 5}, "invalid timeout_ms: must be between 100 and 300000"),
    ({"max_attempts": 0}, "invalid max_attempts: must be between 1 and 1000"),
    ({"secret": "hunter2"}, "invalid secret"),
    ({"name": ""}, "invalid name: must not be empty"),
    ({"url": "https://hooks.example.com/in "}, "invalid url: must not contain spaces or control characters"),
    ({"previous_secret_expires_at": "infinity"}, "invalid previous_secret_expires_at: must be a time, not infinity"),
])
def test_bad_subscriptions_are_refused(db, receiver, cols, message):
    with pytest.raises(psycopg.Error, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        subscribe(db, receiver, "/bad", **cols)
    assert db.execute("SELECT count(*) FROM linkhooks.subscriptions").fetchone()[0] == 0


def test_private_and_plain_http_targets_are_refused_on_write_by_default(cluster, db, receiver):
    # Server-wide settings (the worker reads them too): the tests' cluster allows both, so turn that off.
    cluster.set("linkhooks.allow_private_targets", "off")
    cluster.set("linkhooks.require_https", "on")
    try:
        check_refusals(cluster)
    finally:
        with cluster.connect() as c:
            c.execute("ALTER SYSTEM RESET linkhooks.allow_private_targets")
            c.execute("ALTER SYSTEM RESET linkhooks.require_https")
            c.execute("SELECT pg_reload_conf()")


def test_an_http_subscription_stored_before_https_was_required_gets_nothing_once_it_is(cluster, db, receiver):
    """A subscription written while linkhooks.require_https was off (or restored, or replicated) keeps its http URL:
    once https is required, the worker refuses to send it signed events in the clear, naming the setting."""
    sub_id, _ = subscribe(db, receiver, "/plain", event_types=["link.created"])
    refusal = "refused: the target URL is not https (linkhooks.require_https is on)"

    def first_attempt(slug):
        """A new link's event: the error of its first attempt (None if delivered) and its delivery's id."""
        link(db, slug)
        delivery = db.execute("SELECT max(id) FROM linkhooks.deliveries WHERE subscription_id = %s", [sub_id]).fetchone()[0]
        error = wait_for(lambda: db.execute("SELECT error FROM linkhooks.delivery_attempts "
                                            "WHERE delivery_id = %s AND attempt = 1", [delivery]).fetchone(),
                         message="the first attempt")[0]
        return error, delivery

    cluster.set("linkhooks.require_https", "on")
    try:
        # Sent in the clear until the worker has read the setting again on SIGHUP: poll until one is refused.
        slugs = (f"plain-{n}" for n in range(1000))
        wait_for(lambda: first_attempt(next(slugs))[0] == refusal, message="a refused attempt")
        sent = len(receiver.received("/plain"))
        error, delivery = first_attempt("plain-after")
        assert error == refusal
        wait_for(lambda: db.execute("SELECT status FROM linkhooks.deliveries WHERE id = %s", [delivery]).fetchone()[0]
                 == "dead", message="a dead letter after every attempt was refused")
        assert len(receiver.received("/plain")) == sent
    finally:
        with cluster.connect() as c:
            c.execute("ALTER SYSTEM RESET linkhooks.require_https")
            c.execute("SELECT pg_reload_conf()")


def check_refusals(cluster):
    # A session started after the reload sees it (the postmaster reloads before it forks one).
    c = wait_for(lambda: (lambda conn: conn if conn.execute("SHOW linkhooks.require_https").fetchone()[0] == "on"
                          else conn.close())(cluster.connect()), message="the reload")
    with c:
        for url in ["https://127.0.0.1/x", "https://localhost/x", "https://169.254.169.254/", "https://[::1]/",
                    "https://10.0.0.8/", "https://100.64.1.1/", "https://[::ffff:127.0.0.1]/", "https://0.0.0.0/"]:
            with pytest.raises(psycopg.Error, match="must not point at a private, loopback, link-local"):
                c.execute("INSERT INTO linkhooks.subscriptions (name, url) VALUES ('p', %s)", [url])
        with pytest.raises(psycopg.Error, match="must use https"):
            c.execute("INSERT INTO linkhooks.subscriptions (name, url) VALUES ('p', 'http://hooks.example.com/')")
        c.execute("INSERT INTO linkhooks.subscriptions (name, url, enabled) VALUES ('ok', 'https://hooks.example.com/', false)")


def test_secrets_are_generated_and_owner_only(cluster, db):
    secrets = [db.execute("INSERT INTO linkhooks.subscriptions (name, url, enabled) VALUES ('s', 'https://h.example.com/', false) "
                          "RETURNING secret").fetchone()[0] for _ in range(2)]
    assert all(s.startswith("whsec_") and len(s) == 6 + 44 for s in secrets) and secrets[0] != secrets[1]
    db.execute("DROP ROLE IF EXISTS snoop; CREATE ROLE snoop LOGIN")
    db.execute("GRANT SELECT ON linkhooks.deliveries, linkhooks.delivery_log TO snoop")
    with psycopg.connect(host="127.0.0.1", port=cluster.port, user="snoop", dbname="postgres") as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT secret FROM linkhooks.subscriptions")
    for table in ["deliveries", "delivery_attempts", "dead_letters", "delivery_log"]:
        cols = [r[0] for r in db.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = 'linkhooks' "
                                         "AND table_name = %s", [table]).fetchall()]
        assert cols and not any("secret" in c for c in cols), table


def test_hex_scheme_and_sql_sign_verify(db):
    spec = ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, '{"test": 2432232314}')
    assert db.execute("SELECT linkhooks.sign(%s, %s, %s, %s)", spec).fetchone()[0] == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert db.execute("SELECT linkhooks.verify(%s, %s, %s, %s, 'v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=')", spec).fetchone()[0]
    assert not db.execute("SELECT linkhooks.verify(%s, %s, %s, %s, 'v1,AAAA')", spec).fetchone()[0]


def test_notify_channel_announces_committed_events(cluster, db, sub):
    with cluster.connect() as listener:
        listener.execute("LISTEN link_events")
        with cluster.connect() as c:
            c.execute("SET linkhooks.notify_channel = 'link_events'")
            c.execute("INSERT INTO linkhooks.links (slug, destination) VALUES ('n', 'https://acme.com/')")
        note = next(listener.notifies(timeout=5))
        assert json.loads(note.payload)["type"] == "link.created"


def test_click_deliveries_follow_what_a_dba_changes_on_the_table(cluster):
    """Clicks write delivery rows without SQL. A session that already wrote rows must still apply a column's default
    once a column is added, skip a dropped column, fire the DBA's triggers, and find the table again after the
    extension is recreated."""
    try:
        with database(cluster, "lh_queue") as admin, cluster.connect(dbname="lh_queue") as session:
            warnings = []
            session.add_notice_handler(lambda n: warnings.append(n.message_primary))

            def install():
                admin.execute("CREATE EXTENSION pg_linkhooks")
                admin.execute("INSERT INTO linkhooks.subscriptions (name, url) VALUES ('s', %s)", [CLOSED])
                return link(admin, "go")

            def click(link_id):
                return session.execute("INSERT INTO linkhooks.clicks (link_id, user_agent) VALUES (%s, %s) "
                                       "RETURNING event_id::text", [link_id, IPHONE]).fetchone()[0]

            def delivery(event, columns):
                return admin.execute(f"SELECT {columns} FROM linkhooks.deliveries WHERE event_id = %s",
                                     [event]).fetchall()

            link_id = install()
            event = click(link_id)
            # ids: 1 is the link's link.created
            assert delivery(event, "id, event_type, status, attempts, next_attempt_at >= created_at, last_error") == \
                [(2, "link.clicked", "pending", 0, True, None)]

            admin.execute("ALTER TABLE linkhooks.deliveries ADD COLUMN region text NOT NULL DEFAULT 'eu'")
            event = click(link_id)
            assert delivery(event, "id, region") == [(3, "eu")]

            admin.execute("ALTER TABLE linkhooks.deliveries DROP COLUMN region")
            admin.execute("CREATE TABLE audit (delivery_id bigint, event_id uuid)")
            admin.execute("CREATE FUNCTION mark() RETURNS trigger LANGUAGE plpgsql AS "
                          "$$ BEGIN NEW.last_error := 'seen before insert'; RETURN NEW; END $$")
            admin.execute("CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS "
                          "$$ BEGIN INSERT INTO public.audit VALUES (NEW.id, NEW.event_id); RETURN NULL; END $$")
            admin.execute("CREATE TRIGGER mark BEFORE INSERT ON linkhooks.deliveries "
                          "FOR EACH ROW EXECUTE FUNCTION mark()")
            admin.execute("CREATE TRIGGER audit AFTER INSERT ON linkhooks.deliveries "
                          "FOR EACH ROW EXECUTE FUNCTION audit()")
            event = click(link_id)
            assert delivery(event, "id, status, last_error") == [(4, "pending", "seen before insert")]
            assert admin.execute("SELECT delivery_id, event_id::text FROM audit").fetchall() == [(4, event)]
            # A statement of several clicks writes its deliveries through one insert kept open: each row is
            # still seen before insert and audited after.
            events = [e for (e,) in session.execute(
                "INSERT INTO linkhooks.clicks (link_id, user_agent) SELECT %s, %s FROM generate_series(1, 3) "
                "RETURNING event_id::text", [link_id, IPHONE]).fetchall()]
            assert [delivery(e, "id, last_error") for e in events] == [[(i, "seen before insert")] for i in (5, 6, 7)]
            assert admin.execute("SELECT delivery_id, event_id::text FROM audit WHERE delivery_id > 4 "
                                 "ORDER BY 1").fetchall() == list(zip((5, 6, 7), events))
            assert warnings == []  # e.g. "relcache reference leak": the triggers' relations are closed again

            admin.execute("DROP EXTENSION pg_linkhooks CASCADE")
            link_id = install()
            event = click(link_id)
            assert delivery(event, "id, status") == [(2, "pending")]
    finally:
        drop_database(cluster, "lh_queue")


def test_deliveries_a_dba_gives_statement_triggers_row_filters_or_a_foreign_partition_are_written_as_sql_writes_them(
        cluster):
    """What the direct writer cannot do for the deliveries table, a SQL INSERT does: a statement trigger with a
    transition table sees every delivery row; a BEFORE ROW trigger that drops a row leaves no id behind (send_test
    says the delivery was not queued); a foreign table attached as a partition gets its rows through its wrapper
    (the direct writer would have called a table access method a foreign table does not have: a crash)."""
    try:
        with database(cluster, "lh_sqlpath") as admin, cluster.connect(dbname="lh_sqlpath") as session:
            admin.execute("CREATE EXTENSION pg_linkhooks")
            sub = admin.execute("INSERT INTO linkhooks.subscriptions (name, url) VALUES ('s', %s) RETURNING id",
                                [CLOSED]).fetchone()[0]
            link_id = link(admin, "go")

            def click():
                return session.execute("INSERT INTO linkhooks.clicks (link_id, user_agent) VALUES (%s, %s) "
                                       "RETURNING event_id::text", [link_id, IPHONE]).fetchone()[0]

            click()  # the session's writer is set up before the DBA's changes
            admin.execute("CREATE TABLE seen (event_id uuid)")
            admin.execute("CREATE FUNCTION seen() RETURNS trigger LANGUAGE plpgsql AS "
                          "$$ BEGIN INSERT INTO public.seen SELECT event_id FROM new_rows; RETURN NULL; END $$")
            admin.execute("CREATE TRIGGER seen AFTER INSERT ON linkhooks.deliveries REFERENCING NEW TABLE AS new_rows "
                          "FOR EACH STATEMENT EXECUTE FUNCTION seen()")
            event = click()
            assert admin.execute("SELECT event_id::text FROM seen").fetchall() == [(event,)]
            admin.execute("DROP TRIGGER seen ON linkhooks.deliveries")

            admin.execute("CREATE FUNCTION drop_tests() RETURNS trigger LANGUAGE plpgsql AS "
                          "$$ BEGIN IF NEW.event_type = 'webhook.test' THEN RETURN NULL; END IF; RETURN NEW; END $$")
            admin.execute("CREATE TRIGGER drop_tests BEFORE INSERT ON linkhooks.deliveries "
                          "FOR EACH ROW EXECUTE FUNCTION drop_tests()")
            with pytest.raises(psycopg.Error, match="not queued"):
                admin.execute("SELECT linkhooks.send_test(%s)", [sub])
            event = click()
            assert admin.execute("SELECT count(*) FROM linkhooks.deliveries WHERE event_id = %s",
                                 [event]).fetchone()[0] == 1
            admin.execute("DROP TRIGGER drop_tests ON linkhooks.deliveries")

            admin.execute("CREATE EXTENSION postgres_fdw")
            admin.execute(f"CREATE SERVER here FOREIGN DATA WRAPPER postgres_fdw "
                          f"OPTIONS (host '{cluster.dir}', port '{cluster.port}', dbname 'lh_sqlpath')")
            admin.execute("CREATE USER MAPPING FOR CURRENT_USER SERVER here")
            admin.execute("CREATE TABLE public.remote_deliveries (LIKE linkhooks.deliveries)")
            admin.execute("DELETE FROM linkhooks.deliveries")  # the default partition must hold nothing of today
            admin.execute("CREATE FOREIGN TABLE linkhooks.deliveries_remote PARTITION OF linkhooks.deliveries "
                          "FOR VALUES FROM (now() - interval '2 days') TO (now() + interval '2 days') "
                          "SERVER here OPTIONS (schema_name 'public', table_name 'remote_deliveries')")
            event = click()
            assert admin.execute("SELECT subscription_id, event_type FROM public.remote_deliveries "
                                 "WHERE event_id = %s", [event]).fetchall() == [(sub, "link.clicked")]
    finally:
        drop_database(cluster, "lh_sqlpath")


def test_a_session_keeps_every_deliveries_index_complete_while_a_dba_changes_them(cluster):
    """Each backend builds the deliveries indexes' insert state once. Indexes a DBA creates (also concurrently, also
    partial), rebuilds or drops afterwards must still get every row a session that already clicked writes; amcheck
    verifies each b-tree holds exactly the table's rows. A hash index takes the general path. The rows go to
    deliveries_default here (no worker makes this database's partitions), so that is where a DBA's indexes matter."""
    try:
        with database(cluster, "lh_indexes") as admin, cluster.connect(dbname="lh_indexes") as session:
            admin.execute("CREATE EXTENSION pg_linkhooks")
            admin.execute("CREATE EXTENSION amcheck")
            admin.execute("INSERT INTO linkhooks.subscriptions (name, url) VALUES ('s', %s)", [CLOSED])
            link_id = link(admin, "go")

            def click():
                return session.execute("INSERT INTO linkhooks.clicks (link_id, user_agent) VALUES (%s, %s) "
                                       "RETURNING event_id::text", [link_id, IPHONE]).fetchone()[0]

            click()
            for ddl in ["CREATE INDEX d_partial ON linkhooks.deliveries_default (signed_at) WHERE event_type = 'link.clicked'",
                        "CREATE INDEX CONCURRENTLY d_concurrent ON linkhooks.deliveries_default (created_at, subscription_id)",
                        "REINDEX INDEX linkhooks.deliveries_default_event",
                        "DROP INDEX linkhooks.d_partial",
                        "CREATE INDEX d_hash ON linkhooks.deliveries_default USING hash (event_id)"]:
                admin.execute(ddl)
                event = click()
            btrees = admin.execute("SELECT i.indexrelid::regclass::text FROM pg_index i JOIN pg_class c "
                                   "ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam "
                                   "WHERE i.indrelid = 'linkhooks.deliveries_default'::regclass AND a.amname = 'btree' "
                                   "ORDER BY 1").fetchall()
            assert [b for (b,) in btrees] == ["linkhooks.d_concurrent", "linkhooks.deliveries_default_delivered",
                                              "linkhooks.deliveries_default_due", "linkhooks.deliveries_default_event",
                                              "linkhooks.deliveries_default_pkey"]
            for (index,) in btrees:
                # heapallindexed: every row the index should hold is in it.
                admin.execute("SELECT bt_index_check(%s::regclass, true)", [index])
            assert admin.execute("SELECT count(*) FROM linkhooks.deliveries_default").fetchone()[0] == 7  # link.created + 6
            assert admin.execute("SELECT count(*) FROM linkhooks.deliveries").fetchone()[0] == 7

            # The last click came after the hash index: it must be found through it.
            admin.execute("DROP INDEX linkhooks.deliveries_default_event")
            admin.execute("SET enable_seqscan = off")
            by_event = "SELECT count(*) FROM linkhooks.deliveries WHERE event_id = %s"
            plan = "\n".join(r for (r,) in admin.execute("EXPLAIN " + by_event, [event]).fetchall())
            assert "d_hash" in plan, plan
            assert admin.execute(by_event, [event]).fetchone()[0] == 1
    finally:
        drop_database(cluster, "lh_indexes")
