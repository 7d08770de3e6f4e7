"""PromptCoT-style problem synthesis: concepts -> rationales -> problems -> difficulty -> filter.

    python -m train.synthesis --out runs/synthesis            # embedded default, CPU, no model
    python -m train.synthesis --config configs/synthesis/model.yaml --out runs/synth \
        generator.model_path=/models/qwen difficulty.solver.model_path=/models/qwen

PromptCoT (Zhao et al., arXiv 2503.02324) samples related concepts, has a model write a rationale (how the
concepts combine into a hard problem) and then the problem from concepts + rationale, and keeps the best
problems (the paper filters by reward-model ratings; here, as in the curriculum recipe, by the pass rate of a
solver model, so that phases and samplers can pick problems by measured difficulty). Every stage appends rows
to ``<out>/<stage>.jsonl`` (provenance: stage, concept ids, seed, generator, source row id) and skips ids
already there, so an interrupted run picks up where it stopped without duplicates. The stage components live in
data_pipelines/synthesis/; the model backends they are given (hf, vllm, ray) in train/synthesis/backends.py.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from data_pipelines.synthesis.concepts import ConceptSampler, concept_rows, load_concepts
from data_pipelines.synthesis.estimate import AnswerScorer, check_labels, estimate
from data_pipelines.synthesis.filtering import check_band, keep, training_row
from data_pipelines.synthesis.generators import ArithmeticGenerator, PromptGenerator, item_seed
from data_pipelines.synthesis.solvers import ModelSolver, ReferenceSolver
from data_pipelines.synthesis.store import StageWriter, read_rows, require_stage_file, write_parquet
from train.synthesis.backends import MODEL_BACKENDS, REPO, backend_tokenizer, build_backend, resolve_model

log = logging.getLogger(__name__)

STAGES = ("concepts", "rationales", "problems", "difficulty", "filter")
FILES = {"concepts": "concepts.jsonl", "rationales": "rationales.jsonl", "problems": "problems.jsonl",
         "difficulty": "difficulty.jsonl", "filter": "filtered.jsonl"}
DEFAULT_CONFIG = REPO / "configs/synthesis/arithmetic.yaml"


def load_config(path, overrides=()) -> DictConfig:
    """A synthesis YAML file (``extends: other.yaml`` merges it over that file first) plus ``key=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {str(path)!r} does not exist; the shipped configs are in configs/synthesis/")
    cfg = OmegaConf.load(path)
    if cfg.get("extends"):
        base = load_config(path.parent / cfg.extends)
        cfg = OmegaConf.merge(base, {k: v for k, v in cfg.items() if k != "extends"})
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))


def check(cfg: DictConfig) -> None:
    """Fail before any work, naming the key, for every stage that will run."""
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages: unknown stage(s) {unknown}; choose from {list(STAGES)} (they run in that order)")
    if not cfg.get("out_dir"):
        raise ValueError("out_dir is not set: pass --out DIR (or out_dir=DIR)")
    if int(cfg.num_problems) < 1:
        raise ValueError(f"num_problems={cfg.num_problems} must be >= 1")
    stages = set(cfg.stages)
    if stages & {"concepts", "rationales", "problems"}:
        concepts = load_concepts(cfg.concepts)
        ConceptSampler(concepts, int(cfg.concepts.per_problem), cfg.concepts.get("required_groups"))
    if stages & {"rationales", "problems"}:
        g = cfg.generator
        if g.backend not in ("arithmetic", *MODEL_BACKENDS):
            raise ValueError(f"generator.backend={g.backend!r}: choose arithmetic (template, CPU) or one of {list(MODEL_BACKENDS)}")
        for key in ("rationales_per_input", "problems_per_input", "batch_size"):
            if int(g[key]) < 1:
                raise ValueError(f"generator.{key}={g[key]} must be >= 1")
        if g.backend != "arithmetic":
            resolve_model(g.get("model_path"), "generator.model_path")
    if "difficulty" in stages:
        d = cfg.difficulty
        if d.solver.backend not in ("reference_solver", *MODEL_BACKENDS):
            raise ValueError(f"difficulty.solver.backend={d.solver.backend!r}: choose reference_solver (simulation) "
                             f"or one of {list(MODEL_BACKENDS)}")
        if int(d.samples) < 1:
            raise ValueError(f"difficulty.samples={d.samples} must be >= 1 (k samples per problem)")
        if d.solver.backend != "reference_solver":
            resolve_model(d.solver.get("model_path"), "difficulty.solver.model_path")
    check_labels(cfg.difficulty.labels)
    if "filter" in stages:
        check_band(cfg.filter.band)
        names = {name for name, _ in check_labels(cfg.difficulty.labels)}
        bad = [label for label in cfg.filter.get("labels") or [] if label not in names]
        if bad:
            raise ValueError(f"filter.labels: unknown label(s) {bad}; difficulty.labels defines {sorted(names)}")


def _note_config_change(path: Path, cfg: DictConfig) -> None:
    """Resumed rows keep the settings they were made with: say so when the config changed since."""
    if not path.is_file():
        return
    old, new = OmegaConf.to_container(OmegaConf.load(path)), OmegaConf.to_container(cfg)
    changed = sorted(k for k in set(old) | set(new) if k not in ("stages", "parquet") and old.get(k) != new.get(k))
    if changed:
        log.warning("%s: config keys %s differ from the run that wrote this directory; rows already written keep "
                    "the old settings (filter is always redone); use a new --out to regenerate everything", path.parent, changed)


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _row(src: dict, row_id: str, stage: str, generator: str, payload) -> dict:
    """A stage row: the source row's fields, this stage's provenance, and the payload (or its error)."""
    lineage = [*src.get("lineage", []), {"stage": src["stage"], "id": src["id"], "generator": src["generator"]}]
    row = {**src, "id": row_id, "stage": stage, "source_id": src["id"], "generator": generator, "lineage": lineage}
    row.pop("error", None)
    if isinstance(payload, Exception):
        return {**row, "error": str(payload)}
    return {**row, **payload}


def _generate_stage(stage, inputs, writer, produce, generator_name, per_input, tag, seed, batch_size) -> None:
    jobs = [(src, f"{src['id']}.{tag}{j}") for src in inputs if not src.get("error") for j in range(per_input)]
    todo = [(src, row_id) for src, row_id in jobs if row_id not in writer.done]
    for chunk in _batches(todo, batch_size):
        payloads = produce([{**src, "id": row_id} for src, row_id in chunk], seed)
        for (src, row_id), payload in zip(chunk, payloads):
            writer.write(_row(src, row_id, stage, generator_name, payload))


def build_generator(cfg):
    g = cfg.generator
    if g.backend == "arithmetic":
        return ArithmeticGenerator(load_concepts(cfg.concepts), OmegaConf.to_container(g.defaults), int(g.max_attempts))
    return PromptGenerator(build_backend(g, "generator"), backend_tokenizer(g, "generator"),
                           OmegaConf.to_container(cfg.prompts), g.get("system_prompt"))


def build_solver(cfg):
    s = cfg.difficulty.solver
    if s.backend == "reference_solver":
        return ReferenceSolver(float(s.step_error))
    return ModelSolver(build_backend(s, "difficulty.solver"), backend_tokenizer(s, "difficulty.solver"),
                       cfg.difficulty.get("system_prompt"))


def run(cfg: DictConfig, generator=None, solver=None) -> dict:
    """Run ``cfg.stages`` in order; returns per-stage counts. ``generator``/``solver`` replace the configured ones."""
    check(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _note_config_change(out / "config.yaml", cfg)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    seed, summary, built = int(cfg.seed), {}, []
    try:
        _run_stages(cfg, out, seed, summary, built, generator, solver)
    finally:
        for part in built:  # models and Ray actors this run started
            part.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _run_stages(cfg, out: Path, seed: int, summary: dict, built: list, generator, solver) -> None:
    for stage in STAGES:
        if stage not in cfg.stages:
            continue
        path = out / FILES[stage]
        if stage == "filter":  # a pure function of difficulty.jsonl and filter.*: redone, so a new band applies
            path.unlink(missing_ok=True)
            path.with_suffix(".parquet").unlink(missing_ok=True)
        with StageWriter(path, stage) as writer:
            already = len(writer.done)
            if stage == "concepts":
                sampler = ConceptSampler(load_concepts(cfg.concepts), int(cfg.concepts.per_problem),
                                         cfg.concepts.get("required_groups"))
                ids = writer.todo([f"{cfg.id_prefix}-{seed}-{i}" for i in range(int(cfg.num_problems))])
                for row in concept_rows(sampler, ids, seed):
                    writer.write(row)
            elif stage in ("rationales", "problems"):
                if generator is None:
                    generator = build_generator(cfg)
                    built.append(generator)
                source = "concepts" if stage == "rationales" else "rationales"
                inputs = require_stage_file(out / FILES[source], stage, source)
                produce = generator.rationales if stage == "rationales" else generator.problems
                per_input = cfg.generator.rationales_per_input if stage == "rationales" else cfg.generator.problems_per_input
                _generate_stage(stage, inputs, writer, produce, generator.name, int(per_input), stage[0], seed,
                                int(cfg.generator.batch_size))
            elif stage == "difficulty":
                if solver is None:
                    solver = build_solver(cfg)
                    built.append(solver)
                labels = check_labels(cfg.difficulty.labels)
                scorer = AnswerScorer(float(cfg.difficulty.time_limit_s), fast_integers=bool(cfg.difficulty.fast_integer_check))
                inputs = require_stage_file(out / FILES["problems"], stage, "problems")
                todo = [r for r in inputs if not r.get("error") and r["id"] not in writer.done]
                try:
                    for chunk in _batches(todo, int(cfg.difficulty.batch_size)):
                        seeds = [item_seed(seed, r["id"], "difficulty") for r in chunk]
                        payloads = estimate(chunk, solver, scorer, int(cfg.difficulty.samples), labels, seeds)
                        for src, payload in zip(chunk, payloads):
                            writer.write(_row(src, src["id"], stage, src["generator"], payload))
                finally:
                    scorer.close()
            else:
                band, labels = check_band(cfg.filter.band), list(cfg.filter.get("labels") or [])
                inputs = require_stage_file(out / FILES["difficulty"], stage, "difficulty")
                for row in inputs:
                    if not row.get("error") and keep(row, band, labels):
                        writer.write(training_row(row))
            written = writer.written
        rows = read_rows(path)
        summary[stage] = {"rows": len(rows), "written_now": written, "resumed_from": already,
                          "errors": sum(1 for r in rows if r.get("error"))}
        if stage == "difficulty":
            summary[stage]["labels"] = dict(Counter(r["label"] for r in rows if not r.get("error")))
        if cfg.parquet:
            write_parquet(path)
        log.info("stage %s: %s", stage, summary[stage])


HELP = """\
Stages (each reads the previous stage's file in --out and appends to its own):
  concepts    draw concept combinations from the concept list            -> concepts.jsonl
  rationales  a rationale per combination (how the concepts combine)      -> rationales.jsonl
  problems    a problem + reference answer from concepts + rationale      -> problems.jsonl
  difficulty  pass rate of a solver over k samples, scored with the
              correctness reward (math-verify); label from thresholds     -> difficulty.jsonl
  filter      keep a pass-rate band (and labels) as chat training rows    -> filtered.jsonl (data=files reads it)

Resume: rerun the same command; ids already in a stage file are skipped (a torn last line is dropped);
the filter stage is redone every time (it is cheap), so a new filter.band applies to all rows. Rows already
written keep the settings they were made with: to re-measure difficulty, delete difficulty.jsonl or use a new --out.
Backends: generator.backend = arithmetic (template generator, CPU) | hf | vllm (GPU) | ray (RolloutPool);
difficulty.solver.backend = reference_solver (a SIMULATION: column arithmetic with a per-column slip
probability, for tests and CPU demos; not a model) | hf | vllm | ray. model_path=embedded uses the
embedded tiny model. Prompt templates: prompts.rationale / prompts.problem in the config.

Overrides are key=value pairs on the config, e.g. num_problems=50 difficulty.samples=16
filter.band=[0.2,0.8] difficulty.labels.easy=0.8. Every key is commented in configs/synthesis/*.yaml.

Examples:
  python -m train.synthesis --out runs/synthesis
  python -m train.synthesis --out runs/synthesis --stages concepts,rationales,problems num_problems=1000
  python -m train.synthesis --out runs/synthesis --stages difficulty,filter filter.band=[0.2,0.8]
  python -m train.synthesis --config configs/synthesis/model.yaml --out runs/synth \\
      generator.model_path=/models/Qwen2.5-7B-Instruct difficulty.solver.model_path=/models/Qwen2.5-1.5B-Instruct
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.synthesis", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="PromptCoT-style problem synthesis: concepts -> rationales -> problems -> difficulty -> filter.",
        epilog=HELP,
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="synthesis YAML (default: configs/synthesis/arithmetic.yaml, the CPU embedded default)")
    parser.add_argument("--out", help="output directory (sets out_dir); rerun with the same one to resume")
    parser.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)} (default: the config's `stages`)")
    parser.add_argument("--parquet", action="store_true", help="also write <stage>.parquet when each stage completes")
    parser.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extra = list(args.overrides)
    if args.out:
        extra.append(f"out_dir={args.out}")
    if args.stages:
        extra.append(f"stages=[{args.stages}]")
    if args.parquet:
        extra.append("parquet=true")
    cfg = load_config(args.config, extra)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg))
        return 0
    summary = run(cfg)
    print(json.dumps({"out_dir": str(cfg.out_dir), **summary}, indent=2))
    return 0
