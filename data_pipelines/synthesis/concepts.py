"""Stage 1, concept selection: draw combinations of abstract concepts from a concept list.

PromptCoT (Zhao et al., arXiv 2503.02324) starts every problem from a handful of concepts sampled so that they
belong together (it samples by embedding similarity). Here a concept has a ``group`` (operation, operand size,
chain length, ... for arithmetic) and a combination takes at most one concept per group, always one from each
of ``required_groups``, and never two concepts that list each other as ``incompatible``.

A concept: ``{id, text, group?, spec?, incompatible?}``. ``text`` goes into the model prompts; ``spec`` is read
by the arithmetic template generator only (keys of ``TEMPLATE_SPEC_KEYS``); ``group`` defaults to the id.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATE_SPEC_KEYS = ("digits", "num_ops", "ops", "regroup", "word_problems")


@dataclass(frozen=True)
class Concept:
    id: str
    text: str
    group: str
    spec: dict = field(default_factory=dict)
    incompatible: tuple[str, ...] = ()


def _parse(raw: list, source: str) -> list[Concept]:
    concepts, seen = [], set()
    for index, item in enumerate(raw):
        where = f"{source}[{index}]"
        if isinstance(item, str):
            item = {"id": f"c{index}", "text": item}
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
            raise ValueError(f"{where}: each concept needs a non-empty 'text' (and an 'id'); got {item!r}")
        cid = str(item.get("id", f"c{index}"))
        if cid in seen:
            raise ValueError(f"{where}: concept id {cid!r} appears twice; concept ids must be unique")
        seen.add(cid)
        spec = dict(item.get("spec") or {})
        unknown = sorted(set(spec) - set(TEMPLATE_SPEC_KEYS))
        if unknown:
            raise ValueError(f"{where}.spec: unknown key(s) {unknown}; the template generator reads {list(TEMPLATE_SPEC_KEYS)}")
        concepts.append(Concept(cid, item["text"].strip(), str(item.get("group", cid)), spec, tuple(item.get("incompatible") or ())))
    ids = {c.id for c in concepts}
    for index, concept in enumerate(concepts):
        bad = [i for i in concept.incompatible if i not in ids]
        if bad:
            raise ValueError(f"{source}[{index}].incompatible: unknown concept id(s) {bad}; known ids: {sorted(ids)}")
    return concepts


def load_concepts(cfg) -> list[Concept]:
    """The concept list of ``concepts.items`` or ``concepts.file`` (jsonl, one concept per line, or yaml), restricted
    to ``concepts.include`` when given."""
    from omegaconf import OmegaConf

    items, path = cfg.get("items"), cfg.get("file")
    if OmegaConf.is_config(items):
        items = OmegaConf.to_container(items)
    if bool(items) == bool(path):
        raise ValueError("concepts: give exactly one of concepts.items (a list in the config) or concepts.file (a path)")
    if path:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"concepts.file={str(path)!r} does not exist; fix the path or use concepts.items")
        if path.suffix == ".jsonl":
            raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif path.suffix in (".yaml", ".yml"):
            raw = OmegaConf.to_container(OmegaConf.load(path))
        else:
            raise ValueError(f"concepts.file={str(path)!r}: use a .jsonl (one concept per line) or .yaml list")
        concepts = _parse(list(raw), "concepts.file")
    else:
        concepts = _parse(list(items), "concepts.items")
    include = cfg.get("include")
    if include:
        known = {c.id for c in concepts}
        unknown = [i for i in include if i not in known]
        if unknown:
            raise ValueError(f"concepts.include: unknown concept id(s) {unknown}; choose from {sorted(known)}")
        concepts = [c for c in concepts if c.id in set(include)]
    return concepts


class ConceptSampler:
    """Combinations of ``per_problem`` concepts: one per group, ``required_groups`` always present."""

    def __init__(self, concepts: list[Concept], per_problem: int, required_groups=(), max_tries: int = 100):
        self.by_group: dict[str, list[Concept]] = {}
        for concept in concepts:
            self.by_group.setdefault(concept.group, []).append(concept)
        self.required = list(required_groups or [])
        unknown = [g for g in self.required if g not in self.by_group]
        if unknown:
            raise ValueError(f"concepts.required_groups: no concept in group(s) {unknown}; groups: {sorted(self.by_group)}")
        if not len(self.required) <= per_problem <= len(self.by_group):
            raise ValueError(
                f"concepts.per_problem={per_problem} must lie between len(concepts.required_groups)={len(self.required)} "
                f"and the number of concept groups ({len(self.by_group)})"
            )
        self.per_problem, self.max_tries = per_problem, max_tries

    def sample(self, rng: random.Random) -> list[Concept]:
        optional = [g for g in self.by_group if g not in self.required]
        for _ in range(self.max_tries):
            groups = self.required + rng.sample(optional, self.per_problem - len(self.required))
            chosen = [rng.choice(self.by_group[g]) for g in groups]
            ids = {c.id for c in chosen}
            if not any(i in ids for c in chosen for i in c.incompatible):
                return chosen
        raise ValueError(
            f"concepts: no compatible combination of {self.per_problem} concepts found in {self.max_tries} draws; "
            "relax the 'incompatible' lists or concepts.required_groups"
        )


def concept_rows(sampler: ConceptSampler, ids: list[str], seed: int) -> list[dict]:
    """Stage rows for ``ids``; each draw is seeded by (seed, id), so a resumed run draws the same sets."""
    rows = []
    for row_id in ids:
        chosen = sampler.sample(random.Random(f"{seed}:concepts:{row_id}"))
        rows.append({
            "id": row_id, "stage": "concepts", "source_id": None, "seed": seed, "generator": "concept_sampler",
            "concept_ids": [c.id for c in chosen], "concepts": [c.text for c in chosen],
        })
    return rows
