"""In-process text completion with a local HF causal LM (the embedded Gemma by default).

Sampling is seeded per request, so a rerun with the same seed writes the same explanations. With
`api="chat"` a chat prompt goes through the tokenizer's own chat template (an instruct model's).

Prompt reuse: the explainer's prompts of a layer share their long few-shot part. The backend keeps
the KV cache of the last prompt it read (all but its last token) and runs only the tokens after
the part a new prompt shares with it (token ids compared, so any prompt works); the prompt is read
once at batch 1, and the cache copied to the `n` samples, where `generate` on the whole prompt
would read it `n` times. Generation then starts from that cache with the same logits processors,
stop strings (their tables built once, not per request) and seeding as before: the same tokens,
up to float rounding of a prompt read in two pieces instead of one (identical in the tests and on
the bench's units).

Requests batched together (`batch_requests` > 1, sampling only): several prompts are generated
in one batch (left-padded, each prompt's cache computed as above), and each request's samples are
drawn from its own random stream seeded as a request alone would be, by a last logits processor
that applies the temperature and top-p itself and leaves `generate` a single token to pick. A
request therefore writes the same samples alone or in any batch, up to float rounding of a
padded batch. Each generated token then costs one step for all the batch's rows at once, where
one request alone is a sequential step for its `n` rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from pipeline.core.errors import AtlasInputError
from pipeline.core.llm import APIS, Completion, GenerationParams, LLMBackend, LLMFailure, Prompt


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first stop string (generation may overshoot by a token)."""
    cuts = [i for s in stop if s and (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text


def shared_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids two sequences have in common."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# Units' sampled requests generated together by default: 2.4x faster explaining on 2 cores with the
# same samples (README, bench.interpret); a batch that runs out of memory reruns one request at a time.
DEFAULT_BATCH_REQUESTS = 8
MIN_REUSE = 16  # shared prompt tokens worth taking from the kept cache
# Sampling settings of a model's generation config that `generate` would apply after the temperature
# and top-p; a batch of requests samples in its own processor, so such a model is not batched.
_OTHER_WARPERS = ("top_h", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


class _PerRequestSampler(LogitsProcessor):
    """Samples each request's rows from its own generator, as `generate` samples one request seeded
    alone (temperature, then top-p, then a multinomial draw over the request's rows), and returns
    scores that allow only the drawn token, so `generate`'s greedy step takes it."""

    def __init__(self, params: GenerationParams, requests: int, device: torch.device):
        self.n = params.n
        self.warpers = [TemperatureLogitsWarper(params.temperature)] if params.temperature != 1.0 else []
        if params.top_p is not None and params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=params.top_p))
        self.generators = [torch.Generator(device=device).manual_seed(params.seed) for _ in range(requests)]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = torch.full_like(scores, -torch.inf)
        for k, generator in enumerate(self.generators):
            rows = slice(k * self.n, (k + 1) * self.n)
            warped = scores[rows]
            for warper in self.warpers:
                warped = warper(input_ids[rows], warped)
            drawn = torch.multinomial(torch.softmax(warped, dim=-1), num_samples=1, generator=generator)
            chosen[rows].scatter_(1, drawn, 0.0)
        return chosen


class LocalBackend(LLMBackend):
    backend = "local"
    batch_hint = 1  # one prompt at a time anyway: report progress after each

    def __init__(
        self,
        lm: Any,
        tokenizer: Any,
        model_name: str,
        api: str = "completions",
        plain: bool = False,
        batch_requests: int = 1,
    ):
        """`plain`: `generate` on the whole prompt and nothing kept between requests (the path
        before prompt reuse; the tests and `bench.interpret` compare against it). `batch_requests`:
        sampled requests generated together (1: one at a time)."""
        if batch_requests < 1:
            raise AtlasInputError(f"batch_requests must be at least 1, got {batch_requests}")
        if api not in APIS:
            raise AtlasInputError(f"unknown api {api!r}: use one of {', '.join(APIS)}")
        if api == "chat" and not getattr(tokenizer, "chat_template", None):
            raise AtlasInputError(
                f"api: chat needs a model with a chat template (an instruct model); {model_name} has none:"
                " use api: completions"
            )
        self.lm, self.tokenizer, self.model, self.api = lm.eval(), tokenizer, model_name, api
        self.device = next(lm.parameters()).device
        # The kept prompt: its token ids and each layer's (keys, values) for them (batch 1, every
        # position, sliding-window layers included). Only for models `generate` runs on a DynamicCache.
        self.plain = plain
        self.reuse = not plain and _dynamic_cache_ok(self.lm)
        config = getattr(self.lm, "generation_config", None)
        others = any(getattr(config, name, None) not in (None, 0.0, 1.0) for name in _OTHER_WARPERS)
        self.batch_requests = batch_requests if self.reuse and not others else 1
        self.batch_hint = self.batch_requests
        self._kept: tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        # Positions the model computed for prompts (a position read for k rows counts k times), taken
        # from the kept cache instead, and computed for generated tokens (each but the last, per row).
        self.work = {"prompt_computed": 0, "prompt_reused": 0, "decoded": 0}
        # Stop-string tables per stop tuple: `generate(stop_strings=...)` rebuilds its criterion from the
        # whole vocabulary on every call (sorting and hashing 262k tokens for Gemma).
        self._stops: dict[tuple[str, ...], StopStringCriteria] = {}
        # The tokens after which a row has ended: the tokenizer's EOS and padding, the padding
        # `generate` writes, and the model's own end tokens (e.g. a chat model's end of turn).
        model_ends = getattr(config, "eos_token_id", None)
        model_ends = [model_ends] if isinstance(model_ends, int) else list(model_ends or [])
        self._ended = {tokenizer.eos_token_id, tokenizer.pad_token_id, self._pad_id(), *model_ends} - {None}

    def render(self, prompt: Prompt) -> str:
        """The text the model reads: a chat prompt through the chat template, ready for the reply."""
        if isinstance(prompt, str):
            if self.api == "chat":
                prompt = [{"role": "user", "content": prompt}]
            else:
                return prompt
        if self.api != "chat":
            raise AtlasInputError("a chat prompt (a list of turns) needs api: chat; this backend uses completions")
        return str(self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))

    def complete(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Completion | LLMFailure]:
        if params.n < 1:
            raise AtlasInputError(f"number of samples must be at least 1, got {params.n}")
        if params.n > 1 and params.temperature <= 0:
            raise AtlasInputError("several samples need a temperature above 0 (temperature 0 is greedy)")
        out: list[Completion | LLMFailure] = []
        step = self.batch_requests if params.temperature > 0 else 1
        for lo in range(0, len(prompts), step):
            texts = [self.render(p) for p in prompts[lo : lo + step]]
            self.usage.add(requests=len(texts))
            if len(texts) > 1:
                try:
                    out += self._many(texts, params)
                    continue
                except torch.OutOfMemoryError:
                    pass  # the batch did not fit: each request alone
            for text in texts:
                try:
                    out.append(self._one(text, params))
                except torch.OutOfMemoryError as exc:
                    out.append(LLMFailure(f"out of memory while generating: {exc}"))
        return out

    def _windows(self, texts: Sequence[str], width: int = 3) -> list[list[int]]:
        """Every `width`-token window of each text (as it would follow a space): generating the last
        token of a window after the others is forbidden, so no text is reproduced."""
        out: list[list[int]] = []
        for text in texts:
            ids = list(self.tokenizer.encode(" " + text.strip(), add_special_tokens=False))
            out += [ids[i : i + width] for i in range(max(1, len(ids) - width + 1))]
        return out

    @torch.inference_mode()
    def _one(self, prompt: str, params: GenerationParams) -> Completion:
        # A chat template writes its own special tokens (BOS included); a plain prompt gets the tokenizer's.
        special = self.api != "chat"
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=special).input_ids.to(self.device)
        sample = params.temperature > 0
        kwargs: dict[str, Any] = {"do_sample": sample, "num_return_sequences": params.n}
        if sample:
            kwargs |= {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        else:
            kwargs |= {"temperature": None, "top_p": None, "top_k": None}
        kwargs |= self._generation_kwargs(params)
        inputs = ids
        if self.reuse and ids.shape[1] > 1:
            # The prompt but its last token is in the cache, copied to the n rows: `generate` reads
            # only that token (per row) before sampling, as it would after reading the whole prompt.
            kwargs["cache"] = self._prompt_cache(ids, params.n)
            inputs = ids.expand(params.n, -1)
            # The all-ones mask generate makes for one row (n identical rows would only warn that it cannot tell).
            kwargs |= {"num_return_sequences": 1, "attention_mask": torch.ones_like(inputs)}
            self.work["prompt_computed"] += params.n
        else:
            self.work["prompt_computed"] += params.n * int(ids.shape[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            generated = self.lm.generate(
                inputs,
                max_new_tokens=params.max_tokens,
                pad_token_id=self._pad_id(),
                **kwargs,
            )
        return self._completion(generated[:, ids.shape[1] :], int(ids.shape[1]), params)

    def _completion(self, new: torch.Tensor, prompt_tokens: int, params: GenerationParams) -> Completion:
        """One request's result from its generated rows (the tokens after the prompt)."""
        self.work["decoded"] += int(new.shape[0]) * max(int(new.shape[1]) - 1, 0)  # the last token is never read
        raw = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        texts = [cut_at_stop(t, params.stop) for t in raw]
        completion_tokens = generated_lengths(new, self._ended)
        # Cut off: every one of max_tokens generated (no EOS/padding) and no stop string reached.
        truncated = tuple(
            bool(params.stop)
            and len(row) >= params.max_tokens
            and not any(int(t) in self._ended for t in row)
            and not any(s in text for s in params.stop)
            for row, text in zip(new, raw, strict=True)
        )
        self.usage.add(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        return Completion(
            texts=texts, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, truncated=truncated
        )

    def _pad_id(self) -> int:
        """The token `generate` writes after a row ends (a pad id of 0 counts as none, as it always did)."""
        return self.tokenizer.pad_token_id or self.tokenizer.eos_token_id

    def _generation_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        """Stop strings (tables built once) and the few-shot windows to avoid."""
        kwargs: dict[str, Any] = {}
        if params.stop and self.plain:
            kwargs |= {"stop_strings": list(params.stop), "tokenizer": self.tokenizer}
        elif params.stop:
            if params.stop not in self._stops:
                self._stops[params.stop] = StopStringCriteria(self.tokenizer, list(params.stop))
            kwargs["stopping_criteria"] = StoppingCriteriaList([self._stops[params.stop]])
        if params.avoid:
            kwargs["bad_words_ids"] = self._windows(params.avoid)
        return kwargs

    @torch.inference_mode()
    def _many(self, prompts: Sequence[str], params: GenerationParams) -> list[Completion]:
        """Sampled requests in one batch: each prompt's cache (all but its last token) left-padded to
        the longest and copied to its `n` rows; each request sampled from its own stream."""
        special = self.api != "chat"
        ids = [self.tokenizer(p, return_tensors="pt", add_special_tokens=special).input_ids[0] for p in prompts]
        width = max(len(i) for i in ids)
        pad = self._pad_id()
        inputs = torch.full((len(ids) * params.n, width), pad, dtype=torch.long)
        mask = torch.zeros_like(inputs)
        per_request: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # [request][layer] -> keys, values
        for k, row in enumerate(ids):
            rows, left = slice(k * params.n, (k + 1) * params.n), width - len(row)
            inputs[rows, left:] = row
            mask[rows, left:] = 1
            kv = self._prompt_kv(row[None].to(self.device))
            self.work["prompt_computed"] += params.n  # each row reads the prompt's last token

            def padded(t: torch.Tensor, left: int = left) -> torch.Tensor:
                return torch.nn.functional.pad(t, (0, 0, left, 0)).expand(params.n, -1, -1, -1)

            per_request.append([(padded(key), padded(value)) for key, value in kv])
        layers = [
            (torch.cat([k for k, _ in layer]), torch.cat([v for _, v in layer]))
            for layer in zip(*per_request, strict=True)
        ]
        cache = DynamicCache(ddp_cache_data=layers, config=self.lm.config)
        kwargs = self._generation_kwargs(params)
        sampler = _PerRequestSampler(params, len(ids), self.device)
        generated = self.lm.generate(
            inputs.to(self.device),
            attention_mask=mask.to(self.device),
            cache=cache,
            max_new_tokens=params.max_tokens,
            pad_token_id=pad,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=LogitsProcessorList([sampler]),
            **kwargs,
        )
        new = generated[:, width:]
        return [self._completion(new[k * params.n : (k + 1) * params.n], len(row), params) for k, row in enumerate(ids)]

    def _prompt_cache(self, ids: torch.Tensor, rows: int) -> DynamicCache:
        """A cache holding `ids` but its last token, for `rows` rows."""
        # What `generate` would have built: the model's own layer kinds (a sliding-window layer keeps
        # only its window), filled with the prompt.
        cache = DynamicCache(ddp_cache_data=self._prompt_kv(ids), config=self.lm.config)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        return cache

    def _prompt_kv(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's keys and values for `ids` but its last token (batch 1, every position): the
        part shared with the kept prompt is taken from its cache, the rest computed once; this
        prompt becomes the kept one."""
        row = ids[0, :-1].tolist()
        reuse = 0
        if self._kept is not None:
            reuse = shared_length(self._kept[0], row)
            reuse = reuse if reuse >= MIN_REUSE else 0
        full = DynamicCache()  # every position of every layer, so a later prompt can share any prefix
        if reuse:
            full = DynamicCache(ddp_cache_data=[(k[:, :, :reuse], v[:, :, :reuse]) for k, v in self._kept[1]])
        if len(row) > reuse:
            positions = torch.arange(reuse, len(row), device=self.device)[None]
            self.lm.base_model(input_ids=ids[:, reuse:-1], position_ids=positions, cache=full, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in full.layers]
        self._kept = (row, kv)
        self.work["prompt_computed"] += len(row) - reuse
        self.work["prompt_reused"] += reuse
        return kv


def generated_lengths(new: torch.Tensor, ended: set[int]) -> int:
    """Tokens the rows generated before each one's first end token (an EOS, or the padding
    `generate` writes once a row is done, e.g. at a stop string). A row that finished before the
    others of its batch is padded to their length, and a padding token can be the EOS itself (Gemma
    pads with EOS), so counting up to the first one is what makes a request count the same tokens
    alone or batched."""
    if new.numel() == 0:
        return 0
    is_end = torch.isin(new, torch.tensor(sorted(ended), dtype=new.dtype, device=new.device))
    first = torch.where(is_end.any(dim=1), is_end.int().argmax(dim=1), new.shape[1])
    return int(first.sum())


def _dynamic_cache_ok(lm: Any) -> bool:
    """Whether `generate` runs this model on a DynamicCache that a caller may pass in."""
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(getattr(lm, "generation_config", None), "cache_implementation", None) is not None:
        return False  # generate refuses a cache beside a cache_implementation
    supports = getattr(type(lm), "_supports_default_dynamic_cache", None)
    return bool(supports()) if callable(supports) else False
