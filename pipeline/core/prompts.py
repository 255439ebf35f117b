"""Explainer and simulator prompts, completion-style for base models (the embedded Gemma is one).

The structure follows the paper: few-shot neurons shown as `token<TAB>level` lines between
`<start>`/`<end>`, the explainer's list optionally repeated with zero levels omitted, and the
ending "the main thing this neuron does is find"; the simulator's prompt gives an explanation
and then the text with `unknown` in place of every level. The wording and the few-shot neurons
are our own. Bump a version when its text changes: it is stored beside every result.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

EXPLAIN_VERSION = "explain-v2"
SIMULATE_VERSION = "simulate-v1"
EXPLANATION_ENDING = "the main thing this neuron does is find"
SLOT = "unknown"
MAX_EXPLANATION_CHARS = 300

_HEADER = (
    "We are studying neurons in a language model. A neuron reads a text one token at a time and responds to "
    "some of the tokens. Below, each text is listed one token per line as the token, a tab, and how strongly "
    "the neuron responds to it: a whole number from 0 (not at all) to 10 (its strongest response)."
)
_EXPLAIN_TASK = " After the examples of each neuron comes a short description of what it responds to."
_SIMULATE_TASK = (
    " Each neuron comes with a short description of what it responds to, and from it we predict the numbers."
)


@dataclass(frozen=True)
class FewShotNeuron:
    explanation: str
    records: tuple[tuple[tuple[str, int], ...], ...]


def _rec(text: str) -> tuple[tuple[str, int], ...]:
    """'tok|3 tok tok|10' -> tokens with levels (0 where none is given); '_' stands for a space."""
    out = []
    for item in text.split(" "):
        token, _, level = item.partition("|")
        out.append((token.replace("_", " "), int(level or 0)))
    return tuple(out)


# The explainer's few-shot neurons differ from each other (years, food, negation, weather) and
# from the code and documentation tokens that typical targets fire on, and each explanation names
# its strongest tokens in quotes: what a small model can learn to do for the target in context.
FEW_SHOT = (
    FewShotNeuron(
        'the digits "19" and "20" that begin a year',
        (
            _rec("The _bridge _opened _in _19|10 32|4 _and _closed _in _19|9 87|3 _after _a _storm ."),
            _rec("Records _from _18|7 60|2 _show _that _the _town _grew _quickly ."),
            _rec("She _was _born _on _a _Tuesday _in _April , _20|8 01|3 ."),
        ),
    ),
    FewShotNeuron(
        'cooking words like " soup", " onions" and " flour"',
        (
            _rec("He _chopped|3 _the _onions|9 _and _stirred|4 _them _into _the _soup|10 ."),
            _rec("The _meeting _ran _late , _so _we _skipped _lunch|8 _entirely ."),
            _rec("Add _two _cups _of _flour|9 _and _a _pinch _of _salt|7 _to _the _bowl|2 ."),
        ),
    ),
    FewShotNeuron(
        'the word " not" and other negations such as " never"',
        (
            _rec("It _was _not|10 _what _she _expected , _but _it _never|8 _failed ."),
            _rec("Do _not|10 _open _the _door _unless _you _have _no|6 _choice ."),
        ),
    ),
    FewShotNeuron(
        'weather words, strongest on " rain" and " storm"',
        (
            _rec("After _three _days _of _rain|10 _the _river _rose _and _the _wind|6 _grew ."),
            _rec("A _storm|9 _is _coming , _so _bring _a _coat _and _watch _the _clouds|5 ."),
        ),
    ),
)


# The simulator's few-shot neurons read the same kind of text with different explanations, so that
# the model learns to take its levels from the explanation rather than from the text alone.
SIMULATE_FEW_SHOT = (
    FewShotNeuron(
        "numbers written with digits",
        (_rec("In _1|10 9|10 8|10 7|10 _we _baked _bread _and _1|10 2|10 _pies _for _the _fair ."),),
    ),
    FewShotNeuron(
        "words about food and baking",
        (_rec("In _1 9 8 7 _we _baked|7 _bread|10 _and _1 2 _pies|9 _for _the _fair ."),),
    ),
    FewShotNeuron(
        "words about weather",
        (_rec("After _3 _days _of _rain|10 _the _river _rose , _and _the _wind|8 _broke _2 _trees ."),),
    ),
    FewShotNeuron(
        'the word "the"',
        (_rec("After _3 _days _of _rain _the|10 _river _rose , _and _the|10 _wind _broke _2 _trees ."),),
    ),
)


def format_token(token: str) -> str:
    """Tokens holding tabs or newlines would break the line format: show them escaped."""
    return token.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _record_block(record: Sequence[tuple[str, int]], omit_zeros: bool = False) -> str:
    lines = [f"{format_token(tok)}\t{level}" for tok, level in record if not (omit_zeros and level == 0)]
    return "<start>\n" + "".join(line + "\n" for line in lines) + "<end>\n"


def _explanation_line(n: int, explanation: str | None) -> str:
    line = f"Explanation of neuron {n} behavior: {EXPLANATION_ENDING}"
    return line + (f" {explanation}.\n" if explanation is not None else "")


def _explain_section(n: int, records: Sequence[Sequence[tuple[str, int]]], repeat_nonzero: bool) -> str:
    text = f"\nNeuron {n}\nActivations:\n" + "".join(_record_block(r) for r in records)
    if repeat_nonzero:
        text += "Same activations, with the zeros left out:\n" + "".join(_record_block(r, True) for r in records)
    return text


def explanation_prompt(records: Sequence[Sequence[tuple[str, int]]], repeat_nonzero: bool = True) -> str:
    """Few-shot neurons, then the target's records, ending where the explanation is to be written."""
    text = _HEADER + _EXPLAIN_TASK + "\n"
    for i, shot in enumerate(FEW_SHOT, 1):
        text += _explain_section(i, shot.records, repeat_nonzero) + _explanation_line(i, shot.explanation)
    n = len(FEW_SHOT) + 1
    return text + _explain_section(n, records, repeat_nonzero) + _explanation_line(n, None)


def parse_explanation(completion: str) -> tuple[str | None, str | None]:
    """(explanation, None) or (None, reason): the first line, without a final period."""
    text = completion.strip().split("\n", 1)[0].strip()
    text = text.removesuffix(".").strip()
    if not text:
        return None, "empty explanation"
    if len(text) > MAX_EXPLANATION_CHARS:
        return None, f"explanation longer than {MAX_EXPLANATION_CHARS} characters"
    return text, None


def simulation_prefix_parts(explanation: str) -> tuple[str, str]:
    """(text shared by every explanation, the explanation's own text up to the target's tokens):
    a local simulator computes the first part once for all neurons."""
    text = _HEADER + _SIMULATE_TASK + "\n"
    for i, shot in enumerate(SIMULATE_FEW_SHOT, 1):
        text += f"\nNeuron {i}\n" + _explanation_line(i, shot.explanation) + "Activations:\n"
        text += "".join(_record_block(r) for r in shot.records)
    n = len(SIMULATE_FEW_SHOT) + 1
    text += f"\nNeuron {n}\n" + _explanation_line(n, None)
    return text, f" {explanation}.\nActivations:\n<start>\n"


def simulation_prefix(explanation: str) -> str:
    """Everything before the target's tokens: shared by all of one explanation's sequences."""
    return "".join(simulation_prefix_parts(explanation))


def simulation_pieces(tokens: Sequence[str]) -> list[tuple[str, bool]]:
    """The target's lines as (text, is_slot) pieces; each slot is read for a 0-10 level."""
    pieces: list[tuple[str, bool]] = []
    for tok in tokens:
        pieces += [(format_token(tok), False), ("\t", False), (SLOT, True), ("\n", False)]
    pieces.append(("<end>\n", False))
    return pieces


def simulation_prompt(explanation: str, tokens: Sequence[str]) -> str:
    return simulation_prefix(explanation) + "".join(text for text, _ in simulation_pieces(tokens))


def explainer_few_shot_explanations() -> list[str]:
    """The explanations the explainer prompt shows: what a small explainer copies."""
    return [shot.explanation for shot in FEW_SHOT]


def few_shot_explanations() -> list[str]:
    """Every explanation the prompts show as an example: an explanation repeating one of these
    describes the prompt, not the unit."""
    return [shot.explanation for shot in (*FEW_SHOT, *SIMULATE_FEW_SHOT)]


# -- Chat prompts (system/user/assistant turns) for instruct models and chat-only servers --------------------------
# The same header, few-shot neurons and explanation ending as above; a few-shot neuron's answer is an
# assistant turn, so the model learns the form of its reply from them.

EXPLAIN_CHAT_VERSION = "explain-chat-v1"
SIMULATE_CHAT_VERSION = "simulate-chat-v1"  # expected values from the level tokens' top logprobs
SIMULATE_CHAT_SAMPLED_VERSION = "simulate-chat-sampled-v1"  # the written levels (servers without logprobs)

_EXPLAIN_CHAT_REPLY = (
    " Reply with the description only: a short phrase that completes the sentence"
    f' "{EXPLANATION_ENDING} ...", on one line.'
)
_SIMULATE_CHAT_REPLY = (
    " The user gives a neuron's description and a text, one token per line, each token in double quotes."
    " Reply with the same quoted tokens in the same order, one per line, each followed by a tab and the number"
    " predicted for it, and nothing else."
)


def chat_token(token: str) -> str:
    """A token as a chat simulation line shows it: JSON-quoted, so a token of spaces stays visible."""
    return json.dumps(token, ensure_ascii=False)


def explanation_messages(records: Sequence[Sequence[tuple[str, int]]], repeat_nonzero: bool = True) -> list[dict]:
    """The explainer's few-shot prompt as turns: each neuron's records are a user turn, its
    explanation the assistant's reply; the target's records are the last user turn."""
    messages = [{"role": "system", "content": _HEADER + _EXPLAIN_TASK + _EXPLAIN_CHAT_REPLY}]
    for i, shot in enumerate(FEW_SHOT, 1):
        user = _explain_section(i, shot.records, repeat_nonzero).lstrip("\n") + _explanation_line(i, None)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": f"{shot.explanation}."}]
    n = len(FEW_SHOT) + 1
    user = _explain_section(n, records, repeat_nonzero).lstrip("\n") + _explanation_line(n, None)
    return messages + [{"role": "user", "content": user}]


def parse_chat_explanation(reply: str) -> tuple[str | None, str | None]:
    """Like `parse_explanation`, from the reply's first non-empty line, tolerating a model that
    repeats the prompt's sentence ("Explanation of neuron 3 behavior: the main thing ... find")."""
    line = next((ln.strip() for ln in reply.splitlines() if ln.strip()), "")
    if line.lower().startswith("explanation of neuron") and ":" in line:
        line = line.split(":", 1)[1].strip()
    if line.lower().startswith(EXPLANATION_ENDING):
        line = line[len(EXPLANATION_ENDING) :].strip()
    return parse_explanation(line)


def _chat_tokens_turn(explanation: str, tokens: Sequence[str]) -> str:
    lines = "".join(chat_token(tok) + "\n" for tok in tokens)
    return f"Explanation of the neuron's behavior: {EXPLANATION_ENDING} {explanation}.\nText:\n{lines}"


def chat_simulation_messages(explanation: str, tokens: Sequence[str]) -> list[dict]:
    """The simulator's few-shot prompt as turns; the reply is to be one `token<TAB>level` line per token."""
    messages = [{"role": "system", "content": _HEADER + _SIMULATE_TASK + _SIMULATE_CHAT_REPLY}]
    for shot in SIMULATE_FEW_SHOT:
        for record in shot.records:
            answer = "".join(f"{chat_token(tok)}\t{level}\n" for tok, level in record)
            messages += [
                {"role": "user", "content": _chat_tokens_turn(shot.explanation, [tok for tok, _ in record])},
                {"role": "assistant", "content": answer},
            ]
    return messages + [{"role": "user", "content": _chat_tokens_turn(explanation, tokens)}]


def chat_simulation_retry(messages: Sequence[dict], reply: str, problem: str, n_tokens: int) -> list[dict]:
    """The conversation asked once more after a reply whose lines do not match the tokens."""
    ask = (
        f"That reply does not match the text ({problem}). Write exactly {n_tokens} lines, one for each token of"
        " the text in order: the token, a tab, and a whole number from 0 to 10."
    )
    return [*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": ask}]
