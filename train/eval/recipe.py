"""Evaluation recipe: a checkpoint's greedy answer and k sampled answers per problem of a data set, scored by
math-verify (the RL correctness reward's time-limited check), reported as accuracy, pass@k, maj@k, response
length (mean, p90) and truncation rate, overall and per source / difficulty column.

Reads top to bottom: check config, load the problems (bad rows fail here, before the model is built), build the
generator (``rollout.backend``: hf on CPU or GPU, vllm on GPU), generate, score, write
``{run_dir}/eval_results.json``, ``eval_samples.jsonl`` and W&B tables.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from data_pipelines.loading import check_files, load_split
from data_pipelines.prompts import to_prompts
from train.eval.metrics import length_stats, majority_correct, pass_at_k, vote_answer
from train.models.evaluate import AnswerScorer
from train.models.model_zoo import load_tokenizer, resolve_model_path
from train.models.runtime import resolve_device, seed_everything
from train.run.checkpoint import resolve_model_dir
from train.run.config_checks import ConfigError
from train.run.run_logger import RunLogger

log = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    """Bad values stop here, each naming its key."""
    e = cfg.eval
    if OmegaConf.is_missing(cfg.model, "path") or not cfg.model.get("path"):
        raise ConfigError("model.path is required: the checkpoint (or run directory) to evaluate, e.g. "
                          "model.path=runs/2026-12-03/12-00-00")
    if cfg.data.source == "files":
        if OmegaConf.is_missing(cfg.data, "eval_files") or not cfg.data.eval_files:
            raise ConfigError("data.eval_files is empty: give the file(s) to evaluate, e.g. data.eval_files=[test.jsonl]")
        check_files(cfg.data.eval_files, "data.eval_files")
    if e.samples < 0:
        raise ConfigError(f"eval.samples={e.samples} must be >= 0 (0 = greedy only)")
    for key in ("pass_k", "maj_k"):  # with samples=0 only the greedy metrics (and pass@1 = greedy accuracy) exist
        bad = [k for k in e[key] if not 1 <= k <= e.samples] if e.samples else []
        if bad:
            raise ConfigError(f"eval.{key}={list(e[key])}: each k must be in [1, eval.samples={e.samples}]; raise "
                              "eval.samples or drop those k")
    if e.samples and e.temperature <= 0:
        raise ConfigError(f"eval.temperature={e.temperature} must be > 0 for the sampled responses (greedy is always run)")
    if e.time_limit_s <= 0:
        raise ConfigError(f"eval.time_limit_s={e.time_limit_s} must be > 0")
    if cfg.rollout.backend not in ("hf", "vllm"):
        raise ConfigError(f"rollout.backend={cfg.rollout.backend!r} must be hf or vllm")


def build_generator(cfg: DictConfig, model_path: str):
    """The rollout backend: RolloutWorker (hf) or VLLMRolloutWorker (vllm); both ``generate(prompts, group_size,
    max_new_tokens, temperature, top_p, seed)`` -> Rollout records grouped by prompt."""
    if cfg.rollout.backend == "vllm":
        try:
            from train.workers.vllm_worker import VLLMRolloutWorker
        except ImportError as err:
            raise ConfigError(str(err)) from None
        if not torch.cuda.is_available():
            raise ConfigError("rollout.backend=vllm needs a CUDA GPU; use rollout.backend=hf on this machine")
        return VLLMRolloutWorker(model_path, seed=cfg.seed)
    from train.workers.rollout_worker import RolloutWorker

    return RolloutWorker(model_path, seed=cfg.seed, device=str(resolve_device(cfg.cluster.device)),
                         num_threads=cfg.cluster.get("num_threads"))


def generate_all(generator, texts: list[str], group_size: int, e, temperature: float, seed: int) -> list:
    """``group_size`` rollouts per prompt, prompt 0's first, in batches of ``eval.batch_size`` prompts."""
    rollouts = []
    for start in range(0, len(texts), e.batch_size):
        rollouts.extend(generator.generate(texts[start : start + e.batch_size], group_size, e.max_new_tokens,
                                           temperature=temperature, top_p=e.top_p, seed=seed + start))
    return rollouts


def problem_metrics(problems: list[dict], e) -> dict:
    """The metrics over ``problems`` (each: greedy and sampled correctness, votes, lengths, truncation)."""
    greedy = [p["greedy"] for p in problems]
    metrics = {"problems": len(problems), "greedy/accuracy": sum(g["correct"] for g in greedy) / len(problems),
               "greedy/truncation_rate": sum(g["truncated"] for g in greedy) / len(problems),
               **{f"greedy/{k}": v for k, v in length_stats([g["length"] for g in greedy]).items()}}
    n = e.samples
    if n:
        sampled = [s for p in problems for s in p["samples"]]
        correct_counts = [sum(s["correct"] for s in p["samples"]) for p in problems]
        for k in e.pass_k:
            metrics[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct_counts) / len(problems)
        for k in e.maj_k:
            metrics[f"maj@{k}"] = sum(majority_correct([s["vote"] for s in p["samples"][:k]],
                                                       [s["correct"] for s in p["samples"][:k]]) for p in problems) / len(problems)
        metrics["sampled/truncation_rate"] = sum(s["truncated"] for s in sampled) / len(sampled)
        metrics.update({f"sampled/{k}": v for k, v in length_stats([s["length"] for s in sampled]).items()})
    elif 1 in e.pass_k:  # no samples: pass@1 is the greedy accuracy
        metrics["pass@1"] = metrics["greedy/accuracy"]
    return metrics


def breakdowns(problems: list[dict], e) -> dict:
    """{column: {value: metrics}} for every ``eval.breakdown`` column that the rows carry."""
    result = {}
    for column in e.breakdown or []:
        groups: dict[str, list[dict]] = {}
        for p in problems:
            value = p["meta"].get(column)
            if isinstance(value, dict):  # e.g. synthetic rows' difficulty {"digits": 2, "num_ops": 1}
                value = ",".join(f"{k}={v}" for k, v in sorted(value.items()))
            if isinstance(value, (str, int, float, bool)):
                groups.setdefault(str(value), []).append(p)
        if groups:
            result[column] = {value: problem_metrics(group, e) for value, group in sorted(groups.items())}
    return result


def run(cfg: DictConfig) -> dict:
    check(cfg)
    seed_everything(cfg.seed)
    if cfg.cluster.get("num_threads"):
        torch.set_num_threads(cfg.cluster.num_threads)
    rows = load_split(cfg.data, "eval")
    if cfg.eval.max_problems:
        rows = rows[: cfg.eval.max_problems]
    with open_dict(cfg):
        cfg.model.path = str(resolve_model_dir(cfg.model.path))  # a run directory means its latest checkpoint
    model_path = str(resolve_model_path(cfg.model))
    prompts = to_prompts(load_tokenizer(model_path), rows, cfg.data.system_prompt)  # the model's own chat template
    e, texts = cfg.eval, [p.text for p in prompts]
    log.info("eval: %d problems from %s, model %s, greedy + %d samples, backend %s", len(rows),
             list(cfg.data.eval_files) if cfg.data.source == "files" else "synthetic", model_path, e.samples, cfg.rollout.backend)

    generator = build_generator(cfg, model_path)
    greedy = generate_all(generator, texts, 1, e, 0.0, cfg.seed)
    sampled = generate_all(generator, texts, e.samples, e, e.temperature, cfg.seed) if e.samples else []
    scorer = AnswerScorer(time_limit_s=e.time_limit_s, answer_after=e.answer_after)
    try:
        answers = [p.answer for p in prompts]
        greedy_correct = scorer([r.response_text for r in greedy], answers)
        sampled_correct = scorer([r.response_text for r in sampled], [a for a in answers for _ in range(e.samples)])
    finally:
        scorer.close()

    def record(rollout, correct):
        return {"response": rollout.response_text, "correct": bool(correct), "length": len(rollout.response_ids),
                "truncated": bool(rollout.truncated), "vote": vote_answer(rollout.response_text, e.answer_after)}

    problems = []
    for i, prompt in enumerate(prompts):
        block = range(i * e.samples, (i + 1) * e.samples)
        problems.append({"id": prompt.prompt_id, "prompt": prompt.text, "answer": prompt.answer, "meta": prompt.meta,
                         "greedy": record(greedy[i], greedy_correct[i]),
                         "samples": [record(sampled[j], sampled_correct[j]) for j in block]})
    results = {"model": model_path, "data": OmegaConf.to_container(cfg.data, resolve=True), "samples": e.samples,
               "temperature": e.temperature, "top_p": e.top_p, "max_new_tokens": e.max_new_tokens,
               "metrics": problem_metrics(problems, e), "breakdown": breakdowns(problems, e)}
    return write(cfg, results, problems)


def write(cfg: DictConfig, results: dict, problems: list[dict]) -> dict:
    """eval_results.json, eval_samples.jsonl, metrics under eval/ and W&B tables (metrics per group, samples)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results_path = run_dir / "eval_results.json"
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    with (run_dir / "eval_samples.jsonl").open("w") as f:
        for p in problems:
            f.write(json.dumps({k: v for k, v in p.items() if k != "meta"} | {"meta": {k: v for k, v in p["meta"].items()
                                                                                     if isinstance(v, (str, int, float, bool))}}) + "\n")
    logger = RunLogger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True))
    logger.log({f"eval/{k}": v for k, v in results["metrics"].items()}, 0)
    table = [{"group": "all", **results["metrics"]}]
    for column, groups in results["breakdown"].items():
        table.extend({"group": f"{column}={value}", **metrics} for value, metrics in groups.items())
    columns = sorted({c for row in table for c in row} - {"group"})
    logger.log_samples("eval/results", [{"group": row["group"], **{c: row.get(c) for c in columns}} for row in table], 0)
    logger.log_samples("eval/samples", [{"prompt": p["prompt"], "answer": p["answer"], "greedy": p["greedy"]["response"],
                                         "greedy_correct": p["greedy"]["correct"]} for p in problems[:32]], 0)
    logger.finish()
    m = results["metrics"]
    shown = ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k.startswith(("pass@", "maj@")))
    print(f"eval on {m['problems']} problems: greedy accuracy {m['greedy/accuracy']:.3f}" + (f", {shown}" if shown else ""))
    for column, groups in results["breakdown"].items():
        for value, gm in groups.items():
            print(f"  {column}={value} ({gm['problems']}): greedy {gm['greedy/accuracy']:.3f}"
                  + "".join(f", {k} {v:.3f}" for k, v in gm.items() if k.startswith(("pass@", "maj@"))))
    print(f"results:    {results_path}")
    if logger.wandb_dir:
        print(f"wandb run:  {logger.wandb_dir}")
    return results
