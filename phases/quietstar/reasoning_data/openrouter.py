"""A small httpx client for OpenRouter's OpenAI-compatible chat-completions API, with a hard budget.

``POST {base_url}/chat/completions`` with ``Authorization: Bearer <key>``. One call of ``complete``
is one example's request, retried on 429 (waiting at least ``Retry-After``), 5xx, 408 and timeouts with
exponential backoff and "equal jitter" (wait = b·2^attempt·U[0.5, 1], capped): the jitter spreads
retries of concurrent requests apart instead of synchronising them.

Budget: before every attempt the worst case it could cost is reserved, ``price(prompt bound,
max_tokens)``; an attempt that does not fit in what is left is never sent, so concurrent requests
together cannot pass the cap. ``prompt_token_bound`` counts UTF-8 bytes, an upper bound on the tokens of
any byte-level BPE. After the response the reservation is replaced by the real cost (usage × price, or
the provider's own ``usage.cost`` if that is higher). An attempt whose usage is unknown (a timeout, a
body that is not JSON) may still have been billed, so it is charged at its bound.

The key is a ``SecretStr``: its repr hides it, it goes only into the Authorization header of each
request, and every error text that leaves this module passes through ``redact``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Literal, NamedTuple

import httpx
from pydantic import SecretStr

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.LocalProtocolError)
log = logging.getLogger("agent_forge.quietstar.openrouter")


class OpenRouterError(RuntimeError):
    """A failure no retry fixes (bad key, no credits, unknown model, a request the API refuses)."""


class Price(NamedTuple):
    """US dollars per million tokens."""

    prompt_per_m: float
    completion_per_m: float

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.prompt_per_m + completion_tokens * self.completion_per_m) / 1e6


def resolve_base_url(configured: str | None = None) -> str:
    """The configured URL, else ``OPENROUTER_BASE_URL``, else OpenRouter's."""
    return (configured or os.environ.get("OPENROUTER_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def redact(text: str, secret: SecretStr | str | None) -> str:
    value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    return text.replace(value, "[REDACTED]") if value else text


def prompt_token_bound(messages: list[dict[str, str]]) -> int:
    """An upper bound on the prompt tokens: UTF-8 bytes, plus a margin per message for the chat template."""
    return sum(len(m["content"].encode()) + 16 for m in messages) + 16


class Budget:
    """A hard spending cap shared by concurrent requests: reserve the worst case, then settle the real cost."""

    def __init__(self, cap_usd: float, spent_usd: float = 0.0):
        self.cap_usd = float(cap_usd)
        self.spent_usd = float(spent_usd)
        self.reserved_usd = 0.0
        self._lock = threading.Lock()

    def reserve(self, amount: float) -> bool:
        with self._lock:
            if self.spent_usd + self.reserved_usd + amount > self.cap_usd:
                return False
            self.reserved_usd += amount
            return True

    def settle(self, reserved: float, actual: float) -> None:
        with self._lock:
            self.reserved_usd = max(0.0, self.reserved_usd - reserved)
            self.spent_usd += actual

    @property
    def remaining_usd(self) -> float:
        with self._lock:
            return self.cap_usd - self.spent_usd - self.reserved_usd


@dataclass
class Completion:
    """What one example's request came to. ``status``: ok; reject (a paid answer unusable as data, with
    ``reason``); failed (retries used up: the example stays pending for a rerun); budget (not sent:
    the cap); stopped (not sent: the run is stopping)."""

    status: Literal["ok", "reject", "failed", "budget", "stopped"]
    reason: str = "ok"
    detail: str = ""
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    cost_usd: float = 0.0
    attempts: int = 0
    over_bound: bool = False  # the reported cost passed the reservation: prices are set too low


def _retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class OpenRouterClient:
    def __init__(self, api_key: SecretStr | str, base_url: str | None = None, *, timeout_s: float = 60.0,
                 max_retries: int = 4, backoff_s: float = 1.0, backoff_max_s: float = 60.0, max_concurrency: int = 4,
                 seed: int = 0, title: str = "agent-forge"):
        self._key = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
        if not self._key.get_secret_value().strip():
            raise OpenRouterError("the OpenRouter API key is empty")
        self.base_url = resolve_base_url(base_url)
        if not self.base_url.startswith(("http://", "https://")):
            raise OpenRouterError(f"OpenRouter base URL {self.base_url!r} is not an http(s) URL "
                                  "(quietstar.openrouter_base_url or $OPENROUTER_BASE_URL)")
        self.max_retries, self.backoff_s, self.backoff_max_s = max_retries, backoff_s, backoff_max_s
        self.max_concurrency = max_concurrency
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._title = title
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s),
                                  limits=httpx.Limits(max_connections=max_concurrency))
        self._sent_lock = threading.Lock()
        self.requests_sent = 0

    def __repr__(self) -> str:
        return f"OpenRouterClient(base_url={self.base_url!r}, key={self._key!r})"

    def __enter__(self) -> OpenRouterClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _redact(self, text: str) -> str:
        return redact(text, self._key)

    def _backoff(self, attempt: int) -> float:
        with self._rng_lock:
            u = self._rng.uniform(0.5, 1.0)
        return min(self.backoff_max_s, self.backoff_s * 2 ** attempt) * u

    def _post(self, body: dict[str, Any]) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self._key.get_secret_value()}", "X-Title": self._title}
        with self._slots:
            with self._sent_lock:
                self.requests_sent += 1
            return self._http.post(f"{self.base_url}/chat/completions", json=body, headers=headers)

    def complete(self, model: str, messages: list[dict[str, str]], *, max_tokens: int, price: Price, budget: Budget,
                 temperature: float = 0.7, stop: threading.Event | None = None,
                 on_send: Callable[[float], None] | None = None) -> Completion:
        """``on_send(worst_case_usd)`` runs before each attempt leaves: a write-ahead record of money that
        may be spent even if this process dies before the answer arrives."""
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        bound = price.cost(prompt_token_bound(messages), max_tokens)
        spent, last_reason, last_detail = 0.0, "failed", ""
        for attempt in range(self.max_retries + 1):
            if stop is not None and stop.is_set():
                return Completion("stopped", "stopped", cost_usd=spent, attempts=attempt)
            if not budget.reserve(bound):
                return Completion("budget", "budget", f"${bound:.6f} worst case > ${budget.remaining_usd:.6f} left",
                                  cost_usd=spent, attempts=attempt)
            wait = self._backoff(attempt)
            if on_send is not None:
                on_send(bound)
            try:
                resp = self._post(body)
            except httpx.TransportError as e:  # timeouts included
                # A request that never left costs nothing; one cut off after sending may have been billed,
                # with its usage unknown: charged at its bound.
                charged = 0.0 if isinstance(e, _NEVER_SENT) else bound
                budget.settle(bound, charged)
                spent += charged
                last_reason = "timeout" if isinstance(e, httpx.TimeoutException) else "transport"
                last_detail = self._redact(f"{type(e).__name__}: {e}")
            else:
                outcome = self._read(resp, model, price, bound, budget)
                if isinstance(outcome, Completion):
                    outcome.cost_usd += spent
                    outcome.attempts = attempt + 1
                    return outcome
                last_reason, last_detail, server_wait = outcome
                if server_wait is not None:
                    if server_wait > self.backoff_max_s:
                        return Completion("failed", "rate_limited", f"server asks to wait {server_wait:.0f} s",
                                          cost_usd=spent, attempts=attempt + 1)
                    wait = max(wait, server_wait)
            if attempt < self.max_retries:
                log.info("%s: %s (%s); retry %d/%d in %.2f s", model, last_reason, last_detail[:120], attempt + 1,
                         self.max_retries, wait)
                if stop is not None:
                    stop.wait(wait)
                else:
                    time.sleep(wait)
        return Completion("failed", last_reason, last_detail, cost_usd=spent, attempts=self.max_retries + 1)

    def _read(self, resp: httpx.Response, model: str, price: Price, bound: float,
              budget: Budget) -> Completion | tuple[str, str, float | None]:
        """A final Completion, or (reason, detail, Retry-After seconds) for a retryable answer."""
        status = resp.status_code
        text = self._redact(resp.text[:300])
        if status == 429 or status == 408 or status >= 500:
            budget.settle(bound, 0.0)  # refused before generating: not billed
            retry_after = _retry_after_s(resp.headers.get("retry-after")) if status == 429 else None
            return ("rate_limited" if status == 429 else f"http_{status}"), text, retry_after
        if status in (401, 403):
            budget.settle(bound, 0.0)
            raise OpenRouterError(f"OpenRouter refused the API key (HTTP {status}): check OPENROUTER_API_KEY or "
                                  f"the Prefect Secret block; the server said: {text}")
        if status == 402:
            budget.settle(bound, 0.0)
            raise OpenRouterError(f"OpenRouter says the account is out of credits (HTTP 402): {text}")
        if status != 200:
            budget.settle(bound, 0.0)
            raise OpenRouterError(f"OpenRouter rejected the request for model {model!r} (HTTP {status}): {text}")
        try:
            data = resp.json()
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
        except ValueError as e:
            budget.settle(bound, bound)
            return Completion("reject", "malformed_json", self._redact(f"{e}; body starts {resp.text[:80]!r}"),
                              cost_usd=bound)
        if "error" in data and not data.get("choices"):
            err = data["error"] if isinstance(data["error"], dict) else {"message": str(data["error"])}
            code = err.get("code")
            budget.settle(bound, 0.0)
            if code == 429 or (isinstance(code, int) and code >= 500):
                return f"upstream_{code}", self._redact(str(err.get("message", ""))[:300]), None
            return Completion("reject", "api_error", self._redact(json.dumps(err)[:300]))
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        cost = _cost(usage, price, bound)
        budget.settle(bound, cost)
        done = Completion("ok", usage=usage, cost_usd=cost, over_bound=cost > bound * (1 + 1e-9))
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            done.status, done.reason = "reject", "no_choices"
            return done
        message = choices[0].get("message") or {}
        content = message.get("content") if isinstance(message, dict) else None
        done.text = content if isinstance(content, str) else ""
        done.finish_reason = choices[0].get("finish_reason")
        if done.finish_reason == "length":
            done.status, done.reason, done.detail = "reject", "truncated", f"stopped at max_tokens ({usage})"
        elif not done.text.strip():
            done.status, done.reason = "reject", "empty_completion"
        return done


def _cost(usage: dict[str, Any], price: Price, bound: float) -> float:
    """usage × price, or the provider's reported cost if higher; the bound when usage is missing."""
    try:
        cost = price.cost(float(usage["prompt_tokens"]), float(usage["completion_tokens"]))
    except (KeyError, TypeError, ValueError):
        return bound
    reported = usage.get("cost")
    return max(cost, float(reported)) if isinstance(reported, (int, float)) else cost
