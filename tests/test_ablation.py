"""Ablation on a tiny hand-set GPT-2 whose digit neuron feeds the output: the exact activations as
replacement leave the model unchanged (KL 0, score 1), the mean moves it (KL > 0); skipping the
layers before the ablated one and batching neurons give the plain forward's numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import DIGIT_NEURON, build_digit_model, build_tokenizer

from pipeline.core.ablation import LayerAblator, Row, ablate_neurons, ablation_score
from pipeline.core.mlp import mlp_capture, mlp_projections, run_until_captured
from pipeline.core.scoring import fit_calibration

TEXTS = ["the 3 of 7 and 9", "was 1 2 in the 8", "they were at it no so", "5 5 5 for 0 and"]  # equal lengths


@pytest.fixture(scope="module")
def model_and_ids():
    tokenizer = build_tokenizer()
    model = build_digit_model(tokenizer)
    with torch.no_grad():  # let the digit neuron (and every layer-1 neuron) write into the residual
        gen = torch.Generator().manual_seed(3)
        model.transformer.h[0].mlp.c_proj.weight[DIGIT_NEURON] = 5 * torch.randn(8, generator=gen)
        model.transformer.h[1].mlp.c_proj.weight.mul_(50)
        model.transformer.h[1].mlp.c_proj.weight[5] += 20 * torch.randn(8, generator=gen)
    ids = [np.array(tokenizer(t).input_ids) for t in TEXTS]
    return model, ids


def true_acts(model, layer: int, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad(), mlp_capture(model, [layer]) as store:
        run_until_captured(model, torch.tensor(ids)[None])
    return store[layer][0].numpy()


def plain_kl(model, layer: int, ids: np.ndarray, neuron: int, values: np.ndarray) -> float:
    """Reference: full forward with a replacing hook and nothing reused."""

    def hook(_m, args):
        x = args[0].clone()
        x[0, :, neuron] = torch.tensor(values, dtype=x.dtype)
        return (x,)

    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=torch.tensor(ids)[None]).logits[0], -1)
        handle = mlp_projections(model)[layer].register_forward_pre_hook(hook)
        try:
            q = torch.log_softmax(model(input_ids=torch.tensor(ids)[None]).logits[0], -1)
        finally:
            handle.remove()
    return float((p.exp() * (p - q)).sum(-1).sum())


@pytest.mark.parametrize("layer, neuron", [(0, DIGIT_NEURON), (1, 5)])
def test_true_activations_give_kl_zero_and_mean_gives_kl_above_zero(model_and_ids, layer: int, neuron: int) -> None:
    model, ids = model_and_ids
    acts = [true_acts(model, layer, s)[:, neuron] for s in ids]
    mean = float(np.concatenate(acts).mean())
    result = ablate_neurons(
        LayerAblator(model, layer),
        dict(enumerate(ids)),
        prefix=[],
        replacements={
            (neuron, "+"): {
                "mean": {i: np.full_like(a, mean) for i, a in enumerate(acts)},
                "simulated": dict(enumerate(acts)),
            }
        },
    )[(neuron, "+")]
    assert result.kl_simulated == pytest.approx(0.0, abs=1e-7)
    assert result.kl_mean > 1e-4
    assert result.ablation_score == pytest.approx(1.0, abs=1e-4)
    assert result.loss_simulated == pytest.approx(result.loss_unablated, abs=1e-5)
    assert result.loss_mean != pytest.approx(result.loss_unablated, abs=1e-6)


def test_skipping_earlier_layers_and_batching_neurons_match_plain_forwards(model_and_ids) -> None:
    model, ids = model_and_ids
    layer = 1
    rng = np.random.default_rng(0)
    rows = [
        Row(s, n, rng.normal(size=len(ids[s])).astype(np.float32)) for s, n in [(0, 5), (2, 2), (0, 5), (3, 11), (1, 0)]
    ]
    ablator = LayerAblator(model, layer, batch_size=2)  # sequences in 2 groups, rows in short chunks
    effects = ablator.run(torch.tensor(np.stack(ids)), 0, rows)
    assert effects.kl.min() > 1e-3  # every replacement really moves the output
    for row, got in zip(rows, effects.kl, strict=True):
        assert got == pytest.approx(plain_kl(model, layer, ids[row.seq], row.neuron, row.values), rel=1e-3, abs=1e-6)
    # the model is left intact
    assert all(type(b).__name__ == "GPT2Block" for b in model.transformer.h)


def test_calibration_recovers_a_known_linear_relation() -> None:
    levels = [np.array([0.0, 2.0, 5.0]), np.array([10.0, 1.0])]
    acts = [2.5 * lv - 0.75 for lv in levels]
    cal = fit_calibration(levels, acts)
    assert (cal.slope, cal.intercept, cal.r) == (pytest.approx(2.5), pytest.approx(-0.75), pytest.approx(1.0))
    np.testing.assert_allclose(cal.apply(np.array([4.0])), [9.25])
    flat = fit_calibration([np.array([3.0, 3.0])], [np.array([1.0, 2.0])])
    assert (flat.slope, flat.intercept) == (0.0, 1.5) and flat.reason


def test_ablation_score_is_undefined_when_the_mean_does_not_move_the_output() -> None:
    assert ablation_score(0.25, 1.0) == (0.75, None)
    score, reason = ablation_score(0.0, 0.0)
    assert score is None and "~0" in reason
