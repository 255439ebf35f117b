"""What an LLM stage spent, for its materialization page (requests, tokens, cache hits)."""

from __future__ import annotations

from pipeline.core.llm import Usage


def usage_metadata(usage: Usage, before: dict[str, int], prefix: str) -> dict[str, int]:
    """`{prefix}_requests`, `_prompt_tokens`, `_completion_tokens`, `_cache_hits` spent since `before`
    (a `usage.snapshot()` taken when the stage began): the client may be shared with other steps."""
    return {f"{prefix}_{name}": value for name, value in usage.since(before).items()}
