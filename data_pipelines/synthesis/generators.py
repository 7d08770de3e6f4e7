"""Stages 2 and 3, rationale then problem, by one of two generators with the same two methods.

PromptCoT (arXiv 2503.02324) writes a rationale first (how the sampled concepts combine into a problem, the
way a problem designer thinks) and then the problem conditioned on concepts + rationale.

- ``ArithmeticGenerator``: the embedded default, no model. The rationale is a construction plan read off the
  concepts' ``spec`` (operand digits, chain length, operations, a carry/borrow requirement, word problem or
  bare expression) and the problem is drawn from data_pipelines/arithmetic.py under that plan; it also records
  the generator's ground truth (``column_steps``, carries, borrows), which later stages never read.
- ``PromptGenerator``: a language model behind a text backend (``generate(prompts, n, seeds)``, ``close()``; the
  hf / vllm / ray ones are train/synthesis/backends.py) with the prompt templates of the synthesis config
  (``prompts.rationale``, ``prompts.problem``).

Both return, per input row, a payload dict or an ``ItemError`` (recorded as that row's ``error``; the run goes on).
"""

from __future__ import annotations

import random
import re

from data_pipelines.arithmetic import ArithmeticSpec, make_problem
from data_pipelines.chat_format import THINK_CLOSE, generation_prompt
from data_pipelines.loading import final_boxed
from data_pipelines.synthesis.concepts import Concept


class ItemError(ValueError):
    """One row could not be produced (unparseable model output, unsatisfiable concepts); the run goes on."""


def item_seed(seed: int, row_id: str, stage: str) -> int:
    """A 31-bit seed from (run seed, row id, stage): independent of the order rows are processed in."""
    return random.Random(f"{seed}:{stage}:{row_id}").getrandbits(31)


class ArithmeticGenerator:
    name = "arithmetic_template"

    def __init__(self, concepts: list[Concept], defaults: dict, max_attempts: int = 100):
        self.by_id = {c.id: c for c in concepts}
        self.defaults, self.max_attempts = dict(defaults), max_attempts

    def plan(self, concept_ids: list[str]) -> dict:
        plan, setter = dict(self.defaults), {}
        plan.setdefault("regroup", None)
        for cid in concept_ids:
            for key, value in self.by_id[cid].spec.items():
                if key in setter and plan[key] != value:
                    raise ItemError(f"concepts {setter[key]!r} and {cid!r} both set {key!r} ({plan[key]!r} vs {value!r})")
                plan[key], setter[key] = value, cid
        plan["ops"] = list(plan["ops"])
        return plan

    def _rationale(self, row: dict) -> dict:
        plan = self.plan(row["concept_ids"])
        ops = {"+": "addition", "-": "subtraction"}
        regroup = {"+": " Pick operands so that at least one column carries.",
                   "-": " Pick operands so that at least one column borrows.", None: ""}[plan["regroup"]]
        text = (
            f"Combine {'; '.join(row['concepts'])}. Start from a {plan['digits']}-digit number and chain "
            f"{plan['num_ops']} operation(s) of {' or '.join(ops[o] for o in plan['ops'])} on {plan['digits']}-digit "
            f"operands, keeping every intermediate result non-negative.{regroup} Pose it as "
            f"{'a short story about a person and their items' if plan['word_problems'] else 'a bare expression'}; "
            "the work is one digit column per place value per operation."
        )
        return {"rationale": text, "plan": plan}

    def _problem(self, row: dict, seed: int) -> dict:
        plan = row["plan"]
        spec = ArithmeticSpec(digits=int(plan["digits"]), num_ops=int(plan["num_ops"]), ops=tuple(plan["ops"]),
                              word_problems=bool(plan["word_problems"]))
        rng = random.Random(item_seed(seed, row["id"], "problems"))
        need = {"+": "carries", "-": "borrows"}.get(plan["regroup"])
        for _ in range(self.max_attempts):
            problem = make_problem(rng, spec)
            if need is None or problem[need] > 0:
                break
        else:
            raise ItemError(f"no problem with {need} in {self.max_attempts} draws for concepts {row['concept_ids']} "
                            "(mark these concepts 'incompatible' in the concept list)")
        return {
            "question": problem["question"], "answer": problem["answer"], "reasoning": problem["reasoning"],
            "ground_truth": {"column_steps": problem["column_steps"], "carries": problem["carries"],
                             "borrows": problem["borrows"], "digits": spec.digits, "num_ops": spec.num_ops},
        }

    def rationales(self, rows: list[dict], seed: int) -> list:
        return [_or_error(self._rationale, row) for row in rows]

    def close(self) -> None:
        pass

    def problems(self, rows: list[dict], seed: int) -> list:
        return [_or_error(self._problem, row, seed) for row in rows]


def _or_error(fn, *args):
    try:
        return fn(*args)
    except ItemError as err:
        return err


_PROBLEM = re.compile(r"problem\s*:\s*(.*?)\s*(?:answer\s*:|\\boxed\{|$)", re.IGNORECASE | re.DOTALL)


def parse_problem(text: str) -> tuple[str, str]:
    """(question, answer) from a generated ``Problem: ... Answer: \\boxed{...}``; ItemError if either is missing."""
    body = text.rsplit(THINK_CLOSE, 1)[-1]
    answer = final_boxed(body.split("Answer:")[-1] if "Answer:" in body else body)
    match = _PROBLEM.search(body)
    question = match.group(1).strip() if match else ""
    if not question or answer is None:
        missing = "a 'Problem:' section" if not question else "a final \\boxed{} answer"
        raise ItemError(f"generated problem has no {missing}; prompts.problem must ask for "
                        "'Problem: <text>' then 'Answer: \\boxed{<answer>}'")
    return question, answer


class PromptGenerator:
    """Rationales and problems from a language model and the config's prompt templates."""

    def __init__(self, backend, tokenizer, prompts: dict, system_prompt: str | None = None):
        for key in ("rationale", "problem"):
            if not prompts.get(key):
                raise ValueError(f"prompts.{key} is empty: a model generator needs both prompt templates")
        self.backend, self.templates, self.system_prompt = backend, prompts, system_prompt
        self.tokenizer = tokenizer  # its chat template renders the prompts
        self.name = backend.name

    def close(self) -> None:
        self.backend.close()

    def _prompt(self, template: str, row: dict, key: str) -> str:
        fields = {"concepts": "\n".join(f"- {c}" for c in row["concepts"]), "rationale": row.get("rationale", "")}
        try:
            content = template.format(**fields)
        except (KeyError, IndexError) as err:
            raise ValueError(f"prompts.{key}: unknown placeholder {err}; use {{concepts}} and {{rationale}} "
                             "(double literal braces: {{{{ }}}})") from None
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return generation_prompt(self.tokenizer, messages)

    def _generate(self, rows, seed, key):
        prompts = [self._prompt(self.templates[key], row, key) for row in rows]
        seeds = [item_seed(seed, row["id"], key) for row in rows]
        return [texts[0] for texts in self.backend.generate(prompts, 1, seeds)]

    def rationales(self, rows: list[dict], seed: int) -> list:
        payloads = []
        for text in self._generate(rows, seed, "rationale"):
            rationale = text.rsplit(THINK_CLOSE, 1)[-1].strip()
            payloads.append({"rationale": rationale, "plan": None} if rationale else ItemError("the model wrote an empty rationale"))
        return payloads

    def problems(self, rows: list[dict], seed: int) -> list:
        payloads = []
        for text in self._generate(rows, seed, "problem"):
            try:
                question, answer = parse_problem(text)
                payloads.append({"question": question, "answer": answer, "reasoning": None, "ground_truth": None})
            except ItemError as err:
                payloads.append(ItemError(f"{err}; the model wrote {text[:120]!r}"))
        return payloads
