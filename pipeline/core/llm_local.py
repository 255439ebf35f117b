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
the bench's units). Prompts are not batched across requests: each request's sampling is seeded
on its own, and a batch would share one random stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, StoppingCriteriaList, StopStringCriteria

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


MIN_REUSE = 16  # shared prompt tokens worth taking from the kept cache


class LocalBackend(LLMBackend):
    backend = "local"
    batch_hint = 1  # one prompt at a time anyway: report progress after each

    def __init__(self, lm: Any, tokenizer: Any, model_name: str, api: str = "completions", plain: bool = False):
        """`plain`: `generate` on the whole prompt and nothing kept between requests (the path
        before prompt reuse; the tests and `bench.interpret` compare against it)."""
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
        self._kept: tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        # Positions the model computed for prompts (a position read for k rows counts k times), taken
        # from the kept cache instead, and computed for generated tokens (each but the last, per row).
        self.work = {"prompt_computed": 0, "prompt_reused": 0, "decoded": 0}
        # Stop-string tables per stop tuple: `generate(stop_strings=...)` rebuilds its criterion from the
        # whole vocabulary on every call (sorting and hashing 262k tokens for Gemma).
        self._stops: dict[tuple[str, ...], StopStringCriteria] = {}

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
        for prompt in prompts:
            try:
                self.usage.add(requests=1)
                out.append(self._one(self.render(prompt), params))
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
        if params.stop and self.plain:
            kwargs |= {"stop_strings": list(params.stop), "tokenizer": self.tokenizer}
        elif params.stop:
            if params.stop not in self._stops:
                self._stops[params.stop] = StopStringCriteria(self.tokenizer, list(params.stop))
            kwargs["stopping_criteria"] = StoppingCriteriaList([self._stops[params.stop]])
        if params.avoid:
            kwargs["bad_words_ids"] = self._windows(params.avoid)
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
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                **kwargs,
            )
        new = generated[:, ids.shape[1] :]
        self.work["decoded"] += int(new.shape[0]) * max(int(new.shape[1]) - 1, 0)  # the last token is never read
        raw = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        texts = [cut_at_stop(t, params.stop) for t in raw]
        pad = self.tokenizer.pad_token_id
        completion_tokens = int((new != pad).sum()) if pad is not None else int(new.numel())
        # Cut off: every one of max_tokens generated (no EOS/padding) and no stop string reached.
        ended = {self.tokenizer.eos_token_id, pad} - {None}
        truncated = tuple(
            bool(params.stop)
            and len(row) >= params.max_tokens
            and not any(int(t) in ended for t in row)
            and not any(s in text for s in params.stop)
            for row, text in zip(new, raw, strict=True)
        )
        self.usage.add(prompt_tokens=int(ids.shape[1]), completion_tokens=completion_tokens)
        return Completion(
            texts=texts, prompt_tokens=int(ids.shape[1]), completion_tokens=completion_tokens, truncated=truncated
        )

    def _prompt_cache(self, ids: torch.Tensor, rows: int) -> DynamicCache:
        """A cache holding `ids` but its last token, for `rows` rows: the part shared with the kept
        prompt is taken from its cache, the rest computed once; this prompt becomes the kept one."""
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
        # What `generate` would have built: the model's own layer kinds (a sliding-window layer keeps
        # only its window), filled with the prompt.
        cache = DynamicCache(ddp_cache_data=kv, config=self.lm.config)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        return cache


def _dynamic_cache_ok(lm: Any) -> bool:
    """Whether `generate` runs this model on a DynamicCache that a caller may pass in."""
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(getattr(lm, "generation_config", None), "cache_implementation", None) is not None:
        return False  # generate refuses a cache beside a cache_implementation
    supports = getattr(type(lm), "_supports_default_dynamic_cache", None)
    return bool(supports()) if callable(supports) else False
