"""Text completion and echoed logprobs from any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama).

Requests run concurrently (bounded by `max_concurrency`) under a synchronous `complete`, so the
pipeline stays plain Python. The SDK's own retries are off: ours retry 429 (honouring
Retry-After), 5xx, timeouts, connection errors and malformed bodies with exponential backoff and
full jitter, and then give up with an `LLMFailure` for that prompt only. Other 4xx fail at once:
retrying a bad request only costs money.

The API key is read from the environment at request time and never kept on the instance, written
to the cache, logged, or put in a failure reason (reasons are scrubbed of it, since a server may
quote the key back in an error body).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import logging
import math
import os
import random
import time
import types
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import openai
from openai import AsyncOpenAI

from pipeline.errors import AtlasInputError
from pipeline.llm import (
    APIS,
    ChatReply,
    Completion,
    EchoLogprobs,
    GenerationParams,
    LLMBackend,
    LLMFailure,
    Messages,
    Prompt,
    Unusable,
)
from pipeline.llm_cache import LLMCache

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_BASE_URL = "https://api.openai.com/v1"
NO_KEY = "not-needed"  # local servers ignore the key, but the SDK insists on one
NO_LOGPROBS = "server returned no logprobs (echo unsupported?)"
NO_CHAT_LOGPROBS = "server returned no logprobs (set the simulator's logprobs: false for sampled levels)"


class _Malformed(Exception):
    """A 2xx response we cannot use (empty, not JSON, wrong shape): retried like a 5xx."""


class _Fatal(Exception):
    """A 2xx response that retrying will not fix (e.g. no logprobs from a server without echo)."""


def _public_url(url: str) -> str:
    """The base URL without credentials or query, safe to log and to use as cache key material."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds a 429 asks us to wait: `retry-after-ms`, or `retry-after` as seconds or an HTTP date."""
    if headers is None:
        return None
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(ms) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


class OpenAIBackend(LLMBackend):
    """`complete` via /completions (`api="completions"`) or /chat/completions (`api="chat"`);
    `echo_levels` via /completions with echo, `next_logprobs` via /completions with one generated
    token, `chat_levels` via /chat/completions with logprobs. Results are cached per request when a
    cache is given; the echo and chat-logprob requests cache only what the caller reduced them to."""

    backend = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        api: str = "completions",
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        retry_timeouts: bool = False,
        max_attempts: int = 5,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        max_retry_after_s: float = 120.0,
        echo_max_tokens: int = 0,
        cache: LLMCache | None = None,
    ):
        if api not in APIS:
            raise AtlasInputError(f"unknown api {api!r}: use one of {', '.join(APIS)}")
        if max_concurrency < 1:
            raise AtlasInputError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if max_attempts < 1:
            raise AtlasInputError(f"max_attempts must be at least 1, got {max_attempts}")
        if not timeout_s > 0:
            raise AtlasInputError(f"timeout_s must be above 0, got {timeout_s}")
        if echo_max_tokens not in (0, 1):
            raise AtlasInputError(
                f"echo_max_tokens must be 0 or 1 (1 for servers that refuse 0), got {echo_max_tokens}"
            )
        self.model = model
        self.base_url = base_url or DEFAULT_BASE_URL
        self.api_key_env = api_key_env  # the variable's name only; its value is read per call
        self.api = api
        self.supports_echo = api == "completions"
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.retry_timeouts = retry_timeouts
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.max_retry_after_s = max_retry_after_s
        self.echo_max_tokens = echo_max_tokens
        self.cache = cache
        self._scope = f"{self.backend}@{_public_url(self.base_url)}"  # different servers, different answers
        self._n_ignored = False  # set once the server has answered n > 1 with a single choice

    def __repr__(self) -> str:
        return (
            f"OpenAIBackend(model={self.model!r}, base_url={_public_url(self.base_url)!r}, "
            f"api_key_env={self.api_key_env!r}, api={self.api!r})"
        )

    # -- public API -------------------------------------------------------------------------------

    def complete(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Completion | LLMFailure]:
        chat = self.api == "chat"
        if not chat and any(not isinstance(p, str) for p in prompts):
            raise AtlasInputError("a chat prompt (a list of turns) needs api: chat; this backend uses completions")
        kind = "chat" if chat else "completion"
        key_params = dataclasses.asdict(params)

        def one(client: AsyncOpenAI, prompt: Prompt, n: int, seed: int) -> Awaitable[Any]:
            common = self._sampling(dataclasses.replace(params, n=n, seed=seed))
            if chat:
                return client.chat.completions.create(messages=_messages(prompt), **common)
            return client.completions.create(prompt=prompt, **common)

        async def request(client: AsyncOpenAI, prompt: Prompt) -> Any:
            if params.n == 1:
                return await one(client, prompt, 1, params.seed)
            if not self._n_ignored:
                resp = await one(client, prompt, params.n, params.seed)
                got = len(getattr(resp, "choices", None) or [])
                if got != 1:
                    return resp
                # llama.cpp's server (and others) ignore `n` and answer one choice: ask for the rest
                # one at a time, with their own seeds, from now on.
                log.info("%s: the server ignores n=%d; sampling one choice per request", self.model, params.n)
                self._n_ignored = True
                return _merged([resp] + [await one(client, prompt, 1, params.seed + k) for k in range(1, params.n)])
            # One after another, so the requests in flight stay within max_concurrency.
            return _merged([await one(client, prompt, 1, params.seed + k) for k in range(params.n)])

        def parse(resp: Any, prompt: Prompt) -> dict[str, Any]:
            return _parse_completion(resp, params.n, chat=chat)

        values = self._cached_batch(prompts, kind, key_params, request, parse)
        return [v if isinstance(v, LLMFailure) else Completion.from_record(v, cached=c) for v, c in values]

    def echo_logprobs(self, prompts: Sequence[str], top_logprobs: int = 5) -> list[EchoLogprobs | LLMFailure]:
        """The raw echo (not cached: it is large; `echo_levels` caches only what it reads from it)."""
        self._require_completions("echo with logprobs")
        return self._echo(prompts, top_logprobs, [lambda echo, prompt: echo] * len(prompts), kind=None)

    def echo_levels(
        self,
        prompts: Sequence[str],
        top_logprobs: int,
        reducers: Sequence[Callable[[EchoLogprobs, str], Any]],
        version: str,
    ) -> list[Any | LLMFailure]:
        """Each prompt echoed with logprobs and passed through its reducer `(echo, prompt) -> JSON`,
        whose value is what gets cached (under `version`). A reducer raises `Unusable` for a reply
        it cannot read: that is a failure, neither retried nor cached."""
        self._require_completions("echo with logprobs")
        return self._echo(prompts, top_logprobs, reducers, kind=f"echo:{version}")

    def next_logprobs(self, prompts: Sequence[str], top_logprobs: int) -> list[dict[str, float] | LLMFailure]:
        """Top log-probabilities of the token after each prompt (one greedy generated token)."""
        self._require_completions("next-token logprobs")

        def request(client: AsyncOpenAI, prompt: Prompt) -> Awaitable[Any]:
            return client.completions.create(
                model=self.model, prompt=prompt, max_tokens=1, logprobs=top_logprobs, temperature=0
            )

        values = self._cached_batch(prompts, "next", {"top_logprobs": top_logprobs}, request, _parse_next)
        return [v if isinstance(v, LLMFailure) else v["top"] for v, _ in values]

    def chat_levels(
        self,
        conversations: Sequence[Messages],
        params: GenerationParams,
        top_logprobs: int | None,
        reducers: Sequence[Callable[[ChatReply], Any]],
        version: str,
    ) -> list[Any | LLMFailure]:
        """Each conversation answered on /chat/completions (with `logprobs` and `top_logprobs` unless
        None) and passed through its reducer; the reducer's JSON value is what gets cached."""
        by_id = {id(c): r for c, r in zip(conversations, reducers, strict=True)}

        def request(client: AsyncOpenAI, prompt: Prompt) -> Awaitable[Any]:
            extra: dict[str, Any] = {}
            if top_logprobs is not None:
                extra = {"logprobs": True, "top_logprobs": top_logprobs}
            return client.chat.completions.create(messages=_messages(prompt), **self._sampling(params), **extra)

        def parse(resp: Any, prompt: Prompt) -> Any:
            return by_id[id(prompt)](_parse_chat_reply(resp, top_logprobs is not None))

        key = dataclasses.asdict(params) | {"top_logprobs": top_logprobs}
        values = self._cached_batch(conversations, f"chat:{version}", key, request, parse)
        return [v for v, _ in values]

    def completion_levels(
        self,
        prompts: Sequence[str],
        params: GenerationParams,
        top_logprobs: int | None,
        reducers: Sequence[Callable[[ChatReply], Any]],
        version: str,
    ) -> list[Any | LLMFailure]:
        """Each prompt continued on /completions (with `logprobs` unless None) and passed through its
        reducer as a `ChatReply` (the generated tokens with their top logprobs); the reducer's JSON
        value is what gets cached. The completions twin of `chat_levels`."""
        self._require_completions("completions with logprobs")
        by_id = {id(p): r for p, r in zip(prompts, reducers, strict=True)}

        def request(client: AsyncOpenAI, prompt: Prompt) -> Awaitable[Any]:
            extra: dict[str, Any] = {} if top_logprobs is None else {"logprobs": top_logprobs}
            return client.completions.create(prompt=prompt, **self._sampling(params), **extra)

        def parse(resp: Any, prompt: Prompt) -> Any:
            return by_id[id(prompt)](_parse_completion_reply(resp, top_logprobs is not None))

        key = dataclasses.asdict(params) | {"top_logprobs": top_logprobs}
        values = self._cached_batch(prompts, f"completion:{version}", key, request, parse)
        return [v for v, _ in values]

    # -- machinery --------------------------------------------------------------------------------

    def _require_completions(self, what: str) -> None:
        if self.api != "completions":
            raise AtlasInputError(f"{what} needs the completions endpoint; this backend was made with api: chat")

    def _sampling(self, params: GenerationParams) -> dict[str, Any]:
        common: dict[str, Any] = {
            "model": self.model,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": params.n,
            "seed": params.seed,
        }
        if params.stop:
            common["stop"] = list(params.stop)
        return common

    def _echo(
        self,
        prompts: Sequence[str],
        top_logprobs: int,
        reducers: Sequence[Callable[[EchoLogprobs, str], Any]],
        kind: str | None,
    ) -> list[Any | LLMFailure]:
        by_id = {id(p): r for p, r in zip(prompts, reducers, strict=True)}

        def request(client: AsyncOpenAI, prompt: Prompt) -> Awaitable[Any]:
            return client.completions.create(
                model=self.model,
                prompt=prompt,
                echo=True,
                logprobs=top_logprobs,
                max_tokens=self.echo_max_tokens,
                temperature=0,
            )

        def parse(resp: Any, prompt: Prompt) -> Any:
            assert isinstance(prompt, str)
            echo = _parse_echo(resp, prompt, self.echo_max_tokens)
            return by_id[id(prompt)](EchoLogprobs(echo["tokens"], echo["top_logprobs"], echo["text_offset"]), prompt)

        values = self._cached_batch(prompts, kind, {"top_logprobs": top_logprobs}, request, parse)
        return [v for v, _ in values]

    def _cached_batch(
        self,
        prompts: Sequence[Prompt],
        kind: str | None,
        key_params: dict[str, Any],
        request: Callable[[AsyncOpenAI, Prompt], Awaitable[Any]],
        parse: Callable[[Any, Prompt], Any],
    ) -> list[tuple[Any | LLMFailure, bool]]:
        """(JSON value or failure, whether it came from the cache) per prompt, in order; `kind` None
        caches nothing."""
        cache = self.cache if kind is not None else None
        out: list[tuple[Any | LLMFailure, bool] | None] = [None] * len(prompts)
        misses: list[int] = []
        for i, prompt in enumerate(prompts):
            hit = cache.get(self._scope, self.model, kind, _key_text(prompt), key_params) if cache else None
            if hit is not None:
                out[i] = (hit, True)
            else:
                misses.append(i)
        self.usage.add(cache_hits=len(prompts) - len(misses))
        if misses:
            # Each answer is stored as soon as it arrives, so a run stopped (or failed) mid-batch redoes nothing.
            def store(i: int, value: Any) -> None:
                if cache is not None and not isinstance(value, LLMFailure):
                    cache.put(self._scope, self.model, kind, _key_text(prompts[misses[i]]), key_params, value)

            results = self._run_sync(lambda: self._gather([prompts[i] for i in misses], request, parse, store))
            for i, result in zip(misses, results, strict=True):
                out[i] = (result, False)
        return [r for r in out if r is not None]

    @staticmethod
    def _run_sync(make: Callable[[], Awaitable[T]]) -> T:
        """Run a coroutine to completion from sync code, even when this thread already runs a loop."""

        async def main() -> T:
            return await make()

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(main())
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, main()).result()

    async def _gather(
        self,
        prompts: list[Prompt],
        request: Callable[[AsyncOpenAI, Prompt], Awaitable[Any]],
        parse: Callable[[Any, Prompt], Any],
        store: Callable[[int, Any], None],
    ) -> list[Any | LLMFailure]:
        # A client per call: its connection pool belongs to this event loop, which asyncio.run closes.
        semaphore = asyncio.Semaphore(self.max_concurrency)
        client = AsyncOpenAI(
            api_key=os.environ.get(self.api_key_env) or NO_KEY,
            base_url=self.base_url,
            timeout=self.timeout_s,
            max_retries=0,
        )

        async def one(i: int, prompt: Prompt) -> Any | LLMFailure:
            result = await self._with_retries(client, semaphore, prompt, request, parse)
            store(i, result)
            return result

        async with client:
            return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

    async def _with_retries(
        self,
        client: AsyncOpenAI,
        semaphore: asyncio.Semaphore,
        prompt: Prompt,
        request: Callable[[AsyncOpenAI, Prompt], Awaitable[Any]],
        parse: Callable[[Any, Prompt], Any],
    ) -> Any | LLMFailure:
        reason = "no attempt made"
        for attempt in range(1, self.max_attempts + 1):
            wait: float | None = None
            try:
                async with semaphore:  # held for the request only, not for the backoff sleep
                    self.usage.add(requests=1)
                    resp = await request(client, prompt)
                self._count_tokens(resp)
                return parse(resp, prompt)
            except openai.APIStatusError as exc:
                reason = f"HTTP {exc.status_code}: {_brief(exc.message)}"
                if exc.status_code == 429:
                    wait = retry_after_seconds(exc.response.headers)
                elif exc.status_code < 500:
                    return self._failure(reason, attempt)
            except openai.APITimeoutError:
                reason = f"timed out after {self.timeout_s:g} s"
                if not self.retry_timeouts:
                    # The server may still be working on it: resending would queue the same work again.
                    return self._failure(f"{reason}; not resent (raise timeout_s, or lower max_concurrency)", attempt)
            except openai.APIConnectionError as exc:
                reason = f"connection error: {_brief(str(exc))}"
            except (openai.APIResponseValidationError, json.JSONDecodeError, _Malformed) as exc:
                reason = f"malformed response: {_brief(str(exc))}"
            except (_Fatal, Unusable) as exc:
                return self._failure(str(exc), attempt)
            if attempt < self.max_attempts:
                if wait is not None:
                    delay = min(wait, self.max_retry_after_s)
                else:  # full jitter: uniform over [0, capped exponential]
                    delay = random.uniform(0, min(self.backoff_cap_s, self.backoff_base_s * 2 ** (attempt - 1)))
                log.info(
                    "%s: attempt %d failed (%s); retrying in %.2f s", self.model, attempt, self._scrub(reason), delay
                )
                await asyncio.sleep(delay)
        return self._failure(f"{reason} (gave up after {self.max_attempts} attempts)", self.max_attempts)

    def _count_tokens(self, resp: Any) -> None:
        usage = getattr(resp, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", None)
        completion_tokens = getattr(usage, "completion_tokens", None)
        self.usage.add(
            prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else 0,
            completion_tokens=completion_tokens if isinstance(completion_tokens, int) else 0,
        )

    def _failure(self, reason: str, attempts: int) -> LLMFailure:
        reason = self._scrub(reason)
        log.warning("%s: request failed after %d attempt(s): %s", self.model, attempts, reason)
        return LLMFailure(reason, attempts)

    def _scrub(self, text: str) -> str:
        """Remove the API key from text a server may have quoted it in."""
        key = os.environ.get(self.api_key_env)
        return text.replace(key, "<api key>") if key else text


def _key_text(prompt: Prompt) -> str:
    """A prompt as cache key material: a chat prompt as canonical JSON of its turns."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def _messages(prompt: Prompt) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _brief(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _merged(responses: list[Any]) -> Any:
    """Single-choice responses as one response of all their choices, with their usage summed."""

    def total(field: str) -> int:
        return sum(v for r in responses if isinstance(v := getattr(getattr(r, "usage", None), field, None), int))

    if any(not getattr(r, "choices", None) for r in responses):
        raise _Malformed("no choices in a response")
    choices = [r.choices[0].model_copy(update={"index": i}) for i, r in enumerate(responses)]
    usage = types.SimpleNamespace(prompt_tokens=total("prompt_tokens"), completion_tokens=total("completion_tokens"))
    return types.SimpleNamespace(choices=choices, usage=usage)


def _parse_completion(resp: Any, n: int, chat: bool) -> dict[str, Any]:
    """Texts and token counts, or `_Malformed` when the body is not a usable completion."""
    choices = getattr(resp, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise _Malformed(f"no choices in the response (got {type(resp).__name__})")
    texts: list[str] = []
    truncated: list[bool] = []
    for choice in sorted(choices, key=lambda c: c.index if isinstance(getattr(c, "index", None), int) else 0):
        text = getattr(getattr(choice, "message", None), "content", None) if chat else getattr(choice, "text", None)
        if not isinstance(text, str):
            raise _Malformed("a choice has no text")
        texts.append(text)
        truncated.append(getattr(choice, "finish_reason", None) == "length")
    if len(texts) != n:
        raise _Malformed(f"{len(texts)} choices for n={n}")
    usage = getattr(resp, "usage", None)
    prompt_tokens = getattr(usage, "prompt_tokens", None)
    completion_tokens = getattr(usage, "completion_tokens", None)
    return {
        "texts": texts,
        "truncated": truncated,
        "prompt_tokens": prompt_tokens if isinstance(prompt_tokens, int) else 0,
        "completion_tokens": completion_tokens if isinstance(completion_tokens, int) else 0,
    }


def _parse_echo(resp: Any, prompt: str, generated_max: int) -> dict[str, Any]:
    """The prompt's tokens, top logprobs and offsets, trimmed of any generated token (`max_tokens=1`)."""
    choices = getattr(resp, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise _Malformed(f"no choices in the response (got {type(resp).__name__})")
    lp = getattr(choices[0], "logprobs", None)
    tokens = getattr(lp, "tokens", None)
    if not tokens:
        raise _Fatal(NO_LOGPROBS)
    raw_top = getattr(lp, "top_logprobs", None)
    if not isinstance(raw_top, list) or len(raw_top) != len(tokens):
        raise _Fatal(NO_LOGPROBS if not raw_top else "top_logprobs and tokens differ in length")
    top: list[dict[str, float]] = []
    for entry in raw_top:  # null for the first token: nothing precedes it
        top.append(
            {str(t): float(v) for t, v in (entry or {}).items() if isinstance(v, int | float) and math.isfinite(v)}
        )
    offsets = getattr(lp, "text_offset", None)
    offsets = [int(o) for o in offsets] if isinstance(offsets, list) and len(offsets) == len(tokens) else []
    keep = len(tokens)
    if generated_max > 0:
        if offsets:
            keep = sum(1 for o in offsets if o < len(prompt))
        else:
            usage = getattr(resp, "usage", None)
            generated = getattr(usage, "completion_tokens", None)
            if isinstance(generated, int) and 0 <= generated <= len(tokens):
                keep = len(tokens) - generated
            else:  # last resort: count characters until the prompt is covered
                covered, keep = 0, 0
                while keep < len(tokens) and covered < len(prompt):
                    covered += len(tokens[keep])
                    keep += 1
    return {"tokens": [str(t) for t in tokens[:keep]], "top_logprobs": top[:keep], "text_offset": offsets[:keep]}


def _parse_next(resp: Any, prompt: Prompt) -> dict[str, Any]:
    """The top logprobs of the first generated token (legacy completions shape, or the chat-style
    `logprobs.content[]` some servers answer /completions with)."""
    choices = getattr(resp, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise _Malformed(f"no choices in the response (got {type(resp).__name__})")
    lp = getattr(choices[0], "logprobs", None)
    raw_top = getattr(lp, "top_logprobs", None)
    if isinstance(raw_top, list) and raw_top and isinstance(raw_top[0], dict):
        entry = raw_top[0]
        return {"top": {str(t): float(v) for t, v in entry.items() if isinstance(v, int | float) and math.isfinite(v)}}
    content = getattr(lp, "content", None) if lp is not None else None
    if content is None and isinstance(lp, dict):
        content = lp.get("content")
    if isinstance(content, list) and content:
        return {"top": _top_from_chat_entry(content[0])}
    raise _Fatal("server returned no logprobs for the generated token")


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _top_from_chat_entry(entry: Any) -> dict[str, float]:
    top: dict[str, float] = {}
    for cand in _field(entry, "top_logprobs") or []:
        token, value = _field(cand, "token"), _field(cand, "logprob")
        if isinstance(token, str) and isinstance(value, int | float) and math.isfinite(value):
            # Tokens that decode alike (e.g. partial UTF-8) keep the likelier one.
            top[token] = max(top.get(token, -math.inf), float(value))
    return top


def _parse_chat_reply(resp: Any, want_logprobs: bool) -> ChatReply:
    """The reply's text and, per generated token, its bytes and top logprobs."""
    parsed = _parse_completion(resp, 1, chat=True)
    choice = resp.choices[0]
    tokens: list[tuple[bytes, dict[str, float]]] = []
    if want_logprobs:
        lp = getattr(choice, "logprobs", None)
        content = _field(lp, "content") if lp is not None else None
        if not isinstance(content, list) or (not content and parsed["texts"][0]):
            raise _Fatal(NO_CHAT_LOGPROBS)
        for entry in content:
            token, raw = _field(entry, "token"), _field(entry, "bytes")
            if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
                data = bytes(raw)
            elif isinstance(token, str):
                data = token.encode("utf-8")
            else:
                raise _Malformed("a logprobs entry has no token")
            tokens.append((data, _top_from_chat_entry(entry)))
    return ChatReply(
        text=parsed["texts"][0],
        tokens=tokens,
        truncated=parsed["truncated"][0],
        prompt_tokens=parsed["prompt_tokens"],
        completion_tokens=parsed["completion_tokens"],
    )


def _parse_completion_reply(resp: Any, want_logprobs: bool) -> ChatReply:
    """A /completions answer as a `ChatReply`: its text and, per generated token, its bytes and top
    logprobs (the legacy `tokens`/`top_logprobs` arrays, or the chat-style `content[]` that llama.cpp's
    server answers /completions with)."""
    parsed = _parse_completion(resp, 1, chat=False)
    tokens: list[tuple[bytes, dict[str, float]]] = []
    if want_logprobs:
        lp = getattr(resp.choices[0], "logprobs", None)
        names, tops = _field(lp, "tokens"), _field(lp, "top_logprobs")
        content = _field(lp, "content") if lp is not None else None
        if isinstance(names, list) and isinstance(tops, list) and len(names) == len(tops) and names:
            for name, top in zip(names, tops, strict=True):
                cands = {
                    str(t): float(v) for t, v in (top or {}).items() if isinstance(v, int | float) and math.isfinite(v)
                }
                tokens.append((str(name).encode("utf-8"), cands))
        elif isinstance(content, list) and content:
            for entry in content:
                token, raw = _field(entry, "token"), _field(entry, "bytes")
                if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
                    data = bytes(raw)
                elif isinstance(token, str):
                    data = token.encode("utf-8")
                else:
                    raise _Malformed("a logprobs entry has no token")
                tokens.append((data, _top_from_chat_entry(entry)))
        elif parsed["texts"][0]:
            raise _Fatal("server returned no logprobs for the generated tokens (set the simulator's logprobs: false)")
    return ChatReply(
        text=parsed["texts"][0],
        tokens=tokens,
        truncated=parsed["truncated"][0],
        prompt_tokens=parsed["prompt_tokens"],
        completion_tokens=parsed["completion_tokens"],
    )
