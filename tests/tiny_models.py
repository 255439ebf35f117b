"""Tiny subject models whose neurons are set by hand, for known-answer tests.

The digit model is a 2-layer GPT-2 with attention and layer-0 MLP output zeroed, so every
layer's MLP sees LayerNorm(token embedding) exactly. Embeddings are built with zero mean and
unit variance, so LayerNorm leaves them unchanged, and neuron DIGIT_NEURON of layer 0 reads
coordinate 0: +s_d (s_d grows with the digit) for digits and -1 for every other token.

The signed model is a 2-layer Llama (a gated MLP: silu(gate) * up) built the same way: attention
and the layer-0 MLP output are zeroed and embeddings have unit RMS, so every layer's MLP sees the
token embedding (RMSNorm leaves it unchanged). In both layers neuron SIGNED_NEURON has a constant
gate (bias GATE_BIAS, no weights) and an `up` that reads coordinate 0 = signed_strength(token):
positive and growing with the digit on digits, negative and growing in size along NEG_WORDS on
those words, and exactly 0 on every other token. Its activation is silu(GATE_BIAS) * UP_GAIN * s:
the same float wherever a token occurs, so equal tokens make exact ties.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

DIGITS = [str(d) for d in range(10)]
WORDS = (
    "the a of and to in is was for on that with as by at from it this be are or an his her they "
    "which one all were we when there can more if no out so said what up its about into than them"
).split()
DIGIT_NEURON = 3
GAIN = 5.0


def digit_strength(digit: int) -> float:
    """Coordinate-0 value for a digit: distinct per digit so the top records have no ties."""
    return 0.6 + 0.07 * digit


def build_tokenizer(extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Word-level; with extra words (which may hold punctuation, e.g. HTML) it splits on whitespace only."""
    vocab = {tok: i for i, tok in enumerate(["[UNK]", "<eos>", *WORDS, *DIGITS, *extra_words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit() if extra_words else pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>")


def build_digit_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=8, n_head=2, n_layer=2, n_inner=16)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
        for block in model.transformer.h:
            block.attn.c_attn.weight.zero_()
            block.attn.c_attn.bias.zero_()
            block.attn.c_proj.weight.zero_()
            block.attn.c_proj.bias.zero_()
        model.transformer.h[0].mlp.c_proj.weight.zero_()
        model.transformer.h[0].mlp.c_proj.bias.zero_()
        gen = torch.Generator().manual_seed(seed)
        # By id: get_vocab()'s order differs between processes, and the model must not.
        for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            s = digit_strength(int(token)) if token in DIGITS else -1.0
            u = float(torch.rand((), generator=gen)) * 1.2 - 0.6
            r, w = math.sqrt(2 - s * s), math.sqrt(2 - u * u)
            model.transformer.wte.weight[idx] = torch.tensor([s, -s, r, -r, u, -u, w, -w])
        fc = model.transformer.h[0].mlp.c_fc  # Conv1D: weight [n_embd, n_inner]
        fc.weight[:, DIGIT_NEURON] = 0.0
        fc.weight[0, DIGIT_NEURON] = GAIN
        fc.bias[DIGIT_NEURON] = 0.0
    return model


def digit_activation(token: str) -> float:
    """The exact activation the digit neuron must show on a token (GELU of GAIN * s)."""
    s = digit_strength(int(token)) if token in DIGITS else -1.0
    return float(torch.nn.functional.gelu(torch.tensor(GAIN * s), approximate="tanh"))


def write_digit_model(directory: Path, extra_words: tuple[str, ...] = ()) -> Path:
    tokenizer = build_tokenizer(extra_words)
    model = build_digit_model(tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_digit_corpus(path: Path, n_docs: int = 60, seed: int = 1, extra_words: tuple[str, ...] = ()) -> Path:
    """JSONL documents of common words; half of them also hold digits (about 30% of their tokens)."""
    rng = random.Random(seed)
    vocabulary = WORDS + list(extra_words)
    docs = []
    for _ in range(n_docs):
        p_digit = 0.3 if rng.random() < 0.5 else 0.0
        words = [
            rng.choice(DIGITS) if rng.random() < p_digit else rng.choice(vocabulary) for _ in range(rng.randint(20, 60))
        ]
        docs.append(" ".join(words))
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return path


# ---------------------------------------------------------------- several planted neurons

# Each planted neuron of the sets model fires on exactly one set of tokens (and nowhere else), so
# every unit has a known right explanation and every other unit's explanation is known wrong.
TOKEN_SETS = {
    0: ("1", "2", "3", "4"),
    1: ("the", "a", "an"),
    2: ("of", "to", "in", "into"),
    3: ("and", "or", "but"),
    4: ("was", "were", "is", "are", "be"),
    5: ("his", "her", "they", "them", "we"),
}
SET_GAIN = 4.0


def build_sets_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 whose layer-0 MLP sees LayerNorm(token embedding) exactly (attention, position
    embeddings and the layer-0 output zeroed). Embedding pairs (f_i, -f_i) with f_i = +1 for tokens of
    set i and -1 otherwise keep every embedding at zero mean and unit variance, so LayerNorm leaves
    it unchanged; neuron i reads coordinate 2i: GELU(SET_GAIN) on its set, GELU(-SET_GAIN) ~ 0 elsewhere."""
    torch.manual_seed(seed)
    n_sets = len(TOKEN_SETS)
    n_embd = 2 * n_sets + 4
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=n_embd, n_head=2, n_layer=2, n_inner=16)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
        for block in model.transformer.h:
            for p in (
                block.attn.c_attn.weight,
                block.attn.c_attn.bias,
                block.attn.c_proj.weight,
                block.attn.c_proj.bias,
            ):
                p.zero_()
        model.transformer.h[0].mlp.c_proj.weight.zero_()
        model.transformer.h[0].mlp.c_proj.bias.zero_()
        # Each embedding: n_sets (f, -f) pairs, then (r, -r, u, -u) with r² + u² = n_embd/2 - n_sets.
        rest = n_embd / 2 - n_sets
        gen = torch.Generator().manual_seed(seed)
        for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            features = []
            for i in range(n_sets):
                f = 1.0 if token in TOKEN_SETS[i] else -1.0
                features += [f, -f]
            u = float(torch.rand((), generator=gen)) * math.sqrt(rest)
            r = math.sqrt(rest - u * u)
            model.transformer.wte.weight[idx] = torch.tensor(features + [r, -r, u, -u])
        fc = model.transformer.h[0].mlp.c_fc  # Conv1D: weight [n_embd, n_inner]
        for i in range(n_sets):
            fc.weight[:, i] = 0.0
            fc.weight[2 * i, i] = SET_GAIN
            fc.bias[i] = 0.0
    return model


def set_activation(neuron: int, token: str) -> float:
    """The exact activation planted neuron `neuron` of the sets model shows on a token."""
    f = 1.0 if token in TOKEN_SETS[neuron] else -1.0
    return float(torch.nn.functional.gelu(torch.tensor(SET_GAIN * f), approximate="tanh"))


def write_sets_model(directory: Path) -> Path:
    tokenizer = build_tokenizer(("but",))
    model = build_sets_model(tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


NEG_WORDS = ("never", "none", "nothing", "nobody", "nowhere", "neither", "cannot", "without", "against", "lacking")
SIGNED_NEURON = 5
GATE_BIAS, UP_GAIN = 4.0, 3.0


def signed_strength(token: str) -> float:
    """Coordinate 0 of a token's embedding in the signed model: distinct per digit and per NEG_WORDS word."""
    if token in DIGITS:
        return 0.6 + 0.07 * int(token)
    if token in NEG_WORDS:
        return -(0.6 + 0.07 * NEG_WORDS.index(token))
    return 0.0


def signed_activation(token: str) -> float:
    """The exact activation SIGNED_NEURON must show on a token, in either layer: silu(gate) * up."""
    silu = GATE_BIAS / (1.0 + math.exp(-GATE_BIAS))
    return silu * UP_GAIN * signed_strength(token)


def build_signed_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(NEG_WORDS)


def build_signed_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        mlp_bias=True,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
            mlp = layer.mlp
            mlp.gate_proj.weight[SIGNED_NEURON] = 0.0
            mlp.gate_proj.bias[SIGNED_NEURON] = GATE_BIAS
            mlp.up_proj.weight[SIGNED_NEURON] = 0.0
            mlp.up_proj.weight[SIGNED_NEURON, 0] = UP_GAIN
            mlp.up_proj.bias[SIGNED_NEURON] = 0.0
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.bias.zero_()
        gen = torch.Generator().manual_seed(seed)
        # By id: get_vocab()'s order differs between processes, and the model must not.
        for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            s = signed_strength(token)
            u = float(torch.rand((), generator=gen)) * 1.2 - 0.6
            r, w = math.sqrt(2 - s * s), math.sqrt(2 - u * u)
            model.model.embed_tokens.weight[idx] = torch.tensor([s, -s, r, -r, u, -u, w, -w])
    return model


def write_signed_model(directory: Path) -> Path:
    tokenizer = build_signed_tokenizer()
    build_signed_model(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_sets_corpus(path: Path, n_docs: int = 60, seed: int = 2) -> Path:
    """JSONL documents where every set's tokens appear, each document leaning on a few of the sets."""
    rng = random.Random(seed)
    vocabulary = WORDS + ["but"]
    docs = []
    for _ in range(n_docs):
        favoured = rng.sample(sorted(TOKEN_SETS), 2)
        words = []
        for _ in range(rng.randint(24, 60)):
            if rng.random() < 0.3:
                words.append(rng.choice(TOKEN_SETS[rng.choice(favoured)]))
            else:
                words.append(rng.choice(vocabulary))
        docs.append(" ".join(words))
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return path


def signed_documents(n_docs: int = 60, seed: int = 1) -> list[str]:
    """Documents of common words; about a third also hold digits, a third NEG_WORDS, a sixth both."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        p_digit = 0.25 if rng.random() < 0.5 else 0.0
        p_neg = 0.25 if rng.random() < 0.5 else 0.0
        words = []
        for _ in range(rng.randint(20, 60)):
            x = rng.random()
            if x < p_digit:
                words.append(rng.choice(DIGITS))
            elif x < p_digit + p_neg:
                words.append(rng.choice(NEG_WORDS))
            else:
                words.append(rng.choice(WORDS))
        docs.append(" ".join(words))
    return docs


def write_signed_corpus(path: Path, n_docs: int = 60, seed: int = 1) -> Path:
    path.write_text("\n".join(json.dumps({"text": d}) for d in signed_documents(n_docs, seed)))
    return path


# ---------------------------------------------------------------- random tiny Gemma 3


def tiny_gemma(
    vocab_size: int,
    seed: int,
    sliding_window: int = 24,
    layer_types: tuple[str, ...] = ("sliding_attention", "full_attention", "sliding_attention"),
    max_position_embeddings: int = 4096,
    initializer_range: float = 0.02,
) -> Gemma3ForCausalLM:
    """A random Gemma 3 small enough for CPU tests, with sliding-window and full-attention layers
    (one layer per entry of `layer_types`); nothing in it is set by hand."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=len(layer_types),
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=sliding_window,
        layer_types=list(layer_types),
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
    )
    return Gemma3ForCausalLM(config).eval()
