"""Solvers for difficulty estimation: k sampled responses per problem, later scored against its answer.

- ``ModelSolver``: a language model behind a text backend (``generate(prompts, n, seeds)``, ``close()``; the hf /
  vllm / ray ones are train/synthesis/backends.py), asked in the chat format the framework trains on
  (``<think>...</think>`` then a ``\\boxed{}`` answer).
- ``ReferenceSolver``: a SIMULATION for tests and CPU demos, not a model. It parses an arithmetic problem
  (word problem or bare expression, as data_pipelines/arithmetic.py writes them) and works it digit column by
  digit column, writing a wrong digit in a column with probability ``step_error * C``, where C is the number
  of columns the whole problem takes: like working memory, each step gets less reliable as the problem grows.
  Its pass rate on a problem is ``(1 - step_error * C) ** C``, so problems with more steps fail more often,
  which is what a difficulty estimator must detect. It reads only the problem text, never its metadata.
"""

from __future__ import annotations

import random
import re

from data_pipelines.chat_format import generation_prompt
from data_pipelines.synthesis.generators import ItemError

_WORD_START = re.compile(r"^\s*\w+ has (\d+) \w+\.")
_WORD_STEP = re.compile(r"\b(?:gets (\d+) more|gives away (\d+))\b")
_BARE = re.compile(r"^\s*What is (\d+(?:\s*[+-]\s*\d+)+)\s*\?\s*$")


def parse_arithmetic(question: str) -> tuple[list[int], list[str]]:
    """(operands, ops) of a synthetic arithmetic problem; ItemError for any other text."""
    bare = _BARE.match(question)
    if bare:
        tokens = re.findall(r"\d+|[+-]", bare.group(1))
        return [int(t) for t in tokens[::2]], tokens[1::2]
    start = _WORD_START.match(question)
    if start:
        steps = _WORD_STEP.findall(question)
        return [int(start.group(1))] + [int(a or b) for a, b in steps], ["+" if a else "-" for a, _ in steps]
    raise ItemError("difficulty.solver.backend=reference_solver only reads synthetic arithmetic problems "
                    f"(data_pipelines/arithmetic.py); got {question[:80]!r}")


class ReferenceSolver:
    """Column arithmetic with a per-column error probability (simulation backend; see the module docstring)."""

    def __init__(self, step_error: float):
        if not 0.0 <= step_error < 1.0:
            raise ValueError(f"difficulty.solver.step_error must be in [0, 1), got {step_error}")
        self.step_error = step_error
        self.name = f"reference_solver(simulation, step_error={step_error})"

    @staticmethod
    def count_columns(operands: list[int], ops: list[str]) -> int:
        """Digit columns worked over the whole chain (what makes a problem long)."""
        value, columns = operands[0], 0
        for op, n in zip(ops, operands[1:]):
            columns += max(len(str(value)), len(str(n)))
            value = value + n if op == "+" else value - n
        return columns

    def _columns(self, a: int, b: int, op: str, slip: float, rng: random.Random) -> tuple[int, list[str]]:
        """``a op b`` digit column by digit column (a >= b for subtraction), with slips."""
        da, db = str(a)[::-1], str(b)[::-1]
        digits, lines, carry = [], [], 0
        for i in range(max(len(da), len(db))):
            x = int(da[i]) if i < len(da) else 0
            y = int(db[i]) if i < len(db) else 0
            carry_in = carry
            total = x + y + carry_in if op == "+" else x - y - carry_in
            digit, carry = total % 10, (total // 10 if op == "+" else int(total < 0))
            if rng.random() < slip:
                digit = (digit + rng.randint(1, 9)) % 10  # a slip: a wrong digit in this column
            digits.append(digit)
            lines.append(f"{x}{op}{y}{op}{carry_in}={digit}")
        value = int("".join(str(d) for d in reversed(digits))) + carry * 10 ** len(digits)
        return value, lines

    def _response(self, operands: list[int], ops: list[str], rng: random.Random) -> str:
        slip = min(1.0, self.step_error * self.count_columns(operands, ops))
        value, work = operands[0], []
        for op, n in zip(ops, operands[1:]):
            result, lines = self._columns(value, n, op, slip, rng)
            work.append(f"{value}{op}{n}: " + "; ".join(lines) + f". So {value}{op}{n}={result}.")
            value = result
        return f"<think>\n{' '.join(work)}\n</think>\n\nThe answer is \\boxed{{{value}}}."

    def solve(self, questions: list[str], n: int, seeds: list[int]) -> list:
        out = []
        for question, seed in zip(questions, seeds):
            try:
                operands, ops = parse_arithmetic(question)
            except ItemError as err:
                out.append(err)
                continue
            out.append([self._response(operands, ops, random.Random(f"{seed}:{i}")) for i in range(n)])
        return out

    def close(self) -> None:
        pass


class ModelSolver:
    """k samples per problem from a model, prompted as a chat (optional system prompt)."""

    def __init__(self, backend, tokenizer, system_prompt: str | None = None):
        self.backend, self.tokenizer, self.system_prompt = backend, tokenizer, system_prompt  # the model's chat template
        self.name = backend.name

    def solve(self, questions: list[str], n: int, seeds: list[int]) -> list:
        prompts = []
        for question in questions:
            messages = [{"role": "user", "content": question}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            prompts.append(generation_prompt(self.tokenizer, messages))
        return self.backend.generate(prompts, n, seeds)

    def close(self) -> None:
        self.backend.close()
