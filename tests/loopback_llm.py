"""A scripted OpenAI-compatible HTTP server on 127.0.0.1, for testing the remote backend for real.

Stdlib only: a `ThreadingHTTPServer` on an ephemeral port in a daemon thread, serving
POST /v1/completions and /v1/chat/completions with OpenAI-shaped JSON. Faults are scripted per
prompt marker (the first plan entry whose marker is in the prompt): each request for that prompt
consumes the next fault; when none is left it succeeds. It counts requests, keeps the
Authorization headers it saw, tracks the most requests in flight at once, and keeps the prompts
that were in flight together (which units' work overlapped).
"""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Fault names: "429" (with Retry-After), "500", "slow" (sleeps past the client's timeout),
# "malformed" (200 with a non-JSON body), "empty" (200 with no choices), "401" (quotes the
# Authorization header back in its error body, as a careless server might), "reset" (closes the
# connection without a reply), "truncated" (promises a longer body than it sends, then closes).
FAULTS = ("429", "500", "slow", "malformed", "empty", "401", "reset", "truncated")


def bypass_proxies(monkeypatch: Any) -> None:
    """Send a test's requests straight to the loopback server, whatever proxy the environment names
    (`monkeypatch`: pytest's fixture; not imported here, since the benches load this module too)."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def simple_tokens(text: str, split_digits: bool = False) -> list[str]:
    """Words and single other characters: `unknown` is always a token of its own, after a "\\t" token.
    With `split_digits`, every digit is a token of its own (as Gemma, Llama and Qwen write "10")."""
    return re.findall(r"\d|[^\W\d]+|\W" if split_digits else r"\w+|\W", text)


@dataclass
class ServerState:
    plan: dict[str, list[str]] = field(default_factory=dict)  # prompt marker -> faults still to serve
    replies: list[tuple[str, str]] = field(default_factory=list)  # (prompt marker, completion text)
    queued: list[str] = field(default_factory=list)  # completions served first, one per request, in order
    retry_after: str = "1"
    slow_s: float = 2.5  # longer than the tests' client timeout
    delay_s: float = 0.0  # every request sleeps this long (to make overlap observable)
    # Echo: the k-th `unknown` of a prompt gets slot_probs[k % len] as its top candidates.
    slot_probs: list[dict[str, float]] = field(default_factory=list)
    echo_logprobs: bool = True  # False: a server that ignores echo/logprobs
    echo_offsets: bool = True  # False: omit text_offset
    # Completions without echo but with logprobs (one generated token): its top candidates.
    next_probs: dict[str, float] = field(default_factory=lambda: {"\n": 0.5})
    # Chat with logprobs: the k-th level token of a reply (a digit token after a tab) gets
    # level_probs[k % len] as its top candidates, the token after a "1" gets after_one.
    level_probs: list[dict[str, float]] = field(default_factory=list)
    after_one: dict[str, float] = field(default_factory=lambda: {"\n": 0.5})
    chat_logprobs: bool = True  # False: a chat server that ignores logprobs
    split_digits: bool = False  # tokenize replies digit by digit
    ignore_n: bool = False  # True: one choice whatever `n` asks (as llama.cpp's server)
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    active: list[str] = field(default_factory=list)  # prompts of the requests in flight now
    together: list[tuple[str, ...]] = field(default_factory=list)  # in flight at a request's start (if > 1)
    auth_headers: list[str] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_fault(self, prompt: str) -> str | None:
        with self.lock:
            for marker, faults in self.plan.items():
                if marker in prompt:
                    return faults.pop(0) if faults else None
        return None

    def reply_for(self, prompt: str) -> str:
        with self.lock:
            if self.queued:
                return self.queued.pop(0)
        for marker, text in self.replies:
            if marker in prompt:
                return text
        return "reply to " + prompt[-12:]


_LIKELY, _OTHER = math.log(0.9), math.log(0.05)


def _top(probs: dict[str, float], k: int) -> dict[str, float]:
    return dict(sorted(((t, math.log(p)) for t, p in probs.items()), key=lambda kv: -kv[1])[:k])


def _echo_logprobs(state: ServerState, prompt: str, k: int, max_tokens: int) -> dict[str, Any]:
    """tokens/top_logprobs/text_offset for the prompt, plus `max_tokens` generated "\\n" tokens."""
    tokens = simple_tokens(prompt)
    offsets, pos = [], 0
    for tok in tokens:
        offsets.append(pos)
        pos += len(tok)
    top: list[dict[str, float] | None] = [None]
    slots = [_top(probs, k) for probs in state.slot_probs]
    slot = 0
    for tok in tokens[1:]:
        if tok == "unknown" and slots:
            top.append(slots[slot % len(slots)])
            slot += 1
        else:  # the token itself, likely, and one other candidate
            cands = {tok: _LIKELY, "the": _OTHER}
            top.append(cands if k >= len(cands) else dict(sorted(cands.items(), key=lambda kv: -kv[1])[:k]))
    for _ in range(max_tokens):
        tokens.append("\n")
        offsets.append(pos)
        pos += 1
        top.append({"\n": math.log(0.5)})
    out: dict[str, Any] = {"tokens": tokens, "token_logprobs": [None] + [-1.0] * (len(tokens) - 1), "top_logprobs": top}
    if state.echo_offsets:
        out["text_offset"] = offsets
    return out


def _chat_logprobs(state: ServerState, text: str, k: int) -> dict[str, Any]:
    """`logprobs.content[]` for a chat reply: scripted candidates at level tokens, the token itself elsewhere."""
    tokens = simple_tokens(text, state.split_digits)
    content, level, previous = [], 0, ""
    for i, tok in enumerate(tokens):
        if tok.isdigit() and previous == "\t" and state.level_probs:
            cands = state.level_probs[level % len(state.level_probs)]
            level += 1
        elif previous == "1" and i >= 2 and tokens[i - 2] == "\t" and state.split_digits:
            cands = state.after_one
        else:
            cands = {tok: 0.9}
        top = sorted(cands.items(), key=lambda kv: -kv[1])[:k]
        content.append({
            "token": tok, "bytes": list(tok.encode()), "logprob": math.log(cands.get(tok, 1e-6)),
            "top_logprobs": [{"token": t, "bytes": list(t.encode()), "logprob": math.log(p)} for t, p in top],
        })  # fmt: skip
        previous = tok
    return {"content": content}


def _prompt_of(body: dict[str, Any]) -> str:
    """A request's prompt: a completion's text, or a chat's turns as JSON."""
    prompt = body.get("prompt", body.get("messages", ""))
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


class _Handler(BaseHTTPRequestHandler):
    server: LoopbackServer
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers: no new connection (and thread) per request

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _leave(self) -> None:
        """A request stops counting as in flight once its reply is ready: counting until the handler
        returns would overlap with the client's next request, which may start as soon as it reads."""
        if getattr(self, "_counted", False):
            with self.server.state.lock:
                self.server.state.in_flight -= 1
                self.server.state.active.remove(self._prompt)
            self._counted = False

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self._leave()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): fine
            pass

    def _break(self, truncated: bool) -> None:
        """Drop the connection: at once, or after half of a body whose Content-Length promised more."""
        self._leave()
        if truncated:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "400")
            self.end_headers()
            self.wfile.write(b'{"id": "c", "object": "text_completion", "choices": [{"text": "half')
            self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def do_POST(self) -> None:
        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        with state.lock:
            state.requests += 1
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            self._counted = True
            self._prompt = _prompt_of(body)
            state.active.append(self._prompt)
            if len(state.active) > 1:
                state.together.append(tuple(state.active))
            state.auth_headers.append(self.headers.get("Authorization", ""))
            state.bodies.append(body)
        try:
            if state.delay_s:
                time.sleep(state.delay_s)
            self._serve(state, body)
        finally:
            self._leave()

    def _serve(self, state: ServerState, body: dict[str, Any]) -> None:
        chat = self.path.rstrip("/").endswith("/chat/completions")
        if not chat and not self.path.rstrip("/").endswith("/completions"):
            return self._json(404, {"error": {"message": f"no route {self.path}"}})
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        fault = state.next_fault(prompt)
        if fault == "429":
            return self._json(429, {"error": {"message": "rate limited"}}, {"Retry-After": state.retry_after})
        if fault == "500":
            return self._json(500, {"error": {"message": "internal error"}})
        if fault == "401":
            return self._json(401, {"error": {"message": f"bad key {self.headers.get('Authorization')}"}})
        if fault == "slow":
            time.sleep(state.slow_s)
        if fault == "malformed":
            return self._send(200, b'{"choices": [{"text": "unterminated')
        if fault in ("reset", "truncated"):
            return self._break(truncated=fault == "truncated")
        if fault == "empty":
            return self._json(200, {"id": "x", "object": "text_completion", "choices": []})
        n = 1 if state.ignore_n else int(body.get("n") or 1)
        text = state.reply_for(prompt)
        # As a real server: "length" when generation ended before any stop sequence appeared.
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        finish = "length" if stops and not any(s in text for s in stops) else "stop"
        usage = {"prompt_tokens": len(simple_tokens(prompt)), "completion_tokens": n, "total_tokens": 0}
        if chat:
            lp = None
            if body.get("logprobs") and state.chat_logprobs:
                lp = _chat_logprobs(state, text, int(body.get("top_logprobs") or 0))
            choices = [
                {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": lp}
                for i in range(n)
            ]
            return self._json(200, {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                                    "choices": choices, "usage": usage})  # fmt: skip
        logprobs = None
        if body.get("echo") and body.get("logprobs") is not None and state.echo_logprobs:
            logprobs = _echo_logprobs(state, prompt, int(body["logprobs"]), int(body.get("max_tokens") or 0))
            text = prompt + "\n" * int(body.get("max_tokens") or 0)
        elif not body.get("echo") and body.get("logprobs") is not None:
            top = sorted(state.next_probs.items(), key=lambda kv: -kv[1])[: int(body["logprobs"])]
            first = simple_tokens(text)[:1] or [""]
            logprobs = {"tokens": first, "token_logprobs": [-1.0], "text_offset": [len(prompt)],
                        "top_logprobs": [{t: math.log(p) for t, p in top}]}  # fmt: skip
        if logprobs is not None and body.get("echo"):
            finish = "length"  # the echoed prompt plus max_tokens generated tokens
        choices = [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish} for i in range(n)]
        self._json(200, {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                         "choices": choices, "usage": usage})  # fmt: skip


class LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog: a client opening many connections at once is not refused

    def __init__(self, state: ServerState, port: int = 0, reuse_port: bool = False):
        # reuse_port: several processes serve one port (the kernel spreads the connections over them).
        self.allow_reuse_port = reuse_port
        super().__init__(("127.0.0.1", port), _Handler)
        self.state = state
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
