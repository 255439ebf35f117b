"""In-process text completion with a local HF causal LM (the embedded Gemma by default).

Sampling is seeded per request, so a rerun with the same seed writes the same explanations. With
`api="chat"` a chat prompt goes through the tokenizer's own chat template (an instruct model's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.errors import AtlasInputError
from pipeline.llm import APIS, Completion, GenerationParams, LLMBackend, LLMFailure, Prompt


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first stop string (generation may overshoot by a token)."""
    cuts = [i for s in stop if s and (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text


class LocalBackend(LLMBackend):
    backend = "local"
    batch_hint = 1  # one prompt at a time anyway: report progress after each

    def __init__(self, lm: Any, tokenizer: Any, model_name: str, api: str = "completions"):
        if api not in APIS:
            raise AtlasInputError(f"unknown api {api!r}: use one of {', '.join(APIS)}")
        if api == "chat" and not getattr(tokenizer, "chat_template", None):
            raise AtlasInputError(
                f"api: chat needs a model with a chat template (an instruct model); {model_name} has none:"
                " use api: completions"
            )
        self.lm, self.tokenizer, self.model, self.api = lm.eval(), tokenizer, model_name, api
        self.device = next(lm.parameters()).device

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
        if params.stop:
            kwargs |= {"stop_strings": list(params.stop), "tokenizer": self.tokenizer}
        if params.avoid:
            kwargs["bad_words_ids"] = self._windows(params.avoid)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            generated = self.lm.generate(
                ids,
                max_new_tokens=params.max_tokens,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                **kwargs,
            )
        new = generated[:, ids.shape[1] :]
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
