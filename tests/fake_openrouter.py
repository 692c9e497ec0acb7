"""A real HTTP server on 127.0.0.1 speaking OpenRouter's chat-completions format, scriptable with faults.

``server.script`` is a list of behaviours consumed by the next requests in order (then ``ok``):

  ok         a well-formed answer in the thinking structure with the right final answer
  429        Too Many Requests with ``Retry-After: server.retry_after``
  500        Internal Server Error
  slow       sleeps ``server.slow_s`` before answering (the client times out first)
  malformed  200 with a body that is not JSON
  truncated  200, ``finish_reason: "length"``, the thinking cut off mid-block
  worst      ok, with usage at the request's bound (prompt bytes + margin, max_tokens): exhausts budgets
  overcharge ok, with a reported ``usage.cost`` of one dollar
  echo401    401 whose body echoes the Authorization header it received (a leaky proxy)

Every request is recorded (time, model, user message, behaviour) for the tests to count.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from phases.quietstar.reasoning_data.openrouter import prompt_token_bound


class FakeOpenRouter:
    def __init__(self, api_key: str, answer_for: Callable[[str], str]):
        self.api_key, self.answer_for = api_key, answer_for
        self.script: list[str] = []
        self.retry_after, self.slow_s = "1", 2.0
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                fake._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/api/v1"

    def __enter__(self) -> FakeOpenRouter:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def asked(self) -> list[tuple[str, str]]:
        """(model, user message) of every request that reached the server."""
        return [(r["model"], r["user"]) for r in self.requests]

    # ------------------------------------------------------------------ one request
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        with self._lock:
            behaviour = self.script.pop(0) if self.script else "ok"
            self.requests.append({"at": time.monotonic(), "model": body["model"], "user": user, "behaviour": behaviour})
        auth = h.headers.get("Authorization", "")
        if h.path != "/api/v1/chat/completions":
            return self._send(h, 404, {"error": {"code": 404, "message": f"no route {h.path}"}})
        if behaviour == "echo401" or auth != f"Bearer {self.api_key}":
            return self._send(h, 401, {"error": {"code": 401, "message": f"bad credentials in header {auth!r}"}})
        if behaviour == "429":
            return self._send(h, 429, {"error": {"code": 429, "message": "slow down"}},
                              {"Retry-After": self.retry_after})
        if behaviour == "500":
            return self._send(h, 500, {"error": {"code": 500, "message": "upstream exploded"}})
        if behaviour == "malformed":
            return self._send_raw(h, 200, b'{"id": "gen-1", "choices": [{"message": ')
        if behaviour == "slow":
            time.sleep(self.slow_s)
        strategy = re.search(r"Use the <(\w+)> tag", user).group(1)
        text = f"[thinking]<{strategy}>I work through it carefully.</{strategy}>[/endthinking] {self.answer_for(user)}"
        finish = "stop"
        if behaviour == "truncated":
            text, finish = f"[thinking]<{strategy}>I work through it caref", "length"
        usage = {"prompt_tokens": sum(len(m["content"]) for m in body["messages"]) // 4,
                 "completion_tokens": max(1, len(text) // 4)}
        if behaviour == "worst":
            usage = {"prompt_tokens": prompt_token_bound(body["messages"]), "completion_tokens": body["max_tokens"]}
        if behaviour == "overcharge":
            usage["cost"] = 1.0
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self._send(h, 200, {"id": "gen-1", "model": body["model"], "object": "chat.completion",
                            "choices": [{"index": 0, "finish_reason": finish,
                                         "message": {"role": "assistant", "content": text}}],
                            "usage": usage})

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: dict[str, Any],
              headers: dict[str, str] | None = None) -> None:
        FakeOpenRouter._send_raw(h, status, json.dumps(payload).encode(), headers)

    @staticmethod
    def _send_raw(h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): nothing to answer
            pass
