"""``fleet metrics``: the Prometheus endpoint (fleet.metrics) on 127.0.0.1 (by default), behind Flower's login.

`fleet up` starts it beside Flower and `fleet down` stops it (fleet.launcher). It listens on
loopback by default: the counts name every experiment and group, and whoever reaches the port
from elsewhere should come through an SSH tunnel or a Prometheus on the host (setting
``metrics_address``: 0.0.0.0 in a container, whose port the host publishes). Every path but
``/healthcheck`` (which answers "OK" and nothing else, for `fleet up`'s wait) asks for the
login by HTTP basic auth: Flower's user and password (settings flower_user and
flower_password, or the generated ``<state_dir>/flower.password``), compared in constant time.

Run: ``fleet metrics`` (port: setting ``metrics_port``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from fleet.errors import ConfigError
from fleet.metrics import FleetCollector
from fleet.settings import FleetSettings

log = logging.getLogger(__name__)

ADDRESS = "127.0.0.1"  # loopback by default (module docstring); setting metrics_address


def login_ok(header: str | None, user: str, password: str) -> bool:
    """Whether an Authorization header carries ``user`` and ``password`` (basic auth); both
    are compared in full, in constant time, so the answer's timing tells nothing of either."""
    if not header or not header.startswith("Basic "):
        return False
    try:
        given = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    given_user, colon, given_password = given.partition(":")
    user_ok = hmac.compare_digest(given_user.encode(), user.encode())
    password_ok = hmac.compare_digest(given_password.encode(), password.encode())
    return bool(colon) and user_ok and password_ok


def make_server(registry: CollectorRegistry, user: str, password: str, port: int,
                address: str = ADDRESS) -> ThreadingHTTPServer:
    """The HTTP server of ``registry`` on ``address``:``port`` (0: a free port), not yet serving."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "fleet-metrics"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path == "/healthcheck":
                return self._send(200, b"OK", "text/plain")
            if not login_ok(self.headers.get("Authorization"), user, password):
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="fleet"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if path != "/metrics":
                return self._send(404, b"not found: /metrics is the one page", "text/plain")
            return self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: object) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)  # a scrape every few seconds: not for the log file

    try:
        return ThreadingHTTPServer((address, port), Handler)
    except OSError as e:
        raise ConfigError(f"metrics: cannot listen on {address}:{port} ({e.strerror or e}); set metrics_port "
                          "to a free port") from None


def serve(settings: FleetSettings) -> None:
    """Serve /metrics for the settings' fleet until the process is stopped (SIGTERM, Ctrl-C)."""
    from fleet.broker import connect
    from fleet.launcher import flower_login

    user, password, _ = flower_login(settings)
    client = connect(settings)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(client, settings.namespace, settings.heartbeat_s, settings.metrics_cache_s,
                                     series_max_age_s=max(30.0, 3 * settings.gpu_series_bucket_s)))
    server = make_server(registry, user, password, settings.metrics_port, settings.metrics_address)
    print(f"fleet metrics on http://{settings.metrics_address}:{settings.metrics_port}/metrics (login {user})",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
