"""Synthetic arithmetic reasoning tasks: word problems with a step-by-step chain of thought.

Every sample is a chat in the `messages` format used everywhere in the framework::

    {"id": "...", "messages": [{"role": "user", "content": "..."},
                               {"role": "assistant", "reasoning_content": "...", "content": "\\boxed{68}"}],
     "answer": "68", "difficulty": {...}, "filler_sentences": [...]}

Knobs:
- difficulty: ``digits`` (operand size) and ``num_ops`` (operations chained in one problem);
- verbosity: how much redundant reasoning (sentences drawn from FILLER_SENTENCES). ``filler_style="step"``:
  a filler after each reasoning step with probability ``verbosity``; ``"response"``: with probability
  ``verbosity`` the whole response is verbose (a filler after every step), else it has none (two styles, as
  an overthinking model's verbose and concise answers); ``fillers_per_step`` sentences at each verbose step
  (drawn with replacement). The generator records which sentences it inserted
  so that length rewards can be tested with exact significance labels;
- ``turns``: several questions in one chat (multi-turn reasoning data).

Addition and subtraction are worked digit by digit with carries/borrows, which a tiny model can learn; the
operations list can be restricted (``ops=("+",)`` for the 2-digit addition held-out set).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Sentences that carry no information for the computation. Length rewards (Bingo) treat them as insignificant.
FILLER_SENTENCES = (
    "Let me double-check this step.",
    "Hmm, that seems right.",
    "I should be careful here.",
    "Okay, moving on.",
    "Let me think about this again.",
    "Yes, this is correct.",
)

_NAMES = ("Ann", "Ben", "Cal", "Dee", "Eva", "Fin", "Gus", "Ivy")
_ITEMS = ("apples", "books", "coins", "pens", "cards", "shells")


@dataclass(frozen=True)
class ArithmeticSpec:
    """What to generate. ``digits`` and ``num_ops`` are the difficulty knobs."""

    digits: int = 2
    num_ops: int = 1
    ops: tuple[str, ...] = ("+", "-")
    verbosity: float = 0.0  # probability of a filler sentence after each reasoning step (of a verbose response)
    filler_style: str = "step"  # step (each step drawn apart) | response (one draw: every step or none)
    fillers_per_step: int = 1  # filler sentences inserted at each verbose step
    turns: int = 1  # questions per chat
    word_problems: bool = True  # "Ann has 12 apples..." instead of "What is 12 + 34?"

    def __post_init__(self):
        if self.digits < 1:
            raise ValueError(f"data.digits must be >= 1, got {self.digits}")
        if self.num_ops < 1:
            raise ValueError(f"data.num_ops must be >= 1, got {self.num_ops}")
        if not self.ops or any(op not in ("+", "-") for op in self.ops):
            raise ValueError(f"data.ops must be a non-empty subset of ['+', '-'], got {list(self.ops)}")
        if not 0.0 <= self.verbosity <= 1.0:
            raise ValueError(f"data.verbosity must be in [0, 1], got {self.verbosity}")
        if self.filler_style not in ("step", "response"):
            raise ValueError(f"data.filler_style must be 'step' or 'response', got {self.filler_style!r}")
        if self.fillers_per_step < 1:
            raise ValueError(f"data.fillers_per_step must be >= 1, got {self.fillers_per_step}")
        if self.turns < 1:
            raise ValueError(f"data.turns must be >= 1, got {self.turns}")


def _column_steps(a: int, b: int, op: str) -> list[str]:
    """Digit-by-digit working of ``a op b`` (a >= b for subtraction), least significant digit first."""
    steps = []
    da, db = str(a)[::-1], str(b)[::-1]
    carry = 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        if op == "+":
            total = x + y + carry
            steps.append(f"{x}+{y}+{carry}={total}.")
            carry = total // 10
        else:
            diff = x - y - carry
            borrow = 1 if diff < 0 else 0
            steps.append(f"{x}-{y}-{carry}={diff + 10 * borrow}" + (" borrow 1." if borrow else "."))
            carry = borrow
    return steps


def _regroupings(a: int, b: int, op: str) -> int:
    """Columns of ``a op b`` (a >= b for subtraction) that carry (+) or borrow (-)."""
    count, carry = 0, 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        carry = int(x + y + carry >= 10) if op == "+" else int(x - y - carry < 0)
        count += carry
    return count


def _question(rng: random.Random, operands: list[int], ops: list[str], word: bool) -> str:
    if not word:
        expr = str(operands[0]) + "".join(f" {op} {n}" for op, n in zip(ops, operands[1:]))
        return f"What is {expr}?"
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    parts = [f"{name} has {operands[0]} {item}."]
    for op, n in zip(ops, operands[1:]):
        parts.append(f"{name} gets {n} more." if op == "+" else f"{name} gives away {n}.")
    parts.append(f"How many {item} does {name} have now?")
    return " ".join(parts)


def make_problem(rng: random.Random, spec: ArithmeticSpec) -> dict:
    """One question with its reasoning, final answer and the filler sentences it contains.

    Ground truth for difficulty estimation (no extra random draws, so samples are unchanged): ``column_steps``
    (digit columns worked over all operations), ``carries`` and ``borrows`` (columns that regroup)."""
    lo, hi = 10 ** (spec.digits - 1) if spec.digits > 1 else 0, 10**spec.digits - 1
    value = rng.randint(lo, hi)
    operands, ops, steps, fillers = [value], [], [], []
    column_steps, regroupings = 0, {"+": 0, "-": 0}
    for _ in range(spec.num_ops):
        op = rng.choice(spec.ops)
        if op == "-" and value < lo:  # keep results non-negative: subtract only what is there
            op = "+"
        n = rng.randint(lo, min(hi, value)) if op == "-" else rng.randint(lo, hi)
        big, small = (value, n)
        steps.append(f"{big}{op}{n}:")
        columns = _column_steps(big, small, op)
        steps.extend(columns)
        column_steps += len(columns)
        regroupings[op] += _regroupings(big, small, op)
        value = value + n if op == "+" else value - n
        steps.append(f"So {big}{op}{n}={value}.")
        operands.append(n)
        ops.append(op)
    reasoning = []
    verbose = spec.filler_style == "response" and spec.verbosity > 0 and rng.random() < spec.verbosity
    for step in steps:
        reasoning.append(step)
        if verbose or (spec.filler_style == "step" and spec.verbosity > 0 and rng.random() < spec.verbosity):
            for _ in range(spec.fillers_per_step):
                filler = rng.choice(FILLER_SENTENCES)
                reasoning.append(filler)
                fillers.append(filler)
    return {
        "question": _question(rng, operands, ops, spec.word_problems),
        "reasoning": " ".join(reasoning),
        "answer": str(value),
        "fillers": fillers,
        "column_steps": column_steps,
        "carries": regroupings["+"],
        "borrows": regroupings["-"],
    }


def make_chat(rng: random.Random, spec: ArithmeticSpec, sample_id: str) -> dict:
    """A chat of ``spec.turns`` question/answer turns in the `messages` format."""
    messages, answers, fillers = [], [], []
    for _ in range(spec.turns):
        problem = make_problem(rng, spec)
        messages.append({"role": "user", "content": problem["question"]})
        messages.append(
            {
                "role": "assistant",
                "reasoning_content": problem["reasoning"],
                "content": f"The answer is \\boxed{{{problem['answer']}}}.",
            }
        )
        answers.append(problem["answer"])
        fillers.append(problem["fillers"])
    return {
        "id": sample_id,
        "messages": messages,
        "answer": answers[-1],
        "turn_answers": answers,
        "difficulty": {"digits": spec.digits, "num_ops": spec.num_ops},
        "filler_sentences": fillers,
    }


def generate(spec: ArithmeticSpec, num_samples: int, seed: int, prefix: str = "arith") -> list[dict]:
    """``num_samples`` chats, reproducible from ``seed``; ids are ``{prefix}-{seed}-{index}``."""
    rng = random.Random(seed)
    return [make_chat(rng, spec, f"{prefix}-{seed}-{i}") for i in range(num_samples)]
