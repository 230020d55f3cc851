"""A local double of the Opsgenie Alert API's create and close endpoints (https://docs.opsgenie.com/docs/alert-api).

    with OpsgenieDouble(api_key="k") as opsgenie:     # a real HTTP server on 127.0.0.1, port 0
        ... OpsgenieNotifier(opsgenie.url, secrets, "opsgenie-api-key") ...
        opsgenie.open_alert("rtml:t:i").count        # alerts by alias; opsgenie.requests: all requests

As the documented API does: every request needs ``Authorization: GenieKey <key>`` (401 without or
with another key); ``POST /v2/alerts`` needs a ``message`` (422 without) and de-duplicates by
``alias`` (a create whose alias matches an open alert bumps its ``count``); ``POST
/v2/alerts/{identifier}/close?identifierType=alias|id`` closes it; valid requests are answered 202
``{"result": "Request will be processed", "took": ..., "requestId": ...}`` (Opsgenie processes
them asynchronously, so a close of an unknown alias is accepted too and changes nothing).
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class OpsgenieAlert:
    id: str
    alias: str
    body: dict[str, Any]  # the create request that opened it
    count: int = 1
    status: str = "open"  # "open" or "closed"
    close_body: dict[str, Any] | None = None


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any
    status: int


@dataclass
class OpsgenieDouble:
    api_key: str = "double-genie-key"
    alerts: list[OpsgenieAlert] = field(default_factory=list)  # every alert, oldest first
    requests: list[Recorded] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> OpsgenieDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def open_alert(self, alias: str) -> OpsgenieAlert | None:
        with self._lock:
            return next((a for a in self.alerts if a.alias == alias and a.status == "open"), None)

    def with_alias(self, alias: str) -> list[OpsgenieAlert]:
        with self._lock:
            return [a for a in self.alerts if a.alias == alias]

    # --- the API -------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], body: Any) -> tuple[int, dict]:
        if headers.get("authorization") != f"GenieKey {self.api_key}":
            return 401, {"message": "Could not authenticate", "took": 0.0, "requestId": str(uuid.uuid4())}
        parts = [unquote(part) for part in path.strip("/").split("/")]
        if method == "POST" and parts == ["v2", "alerts"]:
            return self._create(body)
        if method == "POST" and len(parts) == 4 and parts[:2] == ["v2", "alerts"] and parts[3] == "close":
            return self._close(parts[2], query.get("identifierType", ["id"])[0], body)
        return 404, {"message": f"No such endpoint: {method} {path}", "took": 0.0, "requestId": str(uuid.uuid4())}

    def _create(self, body: Any) -> tuple[int, dict]:
        if not isinstance(body, dict) or not str(body.get("message") or "").strip():
            return 422, {
                "message": "Request body is not processable. Please check the errors.",
                "errors": {"message": "Message can not be empty."},
                "took": 0.0,
                "requestId": str(uuid.uuid4()),
            }
        alert_id = str(uuid.uuid4())
        alias = str(body.get("alias") or alert_id)
        with self._lock:
            existing = next((a for a in self.alerts if a.alias == alias and a.status == "open"), None)
            if existing is not None:
                existing.count += 1
            else:
                self.alerts.append(OpsgenieAlert(id=alert_id, alias=alias, body=body))
        return 202, _accepted()

    def _close(self, identifier: str, identifier_type: str, body: Any) -> tuple[int, dict]:
        key = "alias" if identifier_type == "alias" else "id"
        with self._lock:
            for alert in self.alerts:
                if getattr(alert, key) == identifier and alert.status == "open":
                    alert.status, alert.close_body = "closed", body if isinstance(body, dict) else {}
        return 202, _accepted()


def _accepted() -> dict:
    return {"result": "Request will be processed", "took": 0.01, "requestId": str(uuid.uuid4())}


def _handler(double: OpsgenieDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self._serve("POST")

        def do_GET(self):
            self._serve("GET")

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except json.JSONDecodeError:
                body = raw.decode(errors="replace")
            split = urlsplit(self.path)
            query = parse_qs(split.query)
            headers = {name.lower(): value for name, value in self.headers.items()}
            status, answer = double.handle(method, split.path, query, headers, body)
            with double._lock:
                double.requests.append(Recorded(method, split.path, query, headers, body, status))
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
            """Quiet: the double's requests are in ``double.requests``."""

    return Handler
