"""HTTP faults an attempt must survive (issue 16): timeout_ms bounds the whole attempt, receivers that close
idle keep-alive connections cost no attempt, and pooled connections to private addresses do not outlive
linkhooks.allow_private_targets = off. Every receiver here is started by the test on 127.0.0.1."""

import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from conftest import subscribe
from harness import wait_for
from test_delivery import delivery_state


def send_tests(db, sid, n):
    db.execute("SELECT linkhooks.send_test(%s) FROM generate_series(1, %s)", [sid, n])


def only_attempt(db):
    wait_for(lambda: db.execute("SELECT status FROM linkhooks.deliveries").fetchone()[0] == "dead",
             message=lambda: delivery_state(db))
    return db.execute("SELECT status_code, duration_ms, error FROM linkhooks.delivery_attempts").fetchone()


def full_accept_queue():
    """A listener that never accepts, its backlog filled until one more connection cannot complete.
    Returns the port and the sockets, which must stay open."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held = [listener]
    for _ in range(64):
        s = socket.socket()
        s.settimeout(0.2)
        try:
            s.connect(("127.0.0.1", port))
        except TimeoutError:
            s.close()
            return port, held
        held.append(s)
    raise AssertionError("the accept queue never filled")


def test_timeout_bounds_connect_to_a_full_accept_queue(db):
    """0.4.0 waited 30 s (ureq's connect timeout) for timeout_ms = 1000."""
    port, held = full_accept_queue()
    try:
        secret = db.execute("INSERT INTO linkhooks.subscriptions (name, url, timeout_ms, max_attempts) "
                            "VALUES ('full', %s, 1000, 1) RETURNING id", [f"http://127.0.0.1:{port}/full?token=TOKEN1"]).fetchone()
        send_tests(db, secret[0], 1)
        code, duration, error = only_attempt(db)
        assert code is None and "timeout" in error, error
        assert 900 <= duration < 1500, duration
        assert "TOKEN1" not in error
    finally:
        for s in held:
            s.close()


def test_timeout_bounds_a_server_that_accepts_and_never_answers(db):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held = []
    threading.Thread(target=lambda: held.append(listener.accept()), daemon=True).start()
    try:
        sid = db.execute("INSERT INTO linkhooks.subscriptions (name, url, timeout_ms, max_attempts) "
                         "VALUES ('mute', %s, 1000, 1) RETURNING id",
                         [f"http://127.0.0.1:{listener.getsockname()[1]}/mute?token=TOKEN2"]).fetchone()[0]
        send_tests(db, sid, 1)
        code, duration, error = only_attempt(db)
        assert code is None and ("timeout" in error or "timed out" in error), error
        assert 900 <= duration < 1500, duration
        assert "TOKEN2" not in error
    finally:
        for conn, _ in held:
            conn.close()
        listener.close()


class IdleClosingReceiver:
    """A keep-alive HTTP/1.1 receiver that closes connections idle for `idle` seconds, as http.server with a
    timeout or Node (keepAliveTimeout) do. Its close is made to cross the client's next request on the wire:
    a request arriving on a connection idle that long is read and the connection closed without an answer,
    which is what a client sees when it reuses a connection at the moment the receiver closes it.
    Answers 500 to the first two requests of each webhook-id, 200 after."""

    def __init__(self, idle):
        self.lock = threading.Lock()
        self.seen = Counter()
        self.answers = []
        self.closed_unanswered = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            last_answer = None  # per connection: one handler serves one connection

            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.last_answer is not None and time.monotonic() - self.last_answer >= idle:
                    with receiver.lock:
                        receiver.closed_unanswered += 1
                    self.close_connection = True
                    return
                with receiver.lock:
                    msg_id = self.headers["webhook-id"]
                    receiver.seen[msg_id] += 1
                    status = 500 if receiver.seen[msg_id] <= 2 else 200
                    receiver.answers.append((msg_id, status))
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
                self.wfile.flush()
                self.last_answer = time.monotonic()

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128

            def handle_error(self, request, client_address):
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path):
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_receivers_closing_idle_connections_cost_no_attempt(db):
    """max_attempts = 3, 500 to the first two requests of each webhook-id: every event is delivered at attempt 3.
    On 0.4.0 a pooled connection the receiver had closed failed the write before any answer and used up an
    attempt, and some events went dead. Retries come 150 ms and 300 ms apart, so each reuses a connection
    idle longer than the receiver's 100 ms."""
    r = IdleClosingReceiver(idle=0.1)
    try:
        sid = db.execute("INSERT INTO linkhooks.subscriptions (name, url, max_attempts) VALUES ('idle', %s, 3) "
                         "RETURNING id", [r.url("/idle")]).fetchone()[0]
        send_tests(db, sid, 50)
        wait_for(lambda: db.execute("SELECT count(*) FILTER (WHERE status IN ('delivered', 'dead')) = 50 "
                                    "FROM linkhooks.deliveries").fetchone()[0],
                 timeout=60, message=lambda: delivery_state(db))
        failed = db.execute("SELECT attempt, error FROM linkhooks.delivery_attempts WHERE status_code IS NULL").fetchall()
        assert failed == [], failed
        rows = db.execute("SELECT status, attempts, count(*) FROM linkhooks.deliveries GROUP BY 1, 2").fetchall()
        assert rows == [("delivered", 3, 50)], rows
        with r.lock:
            assert sum(1 for _, status in r.answers if status == 200) == 50
            assert r.closed_unanswered > 0, "the receiver closed no connection under a request: the test tested nothing"
    finally:
        r.close()


def test_pooled_connections_to_private_targets_do_not_outlive_the_setting(cluster, db, receiver):
    """A keep-alive connection to 127.0.0.1 opened while private targets were allowed is not reused after
    linkhooks.allow_private_targets is turned off: the next attempt is refused like a new connection."""
    sid, _ = subscribe(db, receiver, "/pooled", max_attempts=1)
    send_tests(db, sid, 1)
    wait_for(lambda: db.execute("SELECT status FROM linkhooks.deliveries").fetchone()[0] == "delivered",
             message=lambda: delivery_state(db))
    cluster.set("linkhooks.allow_private_targets", "off")
    try:
        wait_for(lambda: "off" == db.execute("SHOW linkhooks.allow_private_targets").fetchone()[0], message="reload")
        send_tests(db, sid, 1)
        wait_for(lambda: db.execute("SELECT count(*) FROM linkhooks.deliveries WHERE status = 'dead'").fetchone()[0] == 1,
                 message=lambda: delivery_state(db))
        error = db.execute("SELECT error FROM linkhooks.delivery_attempts WHERE status_code IS NULL").fetchone()[0]
        assert "non-public address 127.0.0.1" in error, error
        assert len(receiver.received("/pooled")) == 1
    finally:
        cluster.set("linkhooks.allow_private_targets", "on")
