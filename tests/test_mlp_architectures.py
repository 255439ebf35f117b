"""The neuron finder and capture hooks on tiny random models of every supported MLP family.

A neuron is one coordinate of the input of the MLP's output projection. These tests recompute that
input by hand from the MLP's own submodules, so a capture hooked on the wrong module (or a model
family whose MLP changed shape) shows up as a mismatch rather than as a silently wrong atlas.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from pipeline.core.errors import AtlasInputError
from pipeline.core.mlp import check_layers, mlp_capture, mlp_is_gated, mlp_projections, neuron_count, run_until_captured

N_LAYERS, HIDDEN, INTERMEDIATE, VOCAB = 3, 32, 64, 128


def _gated(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


@dataclass(frozen=True)
class Arch:
    """How to build one tiny model family, and where its parts are, written out by hand per family."""

    build: Callable[[], nn.Module]
    blocks: Callable[[nn.Module], nn.ModuleList]
    final_norm: Callable[[nn.Module], nn.Module]
    neurons: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (mlp, mlp input) -> neuron activations
    out_proj: Callable[[nn.Module], nn.Module]


def _gpt2() -> nn.Module:
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_positions=64,
            n_embd=HIDDEN,
            n_layer=N_LAYERS,
            n_head=4,
            n_inner=INTERMEDIATE,
        )
    )


def _llama() -> nn.Module:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )


def _gemma3() -> nn.Module:
    return Gemma3ForCausalLM(
        Gemma3TextConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=64,
            sliding_window=4,
        )
    )


def _qwen2() -> nn.Module:
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )


def _neox() -> nn.Module:
    return GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    )


ARCHS = {
    "gpt2": Arch(
        _gpt2,
        lambda m: m.transformer.h,
        lambda m: m.transformer.ln_f,
        lambda mlp, x: mlp.act(mlp.c_fc(x)),
        lambda mlp: mlp.c_proj,
    ),
    "llama": Arch(_llama, lambda m: m.model.layers, lambda m: m.model.norm, _gated, lambda mlp: mlp.down_proj),
    "gemma3": Arch(_gemma3, lambda m: m.model.layers, lambda m: m.model.norm, _gated, lambda mlp: mlp.down_proj),
    "qwen2": Arch(_qwen2, lambda m: m.model.layers, lambda m: m.model.norm, _gated, lambda mlp: mlp.down_proj),
    "gpt_neox": Arch(
        _neox,
        lambda m: m.gpt_neox.layers,
        lambda m: m.gpt_neox.final_layer_norm,
        lambda mlp, x: mlp.act(mlp.dense_h_to_4h(x)),
        lambda mlp: mlp.dense_4h_to_h,
    ),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request: pytest.FixtureRequest) -> tuple[Arch, nn.Module]:
    spec = ARCHS[request.param]
    torch.manual_seed(0)
    return spec, spec.build().eval()


def _input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def _capture(model: nn.Module, layers: list[int], input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    with torch.no_grad(), mlp_capture(model, layers) as store:
        run_until_captured(model, input_ids)
    return dict(store)


def _count_calls(modules: dict[str, nn.Module]) -> tuple[dict[str, int], list[Any]]:
    """Pre-hooks counting how often each module is entered; returns the counts and the handles."""
    counts = dict.fromkeys(modules, 0)
    handles = []
    for name, module in modules.items():

        def hook(_m: nn.Module, _args: Any, name: str = name) -> None:
            counts[name] += 1

        handles.append(module.register_forward_pre_hook(hook))
    return counts, handles


def test_one_projection_per_layer_with_intermediate_width(arch: tuple[Arch, nn.Module]) -> None:
    """The finder must land on the MLP output projection of every block, not e.g. attention's c_proj."""
    spec, model = arch
    projections = mlp_projections(model)
    assert len(projections) == N_LAYERS
    for block, proj in zip(spec.blocks(model), projections, strict=True):
        assert proj is spec.out_proj(block.mlp)
        assert neuron_count(proj) == INTERMEDIATE


GATED = {"gpt2": False, "llama": True, "gemma3": True, "qwen2": True, "gpt_neox": False}


@pytest.mark.parametrize("name", list(ARCHS))
def test_gated_mlps_are_told_apart(name: str) -> None:
    """act(gate) * up (signed neurons) vs one activated projection (ReLU/GELU): it sets the default
    for capturing the negative direction."""
    torch.manual_seed(0)
    assert mlp_is_gated(ARCHS[name].build()) is GATED[name]


def test_capture_equals_hand_computed_neurons(arch: tuple[Arch, nn.Module]) -> None:
    """Captured activations are exactly what the MLP's own submodules give on the MLP's input."""
    spec, model = arch
    input_ids = _input_ids()
    mlp_in: dict[int, torch.Tensor] = {}
    mlp_out: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(spec.blocks(model)):

        def hook(_m: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor, i: int = i) -> None:
            mlp_in[i] = (args[0] if args else kwargs["hidden_states"]).detach()
            mlp_out[i] = out.detach()

        handles.append(block.mlp.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()

    with torch.no_grad():
        for layer in range(N_LAYERS):
            mlp = spec.blocks(model)[layer].mlp
            expected = spec.neurons(mlp, mlp_in[layer])
            # The hand formula is the whole MLP: projecting it gives the MLP's real output.
            torch.testing.assert_close(spec.out_proj(mlp)(expected), mlp_out[layer])
            captured = _capture(model, [layer], input_ids)
            assert set(captured) == {layer}
            assert captured[layer].shape == (2, 7, INTERMEDIATE)
            torch.testing.assert_close(captured[layer], expected)


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_single_layer_capture_stops_after_that_layer(arch: tuple[Arch, nn.Module], layer: int) -> None:
    """Capturing layer L must not pay for later layers, the final norm or the (large) unembedding."""
    spec, model = arch
    blocks = spec.blocks(model)
    watched = {f"block{i}": b for i, b in enumerate(blocks)}
    watched |= {"final_norm": spec.final_norm(model), "lm_head": model.get_output_embeddings()}
    counts, handles = _count_calls(watched)
    try:
        _capture(model, [layer], _input_ids())
    finally:
        for h in handles:
            h.remove()
    assert counts == {
        **{f"block{i}": int(i <= layer) for i in range(N_LAYERS)},
        "final_norm": 0,
        "lm_head": 0,
    }


def test_multi_layer_capture_is_one_pass_and_matches_single_captures(arch: tuple[Arch, nn.Module]) -> None:
    """Several layers come from one forward pass (no re-run per layer) with the same values as one at a time."""
    spec, model = arch
    input_ids = _input_ids()
    blocks = spec.blocks(model)
    completed = {"block0": 0}
    handle = blocks[0].register_forward_hook(lambda *_: completed.__setitem__("block0", completed["block0"] + 1))
    counts, handles = _count_calls({f"block{i}": b for i, b in enumerate(blocks)})
    try:
        with torch.no_grad(), mlp_capture(model, [2, 0]) as store:
            for forward in range(1, 3):
                store.clear()
                run_until_captured(model, input_ids)
                assert set(store) == {0, 2}
                assert completed["block0"] == forward
                assert counts == {f"block{i}": forward for i in range(N_LAYERS)}
            together = dict(store)
    finally:
        handle.remove()
        for h in handles:
            h.remove()
    for layer in (0, 2):
        torch.testing.assert_close(together[layer], _capture(model, [layer], input_ids)[layer], rtol=0, atol=0)


def test_hooks_are_removed_after_capture(arch: tuple[Arch, nn.Module]) -> None:
    """A capture must leave the model as it found it: later plain forward passes run to the logits."""
    _spec, model = arch
    _capture(model, [0, 1], _input_ids())
    assert all(not p._forward_pre_hooks for p in mlp_projections(model))
    with torch.no_grad():
        logits = model(input_ids=_input_ids(), use_cache=False).logits
    assert logits.shape == (2, 7, VOCAB)
    with pytest.raises(RuntimeError, match="without reaching the hooked layer"), torch.no_grad():
        run_until_captured(model, _input_ids())


def test_capture_rejects_bad_layers_before_hooking(arch: tuple[Arch, nn.Module]) -> None:
    """Out-of-range or empty layer lists fail up front, with no hook left behind."""
    _spec, model = arch
    assert check_layers(model, [2, 0, 2]) == [0, 2]
    for layers, message in (([N_LAYERS], f"has {N_LAYERS} layers"), ([-1], "out of range"), ([], "no layers")):
        with pytest.raises(AtlasInputError, match=message), mlp_capture(model, layers):
            pass
    assert all(not p._forward_pre_hooks for p in mlp_projections(model))


class _OddMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.widen, self.narrow = nn.Linear(4, 8), nn.Linear(8, 4)


class _OddBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = _OddMLP()


class _OddModel(nn.Module):
    """Blocks with an `mlp` whose Linear layers have names the finder does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_OddBlock(), _OddBlock()])


class _NoBlocksModel(nn.Module):
    """No ModuleList at all, just a stack of layers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))


class _BlocksWithoutMLP(nn.Module):
    """A ModuleList whose items have no attribute named like an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_OddModel(), r"block 0 \(_OddBlock\) has no MLP of a known shape.*down_proj"),
        (_NoBlocksModel(), r"_NoBlocksModel has no list of transformer blocks with an MLP"),
        (_BlocksWithoutMLP(), r"_BlocksWithoutMLP has no list of transformer blocks with an MLP"),
    ],
    ids=["odd-names", "no-modulelist", "no-mlp-attr"],
)
def test_unknown_mlp_shape_is_a_clear_input_error(model: nn.Module, message: str) -> None:
    """An unsupported architecture must be refused with a message, not captured from the wrong module."""
    with pytest.raises(AtlasInputError, match=message):
        mlp_projections(model)
    with pytest.raises(AtlasInputError, match=message):
        check_layers(model, [0])
    with pytest.raises(AtlasInputError, match=message), mlp_capture(model, [0]):
        pass


def test_opt_blocks_without_an_mlp_module_are_captured_per_token() -> None:
    """OPT holds fc1/fc2 on the block and flattens batch x sequence before them: records must still
    come out as [sequence, token] activations equal to relu(fc1(norm(x)))."""
    from transformers import OPTConfig, OPTForCausalLM

    from pipeline.core.models import ModelIdentity, SubjectModel
    from pipeline.core.records import SamplingSpec, collect_activation_records

    torch.manual_seed(0)
    model = OPTForCausalLM(
        OPTConfig(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=2,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        )
    ).eval()
    ids = torch.randint(4, 128, (6, 9))
    block = model.model.decoder.layers[1]
    seen: list[torch.Tensor] = []
    handle = block.fc2.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    expected = seen[0].reshape(6, 9, 64)
    subject = SubjectModel(model=model, tokenizer=None, identity=ModelIdentity("opt", "0"), path=Path("."))
    assert not mlp_is_gated(model)
    rec = collect_activation_records(subject, ids.numpy(), [1], SamplingSpec(top_k=2, random_k=2, batch_size=4))[1]
    assert not rec.negative_captured and rec.bottom.ids.shape == (64, 0)
    for neuron in (0, 17):
        for seq_id, acts in zip(rec.top.ids[neuron], rec.top.acts[neuron], strict=True):
            torch.testing.assert_close(torch.from_numpy(acts), expected[seq_id, :, neuron])
