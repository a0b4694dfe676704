"""A tiny webhook receiver for the demo: verifies each request with the
standardwebhooks library and prints one line per webhook."""

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook

port, secret = int(sys.argv[1]), sys.argv[2]
print_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"])).decode()
        try:
            event = Webhook(secret).verify(body, dict(self.headers))
            with print_lock:
                print(f"received {event['type']:<18} id={self.headers['webhook-id']}  signature verified", flush=True)
            self.send_response(204)
        except Exception as e:  # a bad signature gets a 400, like a real receiver
            print(f"REJECTED: {e}", flush=True)
            self.send_response(400)
        self.send_header("content-length", "0")
        self.end_headers()


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
