"""A local HTTP server speaking the two LLM APIs rtml calls (the hosted ones are unreachable here):
OpenAI-compatible ``POST /v1/chat/completions`` (base url ``.openai_url``) and Anthropic
``POST /v1/messages`` (base url ``.anthropic_url``). It checks the documented required fields and
headers (400 / 401 with each API's error shape), records every request, and can be told to be slow
(``delay_s``) or to fail (``fail_status``). Its answers are headed sections naming what was asked."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ANTHROPIC_VERSION = "2023-06-01"


class LlmDouble:
    def __init__(self, api_key: str | None = None):
        self.api_key = api_key  # when set, requests must carry it
        self.requests: list[tuple[str, dict, dict]] = []
        self.delay_s = 0.0
        self.fail_status: int | None = None
        self.answer_text: str | None = None  # overrides the generated answer
        self.raw_body: bytes | None = None  # answered with 200 as it is (a malformed body)
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                headers = {key.lower(): value for key, value in self.headers.items()}
                double.requests.append((self.path, headers, body))
                time.sleep(double.delay_s)
                if double.raw_body is not None:
                    self.send_response(200)
                    self.send_header("content-length", str(len(double.raw_body)))
                    self.end_headers()
                    return self.wfile.write(double.raw_body)
                if double.fail_status:
                    return self._send(double.fail_status, {"error": {"type": "overloaded_error", "message": "try again"}})
                if self.path == "/v1/chat/completions":
                    return self._openai(headers, body)
                if self.path == "/v1/messages":
                    return self._anthropic(headers, body)
                self._send(404, {"error": {"message": f"no route {self.path}"}})

            def _openai(self, headers, body):
                if double.api_key and headers.get("authorization") != f"Bearer {double.api_key}":
                    return self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}})
                if not body.get("model") or not isinstance(body.get("messages"), list) or not body["messages"]:
                    return self._send(400, {"error": {"message": "model and messages are required", "type": "invalid_request_error"}})
                prompt = body["messages"][-1]["content"]
                self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": double.answer(prompt)}, "finish_reason": "stop"}]})

            def _anthropic(self, headers, body):
                if not headers.get("x-api-key") or (double.api_key and headers["x-api-key"] != double.api_key):
                    return self._send(401, {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}})
                if headers.get("anthropic-version") != ANTHROPIC_VERSION:
                    return self._send(400, {"type": "error", "error": {"type": "invalid_request_error", "message": "anthropic-version header is required"}})
                if not body.get("model") or not body.get("max_tokens") or not body.get("messages"):
                    return self._send(400, {"type": "error", "error": {"type": "invalid_request_error", "message": "model, max_tokens and messages are required"}})
                prompt = body["messages"][-1]["content"]
                self._send(200, {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"], "stop_reason": "end_turn",
                                 "content": [{"type": "text", "text": double.answer(prompt)}]})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        port = self._server.server_address[1]
        self.openai_url = f"http://127.0.0.1:{port}/v1"
        self.anthropic_url = f"http://127.0.0.1:{port}"

    def answer(self, prompt: str) -> str:
        if self.answer_text is not None:
            return self.answer_text
        if "CAUSE:" in prompt:
            return "CAUSE: the model suspects the upstream host.\nCHECKS: look at the host first, then the cable."
        return "WHAT: the model saw a spike.\nWHERE: on the sensor.\nSINCE: since the start.\nSIMILAR: a past incident."

    def __enter__(self) -> LlmDouble:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
