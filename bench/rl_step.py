"""Time per RL step, split by phase: our RL recipe vs TRL's GRPOTrainer, same model, prompts, batch and budget.

    python bench/rl_step.py                                  # P 8 prompts x G 8, 96 new tokens, 2 warm-up + 5 steps
    python bench/rl_step.py --no-async                       # ours on-policy vs TRL only
    python bench/rl_step.py --world-size 2 --workers 2       # ours with 2 trainer ranks and 2 rollout workers
    python bench/rl_step.py --model-path runs/<date>/<time>/checkpoints/step_1500   # a trained policy
    python bench/rl_step.py --ours data.max_seq_len=160 trainer.row_tokens=160   # rows sized to the rollouts
    python bench/rl_step.py --trl-threads 1                  # TRL's process on one torch thread
    python bench/rl_step.py --no-async --rounds 3            # ours, TRL, TRL, ours, ours, TRL: step times pooled
    python bench/rl_step.py --no-compile --workers 1         # ours eager, one rollout worker on every core

Both sides run GRPO (beta 0 unless --beta, clip 0.2, seq-mean-token-mean = TRL loss_type "grpo", AdamW lr 2e-5,
betas 0.9/0.95, grad clip 1.0, fp32, sdpa) on the same weights (the embedded tiny model unless --model-path),
the same P prompts per step in the same order (our cfg.sampler; TRL gets them as an unshuffled dataset), G
samples each at temperature 1 with at most L new tokens, and the same reward (our configured reward, by default
correctness + format). Each optimizer step sees all P*G completions in one update (ours: one micro-batch per
rank; TRL: per_device_train_batch_size = P*G, one generation batch per step).

Measured, after --warmup steps (DeepSpeed/Ray/allocator first-use costs) and over the next --steps steps:
- s/step (wall): time between the ends of consecutive steps, i.e. everything the loop does per step (ours:
  between two per-step metric logs; TRL: between two ``on_step_end`` callbacks). Start-up (Ray, actors,
  DeepSpeed init, model loads) and the end of the run (our final eval and checkpoint) are outside it.
- phases: ours from the recipe's own perf/time_* metrics (generation = Ray round trip to the rollout worker;
  old log-probs and update = Ray round trips to the trainer ranks; weight sync = gather + object store + load);
  TRL by timing its own methods (_generate, _calculate_rewards, _generate_and_score_completions, compute_loss).
  "other" is wall minus the listed phases (ours: packing, per_document, advantages, metrics, logging; TRL:
  tokenizing/padding/advantages inside scoring, dataloader, callbacks).
Completion lengths of both sides are printed: with temperature-1 sampling from the same weights they should be
close; tokens/s divides generated tokens by wall time, so it stays comparable when they differ.
Sides: "ours" is the recipe on-policy (rollout.async_steps=0: generate, then update); "ours async" is
rollout.async_steps=1 (the next step's rollouts are generated during this step's update, so they are one policy
version old when trained on: a different algorithm from TRL's on-policy GRPO, reported apart); TRL last.
Ours by default: one rollout worker per core (--workers; on CPU two one-thread processes generate faster than one
two-thread process: a decode step of a small model is many small ops that a second thread barely speeds up) and
trainer.compile=true (the trainer rank's forward under torch.compile, train/models/compiled.py; it compiles during
the warm-up steps, which "run total" includes; --no-compile for eager). TRL as GRPOTrainer runs by default (its
torch_compile with --trl-compile: measured slower here, as its generate goes through the compiled model).
--rounds N runs the sides N times in alternating order and pools their measured steps: the speed of this shared
machine drifts over minutes, and one side measured in a slow minute would otherwise decide the ratio.
Threads: on CPU the recipe gives every phase all cores when phases alternate (trainer ranks cpu_count //
world_size, rollout workers cpu_count // workers) and splits them in half when generation overlaps the update; TRL
runs in this process on every core (os.cpu_count(), whatever OMP_NUM_THREADS the shell exports) unless
--trl-threads. On a CPU shared with other jobs, a multi-threaded process can lose several times its speed (OpenMP
threads wait for each other), so look at the load averages printed and compare within one run only: the speed
ratios printed (of median s/step) are measured in this one run and are not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402

OUR_PHASES = ("generation", "reward", "old_logprobs", "reference", "update", "weight_sync")


def compose_config(args, run_dir: str, extra: tuple = ()):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    overrides = [
        "experiment=quickstart_rl",
        "algorithm=grpo",
        f"algorithm.group_size={args.group}",
        f"algorithm.kl.beta={args.beta}",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"rollout.num_workers={args.workers}",
        f"trainer.compile={compile_flag(args)}",
        f"trainer.world_size={args.world_size}",
        f"trainer.max_steps={args.warmup + args.steps}",
        "trainer.eval_at_start=false",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "trainer.resume=null",
        "data.synthetic.eval.num_samples=4",  # the recipe's final eval runs after the measured steps; keep it short
        "logger.mode=disabled",
        f"model.cache_dir={REPO / '.cache' / 'models'}",
        f"seed={args.seed}",
        f"model.path={args.model_path or 'null'}",  # null: the embedded tiny model, whatever the experiment starts from
        *extra,
        *args.ours,
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.run_dir = run_dir
    return cfg


def compile_flag(args) -> str:
    """trainer.compile of our side, as a Hydra value: --no-compile turns it off; callers without the option
    (bench/rl_scaling.py, bench/gpu_check.py) run eager."""
    return str(getattr(args, "compile", False)).lower()


def step_prompts(cfg, num_steps: int) -> list[list]:
    """The prompts our recipe draws at each step (same data, same sampler, same seed). Exact for samplers that
    do not adapt to rewards (the default ``sampler=uniform``)."""
    from hydra.utils import instantiate

    from data_pipelines.loading import load_split
    from data_pipelines.prompts import to_prompts
    from train.models.model_zoo import load_tokenizer

    tokenizer = load_tokenizer(model_path_of(cfg))  # its chat template renders the prompts
    prompts = to_prompts(tokenizer, load_split(cfg.data, "train", require_assistant=False), cfg.data.system_prompt)
    sampler = instantiate(cfg.sampler, prompts=prompts, batch_size=cfg.rollout.prompts_per_step, seed=cfg.seed)
    return [sampler.next() for _ in range(num_steps)]


def model_path_of(cfg) -> str:
    """The weights both sides start from (a run directory means its latest checkpoint, as in the recipe)."""
    from train.models.model_zoo import resolve_model_path
    from train.run.checkpoint import resolve_model_dir

    if cfg.model.get("path"):
        return str(resolve_model_dir(cfg.model.path))
    return str(resolve_model_path(cfg.model))


# -- ours ------------------------------------------------------------------------------------------------------
def run_ours(cfg, warmup: int) -> dict:
    """Our recipe end to end; per-step wall time from the moments it logs each step's metrics."""
    import ray

    from train.rl.recipe import run

    stamps: list[float] = []

    def clock(step: int, metrics: dict) -> None:
        if "reward/total" in metrics:  # an update's step (not a skipped one)
            stamps.append(time.perf_counter())

    start, load_before = time.perf_counter(), os.getloadavg()[0]
    out = run(cfg, on_step=clock)
    total = time.perf_counter() - start
    ray.shutdown()
    history = out["history"]
    if len(history) != len(stamps) or len(history) <= warmup:
        raise RuntimeError(f"ours: {len(history)} updates logged for {len(stamps)} steps; expected > {warmup} (skipped updates?)")
    measured = history[warmup:]
    walls = [b - a for a, b in zip(stamps[warmup - 1 :], stamps[warmup:])]
    phases = {p: statistics.mean(h.get(f"perf/time_{p}", 0.0) for h in measured) for p in OUR_PHASES}
    return {
        "phases": phases,
        "wall": statistics.mean(walls),
        "walls": walls,
        "length": statistics.mean(h["rollout/response_length_mean"] for h in measured),
        "reward": statistics.mean(h["reward/total"] for h in measured),
        "total": total,
        "load": (load_before, os.getloadavg()[0]),
        "threads": "{}/rank, {}/rollout worker".format(*threads_of(cfg)),
    }


def threads_of(cfg) -> tuple:
    """Torch threads per trainer rank and per rollout worker, as the recipe sets them."""
    from train.run.threads import cpu_threads

    overlap = int(cfg.rollout.get("async_steps", 0)) == 1
    trainer, rollout = cpu_threads(os.cpu_count() or 1, cfg.trainer.world_size, cfg.rollout.num_workers, overlap,
                                   cfg.cluster.placement)
    return cfg.trainer.get("num_threads") or trainer, cfg.rollout.get("num_threads") or rollout


def default_workers(prompts: int) -> int:
    """Rollout workers when --workers is not given: one per core (each on one thread), at most one per prompt."""
    return max(1, min(os.cpu_count() or 1, prompts))


# -- TRL -------------------------------------------------------------------------------------------------------
def trl_threads(requested: int | None) -> int:
    """Torch threads of the TRL side: ``--trl-threads``, else every core. Not torch's default: that follows an
    OMP_NUM_THREADS inherited from the shell (``OMP_NUM_THREADS=1 python bench/rl_step.py`` would run TRL on one
    thread while our recipe sets every process's count itself, train/run/threads.py)."""
    return int(requested) if requested else (os.cpu_count() or 1)


def trl_config(cfg, args, output_dir: str, **overrides):
    """GRPOConfig matching our run: one optimizer step per generation batch of P*G completions (trl 1.16:
    per_device_train_batch_size counts completions; generation_batch_size defaults to it times
    steps_per_generation = gradient_accumulation_steps = 1), the same sampling, loss and optimizer. ``overrides``:
    GRPOConfig arguments that replace these (bench/gpu_check.py: GPU, bf16, vLLM colocate)."""
    from trl import GRPOConfig

    t_cfg = cfg.trainer
    return GRPOConfig(**{**dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,  # TRL defaults to gradient checkpointing; ours does not recompute activations
        per_device_train_batch_size=args.prompts * args.group,  # completions per micro-batch: the whole step
        gradient_accumulation_steps=1,
        num_generations=args.group,
        max_completion_length=args.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=0,
        beta=args.beta,
        epsilon=0.2,
        loss_type="grpo",  # seq-mean-token-mean, as our algorithm=grpo
        scale_rewards="group",
        num_iterations=1,
        shuffle_dataset=False,  # the dataset is already our sampler's order
        max_steps=args.warmup + args.steps,
        learning_rate=float(t_cfg.lr),
        adam_beta1=float(t_cfg.betas[0]),
        adam_beta2=float(t_cfg.betas[1]),
        weight_decay=float(t_cfg.weight_decay),
        max_grad_norm=float(t_cfg.max_grad_norm),
        optim="adamw_torch",
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=args.seed,
    ), **overrides})


def run_trl(cfg, batches: list[list], args, output_dir: str, **config_overrides) -> dict:
    """TRL's GRPOTrainer on the same prompts; per-step wall from on_step_end, phases by timing its methods.
    ``config_overrides``: see ``trl_config``."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from rewards.registry import build_reward
    from train.models.model_zoo import load_model, load_tokenizer

    model_path = model_path_of(cfg)
    ordered = [p for batch in batches for p in batch]  # row i of the dataset is ordered[i]
    dataset = Dataset.from_list([{"prompt": p.text, "prompt_index": i} for i, p in enumerate(ordered)])
    reward_fn = build_reward(cfg.reward)
    tokenizer = load_tokenizer(model_path)
    eos = tokenizer.eos_token_id
    lengths: list[list[int]] = []  # completion lengths, one list per step
    rewards: list[float] = []  # mean reward, one per step

    def reward(prompts, completions, completion_ids, prompt_index, **_):
        """Our reward, with the metadata our recipe passes (answer, difficulty, truncated)."""
        owners = [ordered[i] for i in prompt_index]
        lengths.append([len(c) for c in completion_ids])
        total, _, _ = reward_fn(
            [p.text for p in owners], completions, completion_ids,
            [{**p.meta, "answer": p.answer, "truncated": eos not in c} for p, c in zip(owners, completion_ids)],
            step=len(lengths) - 1, group_size=args.group,
        )
        rewards.append(total.mean().item())
        return total.tolist()

    config = trl_config(cfg, args, output_dir, **config_overrides)
    ends: list[float] = []
    spans: list[float] = []
    phases: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.begin = time.perf_counter()
            phases.append({})

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            spans.append(now - self.begin)
            ends.append(now)

    start = time.perf_counter()
    model = load_model(model_path, cfg.model.attn_backend, torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])
    for name in ("_generate", "_calculate_rewards", "_generate_and_score_completions", "compute_loss"):
        method = getattr(trainer, name)

        def timed(*a, _method=method, _name=name, **k):
            t = time.perf_counter()
            try:
                return _method(*a, **k)
            finally:
                phases[-1][_name] = phases[-1].get(_name, 0.0) + time.perf_counter() - t

        setattr(trainer, name, timed)
    load_before = os.getloadavg()[0]
    trainer.train()
    total = time.perf_counter() - start
    reward_fn.close()
    warmup = args.warmup
    walls = [b - a for a, b in zip(ends[warmup - 1 :], ends[warmup:])]
    measured = phases[warmup:]
    mean = lambda key: statistics.mean(p.get(key, 0.0) for p in measured)  # noqa: E731
    generation, reward_s, scoring = mean("_generate"), mean("_calculate_rewards"), mean("_generate_and_score_completions")
    update = statistics.mean(spans[warmup:]) - scoring
    return {
        "phases": {"generation": generation, "reward": reward_s, "scoring_other": scoring - generation - reward_s,
                   "update": update, "update_forward": mean("compute_loss")},
        "wall": statistics.mean(walls),
        "walls": walls,
        "length": statistics.mean(statistics.mean(step) for step in lengths[warmup:]),
        "reward": statistics.mean(rewards[warmup:]),
        "total": total,
        "load": (load_before, os.getloadavg()[0]),
        "threads": f"{torch.get_num_threads()} (one process)",
    }


# -- report ----------------------------------------------------------------------------------------------------
def report(args, sides: dict) -> None:
    """One table, a column per side run (ours on-policy, ours with rollout.async_steps=1, TRL)."""
    completions = args.prompts * args.group
    fmt = lambda v: f"{'-':>12s}" if v is None else f"{v:12.3f}"  # noqa: E731
    names = list(sides)

    def per_side(ours_value, trl_value):
        return [trl_value(sides[n]) if n == "TRL" else ours_value(sides[n]) for n in names]

    def trl_other(t):
        p = t["phases"]
        return t["wall"] - (p["generation"] + p["reward"] + p["scoring_other"] + p["update"])

    rows = [
        ("generation (ours: waited for; async: the part not overlapped)", per_side(lambda o: o["phases"]["generation"], lambda t: t["phases"]["generation"])),
        ("reward", per_side(lambda o: o["phases"]["reward"], lambda t: t["phases"]["reward"])),
        ("old log-probs (ours: extra forward; TRL: detached update logps)", per_side(lambda o: o["phases"]["old_logprobs"], lambda t: None)),
        ("reference log-probs (beta > 0; TRL: inside scoring rest)", per_side(lambda o: o["phases"]["reference"] if args.beta > 0 else None, lambda t: None)),
        ("TRL scoring rest (tokenize, pad, advantages[, ref])", per_side(lambda o: None, lambda t: t["phases"]["scoring_other"])),
        ("update (forward + backward + optimizer)", per_side(lambda o: o["phases"]["update"], lambda t: t["phases"]["update"])),
        ("  of which loss forward (TRL compute_loss)", per_side(lambda o: None, lambda t: t["phases"]["update_forward"])),
        ("weight sync (ours: trainer -> rollout worker)", per_side(lambda o: o["phases"]["weight_sync"], lambda t: None)),
        ("other (packing, advantages, metrics, logging, loop)", per_side(lambda o: o["wall"] - sum(o["phases"].values()), trl_other)),
    ]
    print(f"\nRL step, ours vs TRL GRPOTrainer: P {args.prompts} prompts x G {args.group}, max_new_tokens "
          f"{args.max_new_tokens}, beta {args.beta}, model {args.model_path or 'embedded tiny'}; ours: world_size "
          f"{args.world_size}, rollout workers {args.workers}, trainer.compile={compile_flag(args)}"
          f"{', ' + ' '.join(args.ours) if args.ours else ''}; TRL torch_compile={getattr(args, 'trl_compile', False)}")
    loads = ", ".join(f"{n} {sides[n]['load'][0]:.1f}/{sides[n]['load'][1]:.1f}" for n in names)
    rounds = getattr(args, "rounds", 1)
    print(f"phases: mean over {args.steps} steps after {args.warmup} warm-up"
          f"{f', in each of {rounds} rounds (sides alternating; step times pooled)' if rounds > 1 else ''}; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs; 1-min load average (start/end of each side): {loads}")
    header = f"{'seconds per step':66s}" + "".join(f"{n:>12s}" for n in names)
    print(header)
    print("-" * len(header))
    for name, values in rows:
        print(f"{name:66s}" + "".join(fmt(v) for v in values))
    print("-" * len(header))
    for label, stat in (("s/step (wall, end to end), mean", statistics.mean), ("  median", statistics.median),
                        ("  fastest step", min), ("  slowest step", max)):
        print(f"{label:66s}" + "".join(fmt(stat(sides[n]["walls"])) for n in names))
    print(f"{'mean completion length (tokens)':66s}" + "".join(f"{sides[n]['length']:12.1f}" for n in names))
    print(f"{'mean reward':66s}" + "".join(f"{sides[n]['reward']:12.3f}" for n in names))
    print(f"{'generated tokens/s (end to end, mean s/step)':66s}"
          + "".join(f"{completions * sides[n]['length'] / sides[n]['wall']:12.0f}" for n in names))
    print(f"{'run total incl. start-up and teardown (s)':66s}" + "".join(f"{sides[n]['total']:12.1f}" for n in names))
    for n in names:
        print(f"torch threads, {n}: {sides[n]['threads']}")
    if "TRL" not in sides:
        return
    trl = sides["TRL"]
    print()
    for n in names:
        if n == "TRL":
            continue
        ours = sides[n]
        ratio = lambda stat: stat(trl["walls"]) / stat(ours["walls"])  # noqa: E731
        per_token = ratio(statistics.median) * ours["length"] / trl["length"]
        print(f"{n}/TRL speedup = TRL s/step / {n} s/step: median {ratio(statistics.median):.2f}x, mean "
              f"{ratio(statistics.mean):.2f}x, fastest steps {ratio(min):.2f}x; per generated token (median) "
              f"{per_token:.2f}x; target >= 1.5x (median): {'met' if ratio(statistics.median) >= 1.5 else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8, help="P: prompts per step")
    parser.add_argument("--group", type=int, default=8, help="G: completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="L: generation budget")
    parser.add_argument("--steps", type=int, default=5, help="measured steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps run first and not measured (>= 1)")
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (> 0 adds a reference model on both sides)")
    parser.add_argument("--workers", type=int, default=None,
                        help="ours: rollout worker actors (default: one per core, at most P; see Threads above)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="ours without trainer.compile (default: on; the compilation falls in the warm-up steps)")
    parser.add_argument("--trl-compile", action="store_true", help="TRL with torch_compile=True (its training forward)")
    parser.add_argument("--world-size", type=int, default=1, help="ours: trainer ranks")
    parser.add_argument("--model-path", default=None, help="a local HF checkpoint or run dir (default: the embedded tiny model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["ours", "async", "trl"], default=None, help="run one side (prints its numbers)")
    parser.add_argument("--no-async", action="store_true", help="skip the rollout.async_steps=1 side")
    parser.add_argument("--trl-threads", type=int, default=None, help="torch threads of the TRL process (default: every core)")
    parser.add_argument("--trl-first", action="store_true", help="run TRL before ours (load on the machine drifts)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the sides this many times, alternating their order; the step times are pooled")
    parser.add_argument("--ours", nargs="*", default=[],
                        help="extra Hydra overrides of our config, e.g. trainer.row_tokens=160 (its data, reward and "
                        "rollout sampling keys also set TRL's prompts, reward and temperature)")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (a step's wall time runs from the previous step's end)")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.workers is None:
        args.workers = default_workers(args.prompts)

    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_rl_step_") as tmp:
        cfg = compose_config(args, str(Path(tmp) / "ours"), ("rollout.async_steps=0",))
        runs: dict[str, list[dict]] = {}

        def ours(tag: str) -> dict:
            return run_ours(compose_config(args, str(Path(tmp) / f"ours{tag}"), ("rollout.async_steps=0",)), args.warmup)

        def ours_async(tag: str) -> dict:
            return run_ours(compose_config(args, str(Path(tmp) / f"async{tag}"), ("rollout.async_steps=1",)), args.warmup)

        def trl(tag: str) -> dict:
            threads = torch.get_num_threads()
            torch.set_num_threads(trl_threads(args.trl_threads))
            try:
                with contextlib.chdir(tmp):
                    return run_trl(cfg, step_prompts(cfg, args.warmup + args.steps), args, str(Path(tmp) / f"trl{tag}"),
                                   **({"torch_compile": True} if args.trl_compile else {}))
            finally:
                torch.set_num_threads(threads)

        sides = {"ours": ours, "async": ours_async, "trl": trl}
        for index, name in enumerate(side_order(args)):
            r = sides[name](str(index))
            runs.setdefault(name, []).append(r)
            print(f"{name}: {r['wall']:.3f} s/step, phases " + ", ".join(f"{k} {v:.3f}" for k, v in r["phases"].items())
                  + f"; completion length {r['length']:.1f}", flush=True)
        labels = {"ours": "ours", "async": "ours async", "trl": "TRL"}
        if len(runs) >= 2:
            report(args, {labels[n]: merge_rounds(runs[n]) for n in ["ours", "async", "trl"] if n in runs})


def side_order(args) -> list[str]:
    """The sides to run, round after round (--rounds): ours, async, TRL in the first round (TRL first with
    --trl-first), the order reversed in every other round, so that a machine that slows down or speeds up during
    the run weighs on every side alike."""
    order = ["trl", "ours", "async"] if args.trl_first else ["ours", "async", "trl"]
    order = [n for n in order if args.only in (None, n) and not (n == "async" and args.no_async)]
    return [n for r in range(args.rounds) for n in (order if r % 2 == 0 else order[::-1])]


def merge_rounds(results: list[dict]) -> dict:
    """One side's rounds as one result: every measured step's wall time pooled (the medians are over all of them),
    phases, lengths and rewards averaged over the rounds, the run totals averaged, the load of the first start and
    the last end."""
    if len(results) == 1:
        return results[0]
    mean = lambda key: statistics.mean(r[key] for r in results)  # noqa: E731
    return {
        "phases": {p: statistics.mean(r["phases"][p] for r in results) for p in results[0]["phases"]},
        "walls": [w for r in results for w in r["walls"]],
        "wall": statistics.mean(w for r in results for w in r["walls"]),
        "length": mean("length"), "reward": mean("reward"), "total": mean("total"),
        "load": (results[0]["load"][0], results[-1]["load"][1]),
        "threads": results[0]["threads"],
    }


if __name__ == "__main__":
    main()
