"""The in-process "all at once" simulator: exact next-token probabilities from a local HF causal LM.

Fast path (`LocalSimulator`):
- the instructions and few-shot neurons run once per simulator, the explanation once per
  explanation; that prefix's KV cache is reused by every held-out sequence of the explanation;
- sequences are batched as rows after that prefix, with explicit positions and hand-built masks;
- only the vocabulary rows of the level tokens are projected, not the whole head;
- on an accelerator, `simulate_many` fills each forward pass with the sequences of several
  explanations (each row sees its own explanation's prefix; shorter prefixes are padded and
  masked), so a layer's many explanations of ~10 sequences each run as full batches.

Multi-token numerals are exact: where a level's first token also starts a longer level (Gemma
writes "10" as "1","0"), a "branch" token ("1") is appended to the row at the slot's position,
seeing only what precedes the slot; the model's next-token odds of "0" vs the line end there split
p("1") between 10 and 1. `NaiveLocalSimulator` computes the same numbers the slow, obvious way
(a full-prompt, full-head forward per sequence and one more per branch) and is the reference the
fast path is tested and benchmarked against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from pipeline.core.errors import AtlasInputError
from pipeline.core.llm import LLMFailure
from pipeline.core.prompts import SIMULATE_VERSION, simulation_pieces, simulation_prefix_parts
from pipeline.core.simulator import LEVELS, Job, JobResult, OnJob, Simulator

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [batch, heads, positions, dim]


@dataclass(frozen=True)
class LevelTokens:
    """How the tokenizer spells the levels 0..10 after a tab."""

    single: dict[int, int]  # token id -> level it spells alone
    branches: dict[int, tuple[int, int]]  # first token id -> (next token id, level of the two together)
    end: int  # token that ends a level: the line break
    rows: list[int] = field(default_factory=list)  # vocabulary rows the simulator reads

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> LevelTokens:
        def ids(text: str) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=False))

        single: dict[int, int] = {}
        multi: dict[int, list[int]] = {}
        for level in LEVELS:
            spelled = ids(str(level))
            if len(spelled) == 1:
                single[spelled[0]] = level
            else:
                multi[level] = spelled
        branches: dict[int, tuple[int, int]] = {}
        for level, spelled in multi.items():
            if len(spelled) != 2 or spelled[0] not in single:
                raise AtlasInputError(
                    f"the simulator's tokenizer spells {level} as {len(spelled)} tokens {spelled}; only a single token"
                    " or a level's token plus one more are supported"
                )
            branches[spelled[0]] = (spelled[1], level)
        if len(branches) > 1:
            raise AtlasInputError("the simulator supports at most one level spelled with two tokens (10)")
        end = ids("\n")
        if len(end) != 1:
            raise AtlasInputError(f"the simulator's tokenizer spells a line break as {len(end)} tokens")
        rows = sorted(set(single) | {nxt for nxt, _ in branches.values()} | {end[0]})
        return cls(single, branches, end[0], rows)


@dataclass
class _Row:
    """One sequence's tokens after the prefix: body, then one branch token per slot that needs it."""

    ids: list[int]
    reads: list[int]  # per slot: row index whose next-token distribution is the slot's level
    branch_of: list[int | None]  # per slot: row index of its branch token, if any


class _PromptTokens:
    """Tokenizes the simulator prompt piece by piece, so slot positions are known exactly; the fast
    and the naive path build the same ids."""

    def __init__(self, tokenizer: Any, levels: LevelTokens):
        self.tokenizer, self.levels = tokenizer, levels
        self._memo: dict[str, list[int]] = {}
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos = [bos] if bos is not None else []

    def encode(self, text: str) -> list[int]:
        if text not in self._memo:
            self._memo[text] = list(self.tokenizer.encode(text, add_special_tokens=False))
        return self._memo[text]

    def prefix_parts(self, explanation: str) -> tuple[list[int], list[int]]:
        """(ids shared by every explanation, this explanation's ids)."""
        shared, own = simulation_prefix_parts(explanation)
        return self.bos + self.encode(shared), list(self.tokenizer.encode(own, add_special_tokens=False))

    def prefix(self, explanation: str) -> list[int]:
        shared, own = self.prefix_parts(explanation)
        return shared + own

    def row(self, tokens: Sequence[str]) -> _Row:
        ids: list[int] = []
        reads: list[int] = []
        for text, is_slot in simulation_pieces(tokens):
            if is_slot:
                if not ids:
                    raise AtlasInputError("a simulation slot cannot open the sequence")
                reads.append(len(ids) - 1)
            ids += self.encode(text)
        ids = ids[: reads[-1] + 1] if reads else ids  # nothing after the last read position matters
        branch_of: list[int | None] = []
        for _ in reads:
            if self.levels.branches:
                branch_of.append(len(ids))
                ids.append(next(iter(self.levels.branches)))
            else:
                branch_of.append(None)
        return _Row(ids, reads, branch_of)


def _levels_from_logits(first: torch.Tensor, branch: torch.Tensor | None, levels: LevelTokens) -> float:
    """Expected level at one slot from the logits of the level rows (first token; branch token)."""
    p = torch.softmax(first.double(), dim=0)
    index = {tok: i for i, tok in enumerate(levels.rows)}
    probs = dict.fromkeys(LEVELS, 0.0)
    for tok, level in levels.single.items():
        probs[level] += float(p[index[tok]])
    if branch is not None:
        for tok, (nxt, level) in levels.branches.items():
            q = torch.softmax(torch.stack([branch[index[nxt]], branch[index[levels.end]]]).double(), dim=0)
            shared = probs[levels.single[tok]]
            probs[level] += shared * float(q[0])
            probs[levels.single[tok]] = shared * float(q[1])
    total = sum(probs.values())
    return sum(v * p for v, p in probs.items()) / total


def _expected_levels(first: np.ndarray, branch: np.ndarray | None, levels: LevelTokens) -> np.ndarray:
    """`_levels_from_logits` for many slots at once: logits of the level rows [slots, rows]."""
    col = {tok: i for i, tok in enumerate(levels.rows)}
    p = np.exp(first - first.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    probs = np.zeros((len(first), len(LEVELS)))
    for tok, level in levels.single.items():
        probs[:, level] += p[:, col[tok]]
    if branch is not None:
        for tok, (nxt, level) in levels.branches.items():
            odds = branch[:, col[nxt]] - branch[:, col[levels.end]]  # next token "0" vs the line end
            longer = 1.0 / (1.0 + np.exp(-odds))
            shared = probs[:, levels.single[tok]].copy()
            probs[:, level] += shared * longer
            probs[:, levels.single[tok]] = shared * (1.0 - longer)
    return probs @ np.asarray(LEVELS, dtype=np.float64) / probs.sum(axis=1)


class _LocalBase(Simulator):
    prompt_version = SIMULATE_VERSION
    backend = "local"

    def __init__(self, lm: Any, tokenizer: Any, model_name: str):
        self.lm, self.model = lm.eval(), model_name
        self.levels = LevelTokens.from_tokenizer(tokenizer)
        self.prompt = _PromptTokens(tokenizer, self.levels)
        self.device = next(lm.parameters()).device

    def simulate(self, explanation: str, sequences: Sequence[Sequence[str]]) -> list[np.ndarray] | LLMFailure:
        if not sequences:
            return []
        self._count(explanation, sequences)
        try:
            return self._simulate(explanation, sequences)
        except torch.OutOfMemoryError as exc:
            return LLMFailure(f"out of memory while simulating: {exc}")

    def _count(self, explanation: str, sequences: Sequence[Sequence[str]]) -> None:
        """One "request" per explanation; its tokens are what a server would have read (prefix per sequence)."""
        n_prefix = len(self.prompt.prefix(explanation))
        self.usage.add(requests=1, prompt_tokens=sum(n_prefix + len(self.prompt.row(t).ids) for t in sequences))

    def _simulate(self, explanation: str, sequences: Sequence[Sequence[str]]) -> list[np.ndarray]:
        raise NotImplementedError


class LocalSimulator(_LocalBase):
    """Prefix KV cache once per explanation, sequences batched, only the level rows of the head."""

    WINDOW_BATCHES = 4  # simulate_many: jobs are batched together in windows of about this many batches

    def __init__(self, lm: Any, tokenizer: Any, model_name: str, batch_size: int = 16, mix_jobs: bool | None = None):
        """`mix_jobs`: let `simulate_many` put several explanations' sequences in one pass. By default
        only on an accelerator: on a CPU the pass is compute-bound, so fuller batches gain nothing,
        while a mixed batch copies each row's prefix KV once more (0.93x measured on 16 threads)."""
        super().__init__(lm, tokenizer, model_name)
        if batch_size < 1:
            raise AtlasInputError(f"simulation batch size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.mix_jobs = self.device.type != "cpu" if mix_jobs is None else mix_jobs
        self._shared: tuple[list[int], KV] | None = None  # the few-shot prefix and its KV
        head = lm.get_output_embeddings()
        rows = torch.tensor(self.levels.rows, device=self.device)
        self.head_rows = head.weight[rows].detach()
        bias = getattr(head, "bias", None)
        self.head_bias = bias[rows].detach() if bias is not None else None
        config = lm.config.get_text_config()
        self.softcap = getattr(config, "final_logit_softcapping", None)
        types = list(getattr(config, "layer_types", None) or [])
        self.sliding = getattr(config, "sliding_window", None) if "sliding_attention" in types else None
        self.layer_types = sorted(set(types)) if self.sliding else []

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden @ self.head_rows.T
        if self.head_bias is not None:
            logits = logits + self.head_bias
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _simulate(self, explanation: str, sequences: Sequence[Sequence[str]]) -> list[np.ndarray]:
        return self._simulate_jobs([Job(explanation, sequences)])[0]

    def simulate_many(self, jobs: Sequence[Job], on_result: OnJob | None = None) -> list[JobResult]:
        """Every job, the rows of consecutive jobs sharing forward passes: jobs are taken in windows
        of about `WINDOW_BATCHES` batches' worth of sequences, sorted by length within the window.
        A window that runs out of memory is retried one job at a time, so only a job that does not
        fit alone fails. Without `mix_jobs`, one job after another."""
        if not self.mix_jobs:
            return super().simulate_many(jobs, on_result)
        out: list[JobResult] = [[] for _ in jobs]

        def run(window: list[int]) -> None:
            for i in window:
                self._count(*jobs[i])
            try:
                results: list[JobResult] = list(self._simulate_jobs([jobs[i] for i in window]))
            except torch.OutOfMemoryError:
                results = []
                for i in window:
                    try:
                        results += self._simulate_jobs([jobs[i]])
                    except torch.OutOfMemoryError as exc:
                        results.append(LLMFailure(f"out of memory while simulating: {exc}"))
            for i, result in zip(window, results, strict=True):
                out[i] = result
                if on_result is not None:
                    on_result(i, result)

        window: list[int] = []
        n_rows = 0
        for i, job in enumerate(jobs):
            if not job.sequences:
                if on_result is not None:
                    on_result(i, [])
                continue
            window.append(i)
            n_rows += len(job.sequences)
            if n_rows >= self.WINDOW_BATCHES * self.batch_size:
                run(window)
                window, n_rows = [], 0
        if window:
            run(window)
        return out

    @torch.inference_mode()
    def _simulate_jobs(self, jobs: Sequence[Job]) -> list[list[np.ndarray]]:
        body = self.lm.base_model
        owns = [self._own_prefix(body, job.explanation) for job in jobs]
        rows = [(j, s, self.prompt.row(tokens)) for j, job in enumerate(jobs) for s, tokens in enumerate(job.sequences)]
        out: list[list[np.ndarray | None]] = [[None] * len(job.sequences) for job in jobs]
        rows.sort(key=lambda r: len(r[2].ids))  # similar lengths share a batch
        for lo in range(0, len(rows), self.batch_size):
            chunk = rows[lo : lo + self.batch_size]
            values = self._batch(body, owns, [j for j, _, _ in chunk], [row for _, _, row in chunk])
            for (j, s, _), vals in zip(chunk, values, strict=True):
                out[j][s] = vals
        return [[v for v in job if v is not None] for job in out]

    def _own_prefix(self, body: Any, explanation: str) -> KV:
        """The explanation's own KV after the shared few-shot prefix (computed once per simulator)."""
        shared, own = self.prompt.prefix_parts(explanation)
        if self._shared is None or self._shared[0] != shared:
            cache = DynamicCache()
            body(input_ids=torch.tensor([shared], device=self.device), cache=cache, use_cache=True)
            self._shared = (shared, [(layer.keys, layer.values) for layer in cache.layers])
        cache = DynamicCache(ddp_cache_data=self._shared[1])  # updates concatenate: the shared tensors stay
        own_pos = torch.arange(len(shared), len(shared) + len(own), device=self.device)[None]
        body(input_ids=torch.tensor([own], device=self.device), position_ids=own_pos, cache=cache, use_cache=True)
        n = len(shared)
        return [(layer.keys[:, :, n:].clone(), layer.values[:, :, n:].clone()) for layer in cache.layers]

    def _prefix_cache(self, owns: Sequence[KV], job_of: list[int]) -> tuple[DynamicCache, torch.Tensor]:
        """Each row's prefix KV (shared + its job's own, padded to the longest own part in the batch)
        and each row's prefix length."""
        assert self._shared is not None
        jobs = sorted(set(job_of))
        n_own = {j: owns[j][0][0].shape[2] for j in jobs}
        width = max(n_own.values())
        pick = torch.tensor([jobs.index(j) for j in job_of], device=self.device)
        b = len(job_of)
        layers = []
        for layer, (shared_k, shared_v) in enumerate(self._shared[1]):
            parts = []
            for shared, index in ((shared_k, 0), (shared_v, 1)):
                own = [owns[j][layer][index] for j in jobs]
                own = [torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[2])) for t in own]
                stacked = torch.cat([shared.expand(len(jobs), -1, -1, -1), torch.cat(own)], dim=2)
                parts.append(stacked.expand(b, -1, -1, -1) if len(jobs) == 1 else stacked[pick])
            layers.append((parts[0], parts[1]))
        n_prefix = torch.tensor([len(self._shared[0]) + n_own[j] for j in job_of])
        return DynamicCache(ddp_cache_data=layers), n_prefix

    def _batch(self, body: Any, owns: Sequence[KV], job_of: list[int], rows: list[_Row]):
        b, width = len(rows), max(len(r.ids) for r in rows)
        cache, n_prefix = self._prefix_cache(owns, job_of)
        ids = torch.zeros((b, width), dtype=torch.long)
        pos = torch.zeros((b, width), dtype=torch.long)
        visible = torch.zeros((b, width, width), dtype=torch.bool)  # query sees key, both after the prefix
        for r, row in enumerate(rows):
            start = int(n_prefix[r])
            n_body = row.branch_of[0] if row.branch_of and row.branch_of[0] is not None else len(row.ids)
            ids[r, : len(row.ids)] = torch.tensor(row.ids)
            pos[r, :n_body] = torch.arange(n_body) + start
            visible[r, :n_body, :n_body] = torch.tril(torch.ones(n_body, n_body, dtype=torch.bool))
            for read, branch in zip(row.reads, row.branch_of, strict=True):
                if branch is not None:
                    pos[r, branch] = start + read + 1
                    visible[r, branch, : read + 1] = True
            visible[r].diagonal().fill_(True)  # branch tokens and padding see themselves
        visible, pos_on, n_prefix = visible.to(self.device), pos.to(self.device), n_prefix.to(self.device)
        full = self._mask(visible, pos_on, n_prefix, window=None)
        mask: Any = full
        if self.sliding:
            windowed = self._mask(visible, pos_on, n_prefix, window=self.sliding)
            mask = {t: (windowed if t == "sliding_attention" else full) for t in self.layer_types}
        hidden = body(
            input_ids=ids.to(self.device),
            position_ids=pos_on,
            attention_mask=mask,
            cache=cache,
            use_cache=True,
        ).last_hidden_state
        # Every slot of the batch read at once, one copy to the host (per-slot reads would each wait on a GPU).
        row_of = torch.tensor([r for r, row in enumerate(rows) for _ in row.reads], device=self.device)
        reads = torch.tensor([i for row in rows for i in row.reads], device=self.device)
        first = self._head(hidden[row_of, reads]).double().cpu().numpy()
        branch = None
        if self.levels.branches:
            at = torch.tensor([i for row in rows for i in row.branch_of], device=self.device)
            branch = self._head(hidden[row_of, at]).double().cpu().numpy()
        values = _expected_levels(first, branch, self.levels)
        return np.split(values, np.cumsum([len(row.reads) for row in rows])[:-1])

    def _mask(
        self, visible: torch.Tensor, pos: torch.Tensor, n_prefix: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        """Additive float mask [B, 1, Lq, P + Lq] (0 = attend) that works with eager and SDPA attention;
        P is the longest prefix, row r's keys from `n_prefix[r]` on are padding."""
        b, width, _ = visible.shape
        prefix_pos = torch.arange(int(n_prefix.max()), device=visible.device)
        prefix_ok = (prefix_pos[None, None, :] < n_prefix[:, None, None]).expand(b, width, -1)
        new_ok = visible.clone()
        if window is not None:
            prefix_ok = prefix_ok & ((pos[:, :, None] - prefix_pos[None, None, :]) < window)
            new_ok &= (pos[:, :, None] - pos[:, None, :]) < window
        allowed = torch.cat([prefix_ok, new_ok], dim=2)
        dtype = self.head_rows.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class NaiveLocalSimulator(_LocalBase):
    """Reference: the whole prompt through the whole model (full head) per sequence, and a separate
    full forward per branch. Slow on purpose; the fast path must reproduce its numbers."""

    @torch.inference_mode()
    def _simulate(self, explanation: str, sequences: Sequence[Sequence[str]]) -> list[np.ndarray]:
        prefix = self.prompt.prefix(explanation)
        rows_t = torch.tensor(self.levels.rows, device=self.device)
        out = []
        for tokens in sequences:
            row = self.prompt.row(tokens)
            n_body = row.branch_of[0] if row.branch_of and row.branch_of[0] is not None else len(row.ids)
            ids = torch.tensor([prefix + row.ids[:n_body]], device=self.device)
            logits = self.lm(input_ids=ids).logits[0]
            values = []
            for read, branch in zip(row.reads, row.branch_of, strict=True):
                first = torch.log_softmax(logits[len(prefix) + read].double(), dim=0)[rows_t]
                second = None
                if branch is not None:
                    b_ids = torch.tensor([prefix + row.ids[: read + 1] + [row.ids[branch]]], device=self.device)
                    second = torch.log_softmax(self.lm(input_ids=b_ids).logits[0, -1].double(), dim=0)[rows_t]
                values.append(_levels_from_logits(first, second, self.levels))
            out.append(np.array(values))
        return out
