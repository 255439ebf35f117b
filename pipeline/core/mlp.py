"""Where a model's MLP neurons are, and capturing them with forward pre-hooks.

A neuron is one coordinate of the input of the MLP's output projection: post-GELU for GPT-2
(`c_proj`), `act(gate) * up` for gated MLPs (`down_proj`), and the same slot in GPT-NeoX
(`dense_4h_to_h`), and `fc2` in Phi-style MLPs and OPT blocks (which hold fc1/fc2 directly).
Mixture-of-experts MLPs are not supported: they get a clear error.

Gated MLPs (`act(gate) * up`) fire both ways, since `up` is signed; ReLU/GELU MLPs are almost
never negative. `mlp_is_gated` tells which kind a model has, so capture can default the negative
direction on or off.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import AtlasInputError

_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_OUT_PROJ_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "fc_out")
# The gate of a gated MLP: Llama/Gemma/Qwen/Mistral `gate_proj`, Phi-3's fused `gate_up_proj`, and
# `w3` beside `w1`/`w2` in the original Llama/Mixtral naming.
_GATE_NAMES = ("gate_proj", "gate_up_proj", "w3")


def _decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks: the longest ModuleList whose items contain an MLP."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if any(hasattr(module[0], name) for name in _MLP_NAMES + _OUT_PROJ_NAMES):
                if best is None or len(module) > len(best):
                    best = module
    if best is None:
        raise AtlasInputError(
            f"{type(model).__name__} has no list of transformer blocks with an MLP "
            f"(looked for a block attribute named one of {', '.join(_MLP_NAMES)})"
        )
    return best


def _mlp_and_out_projection(block: nn.Module, index: int) -> tuple[nn.Module, nn.Module]:
    """The module that holds the MLP's output projection, and that projection."""
    # OPT-style blocks hold fc1/fc2 directly, with no MLP submodule.
    for mlp in [*(getattr(block, name, None) for name in _MLP_NAMES), block]:
        if mlp is None:
            continue
        for proj_name in _OUT_PROJ_NAMES:
            proj = getattr(mlp, proj_name, None)
            if isinstance(proj, nn.Module) and getattr(proj, "weight", None) is not None:
                return mlp, proj
    raise AtlasInputError(
        f"block {index} ({type(block).__name__}) has no MLP of a known shape: expected an output "
        f"projection named one of {', '.join(_OUT_PROJ_NAMES)}"
    )


def mlp_projections(model: nn.Module) -> list[nn.Module]:
    """The MLP output projection of every layer, in layer order."""
    return [_mlp_and_out_projection(block, i)[1] for i, block in enumerate(_decoder_blocks(model))]


def mlp_is_gated(model: nn.Module) -> bool:
    """Whether the MLPs are gated (`act(gate) * up`, whose neurons are signed) rather than a plain
    activation of one projection (ReLU/GELU: GPT-2, OPT, GPT-NeoX, Phi-2). Every block must agree."""
    kinds = {
        any(isinstance(getattr(mlp, name, None), nn.Module) for name in _GATE_NAMES)
        for mlp, _ in (_mlp_and_out_projection(block, i) for i, block in enumerate(_decoder_blocks(model)))
    }
    return kinds == {True}


def neuron_count(projection: nn.Module) -> int:
    """Width of the projection's input (GPT-2's Conv1D stores its weight transposed)."""
    weight = projection.weight
    return int(weight.shape[0] if type(projection).__name__ == "Conv1D" else weight.shape[1])


def check_layers(model: nn.Module, layers: Sequence[int]) -> list[int]:
    n = len(mlp_projections(model))
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad:
        raise AtlasInputError(f"layer {bad[0]} is out of range: the model has {n} layers (0..{n - 1})")
    if not layers:
        raise AtlasInputError("no layers selected")
    return sorted(set(layers))


class _StopForward(Exception):
    """Raised from a hook once the last requested layer is captured: later layers never run."""


@contextmanager
def mlp_capture(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Hooks that store each requested layer's neuron activations in the yielded dict.

    Use `run_until_captured` to run the model: it stops after the deepest requested layer.
    """
    layers = check_layers(model, layers)
    projections = mlp_projections(model)
    store: dict[int, torch.Tensor] = {}
    last = layers[-1]
    handles = []

    def make_hook(layer: int) -> Any:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            store[layer] = args[0].detach()
            if layer == last:
                raise _StopForward

        return hook

    try:
        for layer in layers:
            handles.append(projections[layer].register_forward_pre_hook(make_hook(layer)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def run_until_captured(model: nn.Module, input_ids: torch.Tensor, **kwargs: Any) -> None:
    """Forward pass that ends as soon as the capture hooks have what they need."""
    try:
        model(input_ids=input_ids, use_cache=False, **kwargs)
    except _StopForward:
        return
    raise RuntimeError("the forward pass finished without reaching the hooked layer")
