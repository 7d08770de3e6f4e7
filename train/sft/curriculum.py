"""Curriculum planning for SFT (methods.md section 5): an ordered list of phases, each with its own data mix,
length, learning-rate schedule and frozen parameters.

``curriculum`` config (configs/curriculum/*.yaml)::

    datasets: {name: {synthetic: {digits: 2, num_ops: [1, 2], num_samples: 3000, seed: 11}}
                   | {files: [a.jsonl], labels: [hard], pass_rate: [0.0, 0.5]}}   # labels / pass_rate: optional
    eval:     {name: same form}                       # held-out sets, scored at eval_every and at each phase end
    phases:   [{name, mix: {dataset: weight}, steps | epochs, lr, warmup_steps, min_lr_ratio, decay,
                samples, freeze, unfreeze}, ...]

``plan`` turns it into ``Phase`` objects: a resumable packed stream of the phase's documents, the global steps it
covers and its lr schedule. A plain SFT run (no ``curriculum`` key) is a one-phase plan of ``data`` and
``trainer`` with exactly the old stream, seed and warmup + cosine schedule. Every document's ``sample_id`` is
``{phase}/{dataset}/{row id}`` (provenance; also in ``meta``), so what a phase trains on can be checked.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
import re
from dataclasses import dataclass, field

from omegaconf import DictConfig, ListConfig, OmegaConf

from data_pipelines.arithmetic import ArithmeticSpec, generate
from data_pipelines.batching import PackedBatchStream
from data_pipelines.loading import check_files, load_split, tokenize_rows
from data_pipelines.packing import Document
from data_pipelines.synthesis.filtering import check_band, select_by_difficulty
from data_pipelines.validation import validate_rows
from train.models.sequence_parallel import data_parallel_size, sp_size
from train.run.lr_schedule import DECAYS, warmup_then_decay

log = logging.getLogger(__name__)

PHASE_KEYS = {"name", "mix", "steps", "epochs", "samples", "lr", "warmup_steps", "min_lr_ratio", "decay", "freeze", "unfreeze"}
SYNTHETIC_KEYS = {f.name for f in dataclasses.fields(ArithmeticSpec)} | {"num_samples", "seed"}
SELECT_KEYS = {"labels", "pass_rate"}  # difficulty selection of a files source (`python -m train.synthesis` output rows)


class CurriculumError(ValueError):
    pass


@dataclass
class Phase:
    index: int
    name: str
    stream: PackedBatchStream
    start: int  # first global step (0-based) of the phase
    steps: int
    lr: float  # peak
    warmup_steps: int
    min_lr_ratio: float
    decay: str = "cosine"
    freeze: tuple[str, ...] = ()  # parameter-name regexes frozen in this phase ...
    unfreeze: tuple[str, ...] = ()  # ... except those matching these
    mix: dict[str, int] = field(default_factory=dict)  # documents drawn per dataset
    schedule_steps: int | None = None  # steps the lr schedule spans (None: the phase's steps)

    @property
    def end(self) -> int:
        return self.start + self.steps

    def lr_schedule(self, optimizer):
        """This phase's schedule on ``optimizer`` (train/run/lr_schedule.py), at the phase's first step."""
        return warmup_then_decay(optimizer, **self.schedule())

    def schedule(self) -> dict:
        """The arguments of this phase's lr schedule (``warmup_then_decay`` / ``PolicyTrainer.start_lr_schedule``)."""
        return {"peak_lr": self.lr, "warmup_steps": self.warmup_steps, "total_steps": self.schedule_steps or self.steps,
                "min_lr_ratio": self.min_lr_ratio, "decay": self.decay}

    def freezing(self) -> Freeze:
        """This phase's parameter freezing, small enough to send to the trainer ranks (the phase holds its data)."""
        return Freeze(self.index, self.freeze, self.unfreeze)


@dataclass(frozen=True)
class Freeze:
    """``apply_freeze`` of one phase as a callable on a model: ``Freeze(...)(model)`` -> frozen tensor count."""

    index: int
    freeze: tuple[str, ...] = ()
    unfreeze: tuple[str, ...] = ()

    def __call__(self, model) -> int:
        return apply_freeze(model, self)


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase that takes global step ``step`` (0-based); the last phase once all steps are done."""
    return next((p for p in phases if step < p.end), phases[-1])


# -- config checks -------------------------------------------------------------------------------------------------
def _fail(condition: bool, message: str) -> None:
    if not condition:
        raise CurriculumError(message)


def _expand_range(value, key: str) -> list[int]:
    """``3`` -> [3]; ``[1, 3]`` -> [1, 2, 3] (a difficulty range)."""
    if isinstance(value, (list, tuple, ListConfig)):
        _fail(len(value) == 2 and all(isinstance(v, int) for v in value) and value[0] <= value[1],
              f"{key}={list(value)} must be an int or a range [low, high] with low <= high")
        return list(range(value[0], value[1] + 1))
    _fail(isinstance(value, int), f"{key}={value!r} must be an int or a range [low, high]")
    return [value]


def _synthetic_specs(spec, key: str) -> list[ArithmeticSpec]:
    """One ArithmeticSpec per (digits, num_ops) of the ranges in ``spec`` (rows are split evenly over them)."""
    unknown = sorted(set(spec) - SYNTHETIC_KEYS)
    _fail(not unknown, f"{key}: unknown key(s) {unknown}; known: {sorted(SYNTHETIC_KEYS)}")
    _fail(int(spec.get("num_samples", 0)) >= 1, f"{key}.num_samples must be >= 1")
    _fail("seed" in spec, f"{key}.seed is required (rows are reproducible from it)")
    base = {k: v for k, v in spec.items() if k not in ("num_samples", "seed", "digits", "num_ops")}
    if "ops" in base:
        base["ops"] = tuple(base["ops"])
    specs = []
    for digits, num_ops in itertools.product(_expand_range(spec.get("digits", 2), f"{key}.digits"),
                                             _expand_range(spec.get("num_ops", 1), f"{key}.num_ops")):
        try:
            specs.append(ArithmeticSpec(digits=digits, num_ops=num_ops, **base))
        except ValueError as error:
            raise CurriculumError(f"{key}: {error}") from None
    return specs


def _check_selection(spec, key: str) -> None:
    labels = spec.get("labels")
    _fail(labels is None or (isinstance(labels, (list, ListConfig)) and len(labels) > 0),
          f"{key}.labels={labels!r} must be a non-empty list of difficulty labels (e.g. [easy]) or absent")
    if spec.get("pass_rate") is not None:
        try:
            check_band(spec.pass_rate)
        except ValueError as error:
            raise CurriculumError(f"{key}.pass_rate: {error}") from None


def _check_source(source, key: str) -> None:
    kinds = [k for k in ("synthetic", "files") if k in (source or {})]
    _fail(isinstance(source, (dict, DictConfig)) and len(kinds) == 1,
          f"{key} must be {{synthetic: {{...}}}} or {{files: [...]}} (synthesis output: {{files: [<out>/filtered.jsonl], "
          f"labels: [hard]}}), got {OmegaConf.to_container(source) if isinstance(source, DictConfig) else source!r}")
    if "synthetic" in source:
        _fail(len(source) == 1, f"{key}: a synthetic source takes no other keys than synthetic, got {sorted(source)}")
        _synthetic_specs(source.synthetic, f"{key}.synthetic")
    else:
        unknown = sorted(set(source) - {"files"} - SELECT_KEYS)
        _fail(not unknown, f"{key}: unknown key(s) {unknown}; a files source takes files, {sorted(SELECT_KEYS)}")
        _fail(len(source.files) > 0, f"{key}.files is empty")
        check_files(source.files, f"{key}.files")
        _check_selection(source, key)


def check(cfg: DictConfig) -> None:
    """Validate ``cfg.curriculum`` before any data is generated or any model is built; messages name the key."""
    cur = cfg.get("curriculum")
    if cur is None:
        return
    datasets = cur.get("datasets") or {}
    _fail(len(datasets) > 0, "curriculum.datasets is empty: name at least one training source (synthetic or files)")
    for name, source in datasets.items():
        _check_source(source, f"curriculum.datasets.{name}")
    for name, source in (cur.get("eval") or {}).items():
        _check_source(source, f"curriculum.eval.{name}")
    phases = cur.get("phases")
    _fail(phases is not None and len(phases) > 0, "curriculum.phases is empty: give at least one phase (mix, steps or epochs)")
    for k, phase in enumerate(phases):
        key = f"curriculum.phases[{k}]"
        unknown = sorted(set(phase) - PHASE_KEYS)
        _fail(not unknown, f"{key}: unknown key(s) {unknown}; known: {sorted(PHASE_KEYS)}")
        mix = phase.get("mix") or {}
        _fail(len(mix) > 0, f"{key}.mix is empty: give {{dataset: weight}} with names from curriculum.datasets")
        for name, weight in mix.items():
            _fail(name in datasets, f"{key}.mix: unknown dataset {name!r}; curriculum.datasets has {sorted(datasets)}")
            _fail(isinstance(weight, (int, float)) and weight >= 0, f"{key}.mix.{name}={weight} must be a number >= 0")
        _fail(sum(mix.values()) > 0, f"{key}.mix: all weights are 0")
        _fail((phase.get("steps") is None) != (phase.get("epochs") is None), f"{key}: set exactly one of steps or epochs")
        if phase.get("steps") is not None:
            _fail(isinstance(phase.steps, int) and phase.steps >= 1, f"{key}.steps={phase.steps} must be an int >= 1")
        else:
            _fail(phase.epochs > 0, f"{key}.epochs={phase.epochs} must be > 0")
        _fail(phase.get("samples") is None or phase.samples >= 1, f"{key}.samples={phase.get('samples')} must be >= 1")
        _fail(phase.get("lr", cfg.trainer.lr) > 0, f"{key}.lr={phase.get('lr')} must be > 0")
        _fail(phase.get("warmup_steps", 0) >= 0, f"{key}.warmup_steps={phase.get('warmup_steps')} must be >= 0")
        _fail(0 <= phase.get("min_lr_ratio", cfg.trainer.min_lr_ratio) <= 1, f"{key}.min_lr_ratio must be in [0, 1]")
        _fail(phase.get("decay", "cosine") in DECAYS, f"{key}.decay={phase.get('decay')!r} must be one of {list(DECAYS)}")
        for which in ("freeze", "unfreeze"):
            for pattern in phase.get(which) or []:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise CurriculumError(f"{key}.{which}: {pattern!r} is not a regular expression ({error})") from None


# -- data -------------------------------------------------------------------------------------------------------------
def source_rows(name: str, source, split: str) -> list[dict]:
    """Validated chat rows of one named source (synthetic row ids start with ``name``)."""
    if "files" in source:
        data = OmegaConf.create({"source": "files", f"{split}_files": list(source.files)})
        if not from_synthesis(source):
            return load_split(data, split)
        # synthesis output (filtered.jsonl): problems no solver solved have no worked solution; SFT trains on the rest
        rows = select_by_difficulty(load_split(data, split, require_assistant=False), source.get("labels"),
                                    source.get("pass_rate"), f"curriculum {name}")
        rows = rows if split == "eval" else [r for r in rows if any(m["role"] == "assistant" for m in r["messages"])]
        _fail(len(rows) > 0, f"curriculum.datasets.{name}: no row of {list(source.files)} with a worked solution has "
                             f"labels={source.get('labels')} / pass_rate={source.get('pass_rate')}")
        return rows
    specs = _synthetic_specs(source.synthetic, name)
    total, seed = int(source.synthetic.num_samples), int(source.synthetic.seed)
    rows = []
    for i, spec in enumerate(specs):  # an even split of num_samples over the difficulty grid
        count = total // len(specs) + (i < total % len(specs))
        rows.extend(generate(spec, count, seed + 7919 * i, prefix=f"{name}-d{spec.digits}o{spec.num_ops}"))
    validate_rows(rows, f"synthetic {name}")
    return rows


def eval_sets(cfg: DictConfig) -> dict[str, list[dict]]:
    """Held-out rows by set name: ``curriculum.eval`` under a curriculum (metrics ``eval/{name}/...``), else the
    data group's eval split under the name "" (metrics ``eval/...``, as plain SFT always logged them)."""
    cur = cfg.get("curriculum")
    if cur is not None:
        return {name: source_rows(name, source, "eval") for name, source in (cur.get("eval") or {}).items()}
    if cfg.data.source == "synthetic" or cfg.data.eval_files:
        return {"": load_split(cfg.data, "eval")}
    return {}


def _mix(phase_index: int, phase_name: str, weights: dict, pools: dict[str, list[Document]], samples: int | None,
         seed: int) -> tuple[list[Document], dict[str, int]]:
    """The phase's documents: ``samples`` (default: all documents of the mixed datasets) split by weight; each
    dataset's share is drawn from a seeded shuffle of it, cycling when the share exceeds the dataset."""
    used = {name: w for name, w in weights.items() if w > 0}
    total = samples or sum(len(pools[name]) for name in used)
    weight_sum = sum(used.values())
    documents, counts = [], {}
    for name, weight in used.items():
        count = round(total * weight / weight_sum)
        pool = pools[name]
        order = list(range(len(pool)))
        random.Random(f"{seed}/{phase_index}/{name}").shuffle(order)
        for i in range(count):
            doc = pool[order[i % len(pool)]]
            documents.append(dataclasses.replace(doc, sample_id=f"{phase_name}/{name}/{doc.sample_id}",
                                                 meta={**doc.meta, "phase": phase_index, "dataset": name}))
        counts[name] = count
    return documents, counts


def _steps(phase_cfg, stream: PackedBatchStream, micro_batches_per_step: int) -> int:
    if phase_cfg.get("steps") is not None:
        return int(phase_cfg.steps)
    return max(1, math.ceil(phase_cfg.epochs * stream.batches_per_epoch() / micro_batches_per_step))


def micro_batches_per_step(trainer_cfg) -> int:
    """Micro-batches one optimizer step takes from the stream: ``grad_accum`` on each of the ``world_size / SP``
    data-parallel groups (the ``trainer.sequence_parallel_size`` ranks of a group share theirs)."""
    return int(trainer_cfg.grad_accum) * data_parallel_size(int(trainer_cfg.get("world_size", 1)), sp_size(trainer_cfg))


def plan(cfg: DictConfig, tokenizer) -> tuple[list[Phase], dict]:
    """(phases, data statistics to log). ``check(cfg)`` must have passed."""
    t, d = cfg.trainer, cfg.data
    multi_turn = d.get("multi_turn", "single_pass")
    cur = cfg.get("curriculum")

    def stream_of(documents, seed):
        return PackedBatchStream(documents, t.row_tokens, t.rows_per_micro_batch, tokenizer.pad_token_id, seed)

    if cur is None:  # plain SFT: one phase of data + trainer
        loaded: dict = {}  # data/decontaminated_rows when data.decontaminate is on
        rows = load_split(d, "train", stats=loaded)
        documents, dropped = tokenize_rows(rows, tokenizer, d.max_seq_len, d.system_prompt, multi_turn)
        stream = stream_of(documents, cfg.seed)
        steps = int(t.max_steps) if t.max_steps is not None else max(1, math.ceil(t.epochs * stream.batches_per_epoch() / micro_batches_per_step(t)))
        phase = Phase(0, "sft", stream, 0, steps, float(t.lr), int(t.warmup_steps), float(t.min_lr_ratio),
                      schedule_steps=t.get("schedule_steps"))
        return [phase], {"data/train_rows": len(rows), "data/dropped_for_length": dropped, "data/documents": len(documents),
                         **loaded}

    used = sorted({name for p in cur.phases for name, w in p.mix.items() if w > 0})
    pools, stats = {}, {}
    for name in used:
        rows = source_rows(name, cur.datasets[name], "train")
        pools[name], dropped = tokenize_rows(rows, tokenizer, d.max_seq_len, d.system_prompt, multi_turn)
        stats[f"data/{name}/rows"], stats[f"data/{name}/dropped_for_length"] = len(rows), dropped
    phases, start = [], 0
    for k, p in enumerate(cur.phases):
        name = p.get("name") or f"phase{k}"
        documents, counts = _mix(k, name, dict(p.mix), pools, p.get("samples"), cfg.seed)
        stream = stream_of(documents, cfg.seed * 1_000 + k)
        steps = _steps(p, stream, micro_batches_per_step(t))
        phases.append(Phase(
            k, name, stream, start, steps, float(p.get("lr", t.lr)), int(p.get("warmup_steps", 0)),
            float(p.get("min_lr_ratio", t.min_lr_ratio)), p.get("decay", "cosine"),
            tuple(p.get("freeze") or ()), tuple(p.get("unfreeze") or ()), counts,
        ))
        stats[f"data/phase{k}/documents"] = len(documents)
        stats.update({f"data/phase{k}/{name}/documents": count for name, count in counts.items()})
        start += steps
    synthesis = [name for name in used if from_synthesis(cur.datasets[name])]
    if synthesis:
        stats["data/synthesis_share"] = synthesis_share(phases, synthesis)
    return phases, stats


def from_synthesis(source) -> bool:
    """Whether a dataset's rows come from the synthesis pipeline: ``files`` selected by pass-rate label (only
    ``python -m train.synthesis`` output carries those labels)."""
    return "files" in source and any(source.get(k) is not None for k in SELECT_KEYS)


def synthesis_share(phases: list[Phase], synthesis: list[str]) -> float:
    """Share of the run's training documents that come from ``synthesis`` datasets, each phase weighted by its
    steps (a step takes the same token budget in every phase): sum_k steps_k / steps * synth_k / docs_k, where
    docs_k is the phase's drawn documents (``Phase.mix``) and synth_k those of the synthesis datasets."""
    total = sum(p.steps for p in phases)
    return sum(p.steps / total * sum(c for n, c in p.mix.items() if n in synthesis) / max(sum(p.mix.values()), 1)
               for p in phases)


# -- model ------------------------------------------------------------------------------------------------------------
def _check_patterns(names: list[str], phase) -> None:
    for which in ("freeze", "unfreeze"):
        for pattern in getattr(phase, which):
            _fail(any(re.search(pattern, n) for n in names),
                  f"curriculum.phases[{phase.index}].{which}: {pattern!r} matches no parameter (names look like {names[0]!r})")


def check_freezing(model, phases: list[Phase]) -> None:
    """Every phase's freeze / unfreeze pattern matches a parameter of ``model`` (checked before the ranks start)."""
    names = [name for name, _ in model.named_parameters()]
    for phase in phases:
        _check_patterns(names, phase)


def apply_freeze(model, phase: Phase) -> int:
    """Set ``requires_grad`` for ``phase``: a parameter is frozen when its name matches a ``freeze`` pattern and
    no ``unfreeze`` pattern. Returns the number of frozen parameter tensors. AdamW skips parameters without a
    gradient, so frozen ones keep their weights and their moment estimates."""
    _check_patterns([name for name, _ in model.named_parameters()], phase)
    frozen = 0
    for name, param in model.named_parameters():
        freeze = any(re.search(p, name) for p in phase.freeze) and not any(re.search(p, name) for p in phase.unfreeze)
        param.requires_grad_(not freeze)
        frozen += freeze
    return frozen
