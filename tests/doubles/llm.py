"""A local HTTP server speaking the two LLM APIs rtml calls, since no hosted model is reachable here:
OpenAI-compatible ``POST /v1/chat/completions`` (base url ``.openai_url``, as
``https://api.openai.com/v1``; https://platform.openai.com/docs/api-reference/chat/create) and
Anthropic ``POST /v1/messages`` (base url ``.anthropic_url``, as ``https://api.anthropic.com``;
https://platform.claude.com/docs/en/api/messages/create).

It checks what each API documents as required (the body's fields; the bearer key, or ``x-api-key``,
``anthropic-version`` and a JSON content type) and answers 400 / 401 with that API's error shape
(OpenAI ``{"error": {"message", "type", "param", "code"}}``, Anthropic ``{"type": "error", "error":
{"type", "message"}}``, https://platform.claude.com/docs/en/api/errors). It records every request
(``.requests``: ``(path, headers, json)``, header names lower-cased), can be made slow
(``.delay_s``), failing (``.fail_status``, answered in the API's error shape), malformed
(``.raw_body``, answered with 200 as it is) or off-format (``.answer_text``).

Its answers are the sections the prompt asks for: for each ``NAME: ...`` line after the prompt's
last "Answer with" line, ``NAME: double answer <request number>: <name>``. It listens on 127.0.0.1,
so processes of the same machine (Ray workers) reach it too; ``.requests`` is kept in this process.

    with LlmDouble(api_key="sk-test") as llm:
        ... settings with agents.llm_base_url = llm.openai_url ...
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ANTHROPIC_VERSION = "2023-06-01"
_ASKED = re.compile(r"^([A-Z]+):", re.MULTILINE)


class LlmDouble:
    def __init__(self, api_key: str | None = None):
        self.api_key = api_key  # when set, requests must carry it; Anthropic's always need some key
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.delay_s = 0.0
        self.fail_status: int | None = None
        self.answer_text: str | None = None
        self.raw_body: bytes | None = None
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        port = self._server.server_address[1]
        self.openai_url = f"http://127.0.0.1:{port}/v1"
        self.anthropic_url = f"http://127.0.0.1:{port}"

    def record(self, path: str, headers: dict[str, str], body: Any) -> int:
        """Records a request; returns its number (1 for the first)."""
        with self._lock:
            self.requests.append((path, headers, body))
            return len(self.requests)

    def answer(self, prompt: str, number: int) -> str:
        if self.answer_text is not None:
            return self.answer_text
        asked = prompt.rsplit("Answer with", 1)[-1]
        return "\n".join(f"{name}: double answer {number}: {name.lower()}" for name in _ASKED.findall(asked))

    def __enter__(self) -> LlmDouble:
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="llm-double", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _openai_error(status: int, message: str, kind: str, code: str | None = None) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _anthropic_error(status: int, message: str, kind: str) -> tuple[int, dict]:
    return status, {"type": "error", "error": {"type": kind, "message": message}}


def _openai(double: LlmDouble, headers: dict[str, str], body: Any, number: int) -> tuple[int, dict]:
    if double.api_key and headers.get("authorization") != f"Bearer {double.api_key}":
        return _openai_error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
    if double.fail_status:
        return _openai_error(double.fail_status, "The server is overloaded, try again later.", "server_error")
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(body, dict) or not body.get("model"):
        return _openai_error(400, "you must provide a model parameter", "invalid_request_error")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        return _openai_error(400, "'messages' must be a non-empty list of objects with 'role' and 'content'", "invalid_request_error")
    text = double.answer(str(messages[-1]["content"]), number)
    return 200, {
        "id": f"chatcmpl-{number}", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }  # fmt: skip


def _anthropic(double: LlmDouble, headers: dict[str, str], body: Any, number: int) -> tuple[int, dict]:
    key = headers.get("x-api-key")
    if not key or (double.api_key and key != double.api_key):
        return _anthropic_error(401, "invalid x-api-key", "authentication_error")
    if headers.get("anthropic-version") != ANTHROPIC_VERSION:
        return _anthropic_error(400, "anthropic-version: header is required", "invalid_request_error")
    if not headers.get("content-type", "").startswith("application/json"):
        return _anthropic_error(400, "content-type: must be application/json", "invalid_request_error")
    if double.fail_status:
        return _anthropic_error(double.fail_status, "Overloaded", "overloaded_error" if double.fail_status == 529 else "api_error")
    if not isinstance(body, dict):
        return _anthropic_error(400, "the body must be a JSON object", "invalid_request_error")
    for field in ("model", "max_tokens", "messages"):
        if not body.get(field):
            return _anthropic_error(400, f"{field}: Field required", "invalid_request_error")
    last = body["messages"][-1]
    if not isinstance(last, dict) or last.get("role") != "user" or "content" not in last:
        return _anthropic_error(400, "messages: the last message must be a user message with content", "invalid_request_error")
    text = double.answer(str(last["content"]), number)
    return 200, {
        "id": f"msg_{number}", "type": "message", "role": "assistant", "model": body["model"],
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }  # fmt: skip


_ROUTES = {"/v1/chat/completions": _openai, "/v1/messages": _anthropic}


def _handler_for(double: LlmDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet: the tests read .requests
            pass

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            headers = {name.lower(): value for name, value in self.headers.items()}
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            number = double.record(self.path, headers, body)
            time.sleep(double.delay_s)
            if double.raw_body is not None:
                return self._send(200, double.raw_body)
            route = _ROUTES.get(self.path)
            if route is None:
                status, payload = _openai_error(404, f"no route {self.path}", "invalid_request_error")
            elif body is None:
                status, payload = _openai_error(400, "the body is not JSON", "invalid_request_error")
            else:
                status, payload = route(double, headers, body, number)
            self._send(status, json.dumps(payload).encode())

        def _send(self, status: int, data: bytes) -> None:
            try:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout under test); nobody is left to answer

    return Handler
