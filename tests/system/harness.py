"""Reusable pieces for system tests: a real PostgreSQL 15 cluster with
pg_linkhooks preloaded, and a real HTTP receiver on 127.0.0.1 that verifies
every webhook signature with the independent `standardwebhooks` library."""

import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
from psycopg import sql
from standardwebhooks.webhooks import Webhook

BIN = "/usr/lib/postgresql/15/bin"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=20.0, interval=0.02, message="condition"):
    """Polls `predicate` until it returns a truthy value or the deadline passes.
    `message` may be a callable, called only on timeout (to describe the state then)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message() if callable(message) else message}")
        time.sleep(interval)


class Cluster:
    """A throwaway cluster owned by the postgres user."""

    def __init__(self, settings):
        self.dir = tempfile.mkdtemp(prefix="linkhooks-")
        shutil.chown(self.dir, "postgres", "postgres")
        self.port = free_port()
        self._pg("initdb", "-D", self.dir, "-A", "trust", "-U", "postgres")
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": self.port,
            "unix_socket_directories": f"'{self.dir}'",
            "shared_preload_libraries": "'pg_linkhooks'",
            "linkhooks.databases": "'postgres'",
            **settings,
        }
        with open(os.path.join(self.dir, "postgresql.conf"), "a") as f:
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")

    def _pg(self, tool, *args, env=None):
        subprocess.run(["runuser", "-u", "postgres", "--", f"{BIN}/{tool}", *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)

    def start(self):
        # Started as from a Rust developer's shell: no error may carry a Rust backtrace even then.
        self._pg("pg_ctl", "-D", self.dir, "-l", os.path.join(self.dir, "server.log"), "-w", "start",
                 env={**os.environ, "RUST_BACKTRACE": "1"})

    def stop(self, mode="fast"):
        self._pg("pg_ctl", "-D", self.dir, "-m", mode, "-w", "stop")

    def restart(self):
        self.stop()
        self.start()

    def connect(self, dbname="postgres", **kw):
        return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=dbname, autocommit=True, **kw)

    def set(self, name, value):
        """ALTER SYSTEM + reload: what a DBA does; the worker picks it up on SIGHUP."""
        with self.connect() as c:
            c.execute(f"ALTER SYSTEM SET {name} = '{value}'")
            c.execute("SELECT pg_reload_conf()")

    def log(self):
        with open(os.path.join(self.dir, "server.log")) as f:
            return f.read()

    def destroy(self):
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class Receiver:
    """HTTP receiver on 127.0.0.1. Each path has secrets to verify with and a
    script of responses (status, headers, delay seconds); after the script it answers 200."""

    def __init__(self, port=0, expect=None):
        """`expect` maps paths to secrets before the first request can arrive."""
        self.lock = threading.Lock()
        self.paths = {path: {"secrets": list(secrets), "script": [], "hex": None} for path, secrets in (expect or {}).items()}
        self.requests = []
        self.after_answer = None  # called once each answer has been written
        self.active, self.peak = {}, {}  # requests being answered now, and the most at once, by path
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The head and the body are two writes: with Nagle's algorithm the body waited for the client's
            # delayed ACK (40 ms), so one connection answered 25 requests a second.
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                receiver._record(self.path, dict(self.headers), body)
                status, headers, delay = receiver._next_response(self.path)
                receiver._count(self.path, +1)
                if delay:
                    time.sleep(delay)
                receiver._count(self.path, -1)
                payload = b"ok"
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                if receiver.after_answer:
                    receiver.after_answer()

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the worker opens up to 24 connections at once; the default backlog is 5

            def handle_error(self, request, client_address):
                pass  # clients that vanish mid-request (a crashed worker) are expected

        self.server = Server(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def expect(self, path, secrets, script=(), hex_secret=None):
        with self.lock:
            self.paths[path] = {"secrets": list(secrets), "script": list(script), "hex": hex_secret}

    def _count(self, path, step):
        with self.lock:
            self.active[path] = self.active.get(path, 0) + step
            self.peak[path] = max(self.peak.get(path, 0), self.active[path])

    def _next_response(self, path):
        with self.lock:
            script = self.paths.get(path, {}).get("script", [])
            return script.pop(0) if script else (200, {}, 0)

    def _record(self, path, headers, body):
        headers = {k.lower(): v for k, v in headers.items()}
        conf = self.paths.get(path, {})
        verified_with = []
        for secret in conf.get("secrets", []):
            try:
                Webhook(secret).verify(body, headers)
                verified_with.append(secret)
            except Exception:
                pass
        hex_ok = None
        if conf.get("hex"):
            want = hmac.new(conf["hex"].encode(), body.encode(), hashlib.sha256).hexdigest()
            hex_ok = hmac.compare_digest(want, headers.get("x-webhook-signature", ""))
        with self.lock:
            self.requests.append({"path": path, "headers": headers, "body": body, "json": json.loads(body),
                                  "verified_with": verified_with, "hex_ok": hex_ok, "at": time.time()})

    def received(self, path=None):
        with self.lock:
            return [r for r in self.requests if path is None or r["path"] == path]

    def close(self):
        """Stops serving and closes the port, so later requests are refused at once
        rather than left hanging in the accept queue until the worker's timeout."""
        self.server.shutdown()
        self.server.server_close()


class Standby(Cluster):
    """A streaming hot standby of `primary`, made with pg_basebackup (physical
    replication: WAL replay, no triggers, no commit hooks run here)."""

    def __init__(self, primary):
        self.dir = tempfile.mkdtemp(prefix="linkhooks-standby-")
        shutil.chown(self.dir, "postgres", "postgres")
        self.port = free_port()
        self._pg("pg_basebackup", "-D", self.dir, "-R", "-X", "stream", "-c", "fast",
                 "-h", primary.dir, "-p", str(primary.port), "-U", "postgres")
        # The copy brings the primary's settings and log; it listens elsewhere and logs afresh.
        open(os.path.join(self.dir, "server.log"), "w").close()
        shutil.chown(os.path.join(self.dir, "server.log"), "postgres", "postgres")
        with open(os.path.join(self.dir, "postgresql.conf"), "a") as f:
            f.write(f"port = {self.port}\nunix_socket_directories = '{self.dir}'\n")
        self.primary = primary

    def caught_up(self, timeout=20.0):
        """Waits until this standby has replayed everything the primary has committed so far.
        The insert position, not pg_current_wal_lsn(): the worker commits asynchronously,
        and its commits may not be written yet."""
        with self.primary.connect() as p:
            target = p.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
        with self.connect() as s:
            wait_for(lambda: s.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [target]).fetchone()[0],
                     timeout=timeout, message=f"replay to reach {target}")


class Router(Cluster):
    """A PL/Proxy router database (docs/scale-out.md, docs/scale-out/router.sql) on a cluster of
    its own, without pg_linkhooks, in front of `shards`: (host, port, dbname) of each."""

    LAYOUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "scale-out")

    def __init__(self, shards):
        super().__init__({"shared_preload_libraries": "''"})
        self.shards = shards

    def start(self):
        super().start()
        with self.connect() as c:
            c.execute("CREATE DATABASE router")
        with self.connect(dbname="router") as r:
            r.execute("CREATE EXTENSION plproxy")
            # p0 … p(n-1), then p0 again up to a power of two.
            partitions = [self.shards[k % len(self.shards)] for k in range(1 << (len(self.shards) - 1).bit_length())]
            r.execute(sql.SQL("CREATE SERVER linkhooks_shards FOREIGN DATA WRAPPER plproxy OPTIONS ({})").format(
                sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(f"p{k}"), sql.Literal(
                    f"host={host} port={port} dbname={dbname}")) for k, (host, port, dbname) in enumerate(partitions))))
            r.execute("CREATE USER MAPPING FOR PUBLIC SERVER linkhooks_shards OPTIONS (user 'postgres')")
            with open(os.path.join(self.LAYOUT, "router.sql")) as f:
                r.execute(f.read())
            r.execute("INSERT INTO linkhooks_router.layout (shards) VALUES (%s)", [len(self.shards)])


class Destination:
    """A link's destination on 127.0.0.1: answers HEAD and GET with the status the test
    sets (HEAD with its own status if `head` is set) and records the methods it saw."""

    def __init__(self, status=200, head=None):
        self.status, self.head, self.methods = status, head, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self):
                outer.methods.append(self.command)
                status = outer.head if self.command == "HEAD" and outer.head else outer.status
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_HEAD = do_GET = answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path):
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()
