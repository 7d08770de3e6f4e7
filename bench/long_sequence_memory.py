"""Peak memory per trainer rank of one SFT step and one RL update as responses grow: tiled logits and activation
checkpointing on/off (README "Long sequences").

    python bench/long_sequence_memory.py                          # 1k and 4k responses, every configuration
    python bench/long_sequence_memory.py --lengths 16384 --settings plain both --timeout 1800

Each configuration runs in a fresh process (``--worker``), so its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own: one in-process PolicyTrainer rank (world size 1, gloo,
fp32, ZeRO-0, the code path of ``python -m train``: train/workers/policy_trainer.py) on the tiny model of
configs/model/tiny.yaml (hidden 128, 4 layers) with a realistic vocabulary (``--vocab``, default 32,768) and random
weights, on one packed row of a 128-token prompt plus an ``L``-token response:
- SFT: one ``train_step`` with the SFT loss (train/sft/loss.py ``TokenCrossEntropy``).
- RL: one update as the RL step runs it: the pi_old log-prob forward (``PolicyTrainer.logprobs``), then one
  ``train_step`` with the GRPO objective of configs/algorithm/grpo.yaml (train/rl/algorithm.py ``PackedLoss``) plus an
  entropy bonus (``--entropy-coef``), so the entropy is trained through too.
The table also gives each process's resident memory after the engine is built (``start MB``: model, optimizer,
imports), what the step added (``step MB`` = peak - start) and the tokens/s of the step (prompt + response tokens over
the wall time of this first step; RL: both passes).

``--sp 1 2`` adds rows at ``trainer.sequence_parallel_size=2`` (train/models/sequence_parallel.py): the process then
starts a local Ray and a TrainerGroup of SP ranks (one data-parallel group, every rank holding a slice of the row);
``start MB`` / ``peak MB`` are the largest over the ranks (each rank's own ``ru_maxrss``), so the peak is per rank.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPT_TOKENS = 128
SETTINGS = {"plain": (False, False), "tiled": (True, False), "checkpointing": (False, True), "both": (True, True)}


@dataclass(frozen=True)
class Configuration:
    """One measured process: the phase, the response length and the long-sequence settings."""

    phase: str  # "sft" | "rl"
    response_tokens: int
    tiled: bool  # trainer.logits_chunk_tokens = chunk_tokens (else null)
    checkpointing: bool  # trainer.gradient_checkpointing
    sp: int = 1  # trainer.sequence_parallel_size: ranks sharing one sequence (the peak is per rank)

    def trainer_cfg(self, chunk_tokens: int) -> dict:
        return {"lr": 1e-5, "betas": [0.9, 0.95], "weight_decay": 0.0, "max_grad_norm": 1.0, "zero_stage": 0,
                "precision": "fp32", "logits_chunk_tokens": chunk_tokens if self.tiled else None,
                "gradient_checkpointing": self.checkpointing, "sequence_parallel_size": self.sp}


def build_model(directory: Path, vocab: int, max_positions: int) -> str:
    """The tiny model of configs/model/tiny.yaml with a ``vocab``-token vocabulary, random weights, saved once."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny = OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml").tiny
    arch = OmegaConf.to_container(tiny.arch)
    arch["max_position_embeddings"] = max(int(arch["max_position_embeddings"]), max_positions)
    path = directory / f"tiny-vocab{vocab}-pos{arch['max_position_embeddings']}"
    if not (path / "config.json").exists():
        config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=vocab, pad_token_id=0, eos_token_id=1, **arch)
        torch.manual_seed(int(tiny.seed))
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def make_batch(response_tokens: int, vocab: int, seed: int = 0):
    """One packed row: a prompt (no loss) and a response (loss) of random token ids."""
    import torch

    from data_pipelines.packing import Document, collate

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (PROMPT_TOKENS + response_tokens,), generator=gen).tolist()
    doc = Document(ids, [False] * PROMPT_TOKENS + [True] * response_tokens, sample_id="bench")
    return collate([[doc]], pad_token_id=0)


def grpo_loss(normalizer: float, entropy_coef: float):
    """The RL loss of one update: configs/algorithm/grpo.yaml's objective through train/rl/algorithm.py."""
    from hydra import compose, initialize_config_dir

    from train.rl.algorithm import Algorithm, PackedLoss

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=quickstart_rl", "algorithm=grpo",
                                                       f"algorithm.loss.entropy_coef={entropy_coef}"])
    algorithm = Algorithm.from_config(cfg.algorithm)
    return PackedLoss(algorithm.objective, normalizer, algorithm.entropy_bonus)


def measure(config: Configuration, model_path: str, vocab: int, chunk_tokens: int, threads: int,
            entropy_coef: float) -> dict:
    """Run ``config`` in this process (fresh): peak RSS and tokens/s of its step."""
    import torch

    from train.models.forward import per_document
    from train.sft.loss import TokenCrossEntropy
    from train.workers.policy_trainer import PolicyTrainer

    torch.set_num_threads(threads)
    batch = make_batch(config.response_tokens, vocab)
    if config.sp == 1:
        trainer = PolicyTrainer(0, 1, model_path, "sdpa", config.trainer_cfg(chunk_tokens), micro_batches_per_rank=1,
                                num_threads=threads)
        trainer.join(*trainer.open_rendezvous())
    else:  # SP ranks as the recipes start them (Ray actors); each reports its own peak
        from train.workers.actors import TrainerGroup
        from train.workers.ray_session import init_ray

        init_ray(num_cpus=config.sp)
        trainer = TrainerGroup(config.sp, model_path, "sdpa", config.trainer_cfg(chunk_tokens), micro_batches_per_rank=1,
                               num_threads=threads)
    start_kb = max_rss_kb(trainer)
    began = time.perf_counter()
    if config.phase == "sft":
        stats = trainer.train_step([batch], TokenCrossEntropy(config.response_tokens), [{}])
    else:
        old = per_document(trainer.logprobs([batch])[0], batch)[0]  # pi_old, as the RL step records it
        extra = {"advantages": torch.tensor([1.0]), "old_logprobs": old, "ref_logprobs": None}
        stats = trainer.train_step([batch], grpo_loss(float(config.response_tokens), entropy_coef), [extra])
    seconds = time.perf_counter() - began
    peak_kb = max_rss_kb(trainer)
    if config.sp == 1:
        torch.distributed.destroy_process_group()
    else:
        trainer.shutdown()
        stats = stats[0]  # the group's (every rank of one SP group computes the same whole-row loss)
    return {**asdict(config), "start_mb": start_kb / 1024, "peak_mb": peak_kb / 1024, "seconds": seconds,
            "tokens_per_s": batch.input_ids.numel() / seconds, "loss": float(stats["loss_sum"])}


def own_peak_kb(_actor=None) -> int:
    """This process's peak RSS in KiB (Linux ``ru_maxrss``); runs in a rank through ``__ray_call__`` too."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def max_rss_kb(trainer) -> int:
    """The peak RSS so far of the measured rank(s): this process for SP 1, the largest over the Ray ranks else."""
    if not hasattr(trainer, "ranks"):
        return own_peak_kb()
    return max(trainer._get([rank.__ray_call__.remote(own_peak_kb) for rank in trainer.ranks], "peak RSS"))


def run_in_subprocess(config: Configuration, args) -> dict:
    """``measure(config)`` in a fresh interpreter; a failure or timeout becomes a row saying so."""
    command = [sys.executable, __file__, "--worker", json.dumps(asdict(config)), "--model", args.model_path,
               "--vocab", str(args.vocab), "--chunk-tokens", str(args.chunk_tokens), "--threads", str(args.threads),
               "--entropy-coef", str(args.entropy_coef)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # the ranks import this tree
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {**asdict(config), "error": f"over {args.timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**asdict(config), "error": f"exit {done.returncode}: {tail[:120]}"}
    return json.loads(lines[-1][len("RESULT "):])


def table(rows: list[dict]) -> str:
    header = ("| phase | response tokens | SP | tiled logits | checkpointing | start MB | peak MB | step MB | "
              "peak / plain | tokens/s |")
    lines = [header, "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    plain = {(r["phase"], r["response_tokens"]): r["peak_mb"] for r in rows
             if "peak_mb" in r and r["sp"] == 1 and not r["tiled"] and not r["checkpointing"]}
    for r in rows:
        head = (f"| {r['phase'].upper()} | {r['response_tokens']:,} | {r['sp']} | {'on' if r['tiled'] else 'off'} | "
                f"{'on' if r['checkpointing'] else 'off'} |")
        if "error" in r:
            lines.append(f"{head} not measured: {r['error']} | | | | |")
            continue
        base = plain.get((r["phase"], r["response_tokens"]))
        ratio = f"{r['peak_mb'] / base:.2f}" if base else ""
        lines.append(f"{head} {r['start_mb']:,.0f} | {r['peak_mb']:,.0f} | {r['peak_mb'] - r['start_mb']:,.0f} | {ratio} | "
                     f"{r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096], help="response tokens")
    parser.add_argument("--phases", nargs="+", default=["sft", "rl"], choices=["sft", "rl"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="plain | tiled (logits) | checkpointing | both")
    parser.add_argument("--vocab", type=int, default=32_768)
    parser.add_argument("--chunk-tokens", type=int, default=4096, help="trainer.logits_chunk_tokens when tiled")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each measured process")
    parser.add_argument("--entropy-coef", type=float, default=0.001, help="RL: the entropy bonus (0: no entropy grad)")
    parser.add_argument("--sp", type=int, nargs="+", default=[1], help="trainer.sequence_parallel_size values")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per configuration")
    parser.add_argument("--cache", default=str(REPO / ".cache" / "bench"), help="where the model is saved")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one Configuration as JSON
    parser.add_argument("--model", dest="model_path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        config = Configuration(**json.loads(args.worker))
        result = measure(config, args.model_path, args.vocab, args.chunk_tokens, args.threads, args.entropy_coef)
        print("RESULT " + json.dumps(result), flush=True)
        return
    args.model_path = build_model(Path(args.cache), args.vocab, PROMPT_TOKENS + max(args.lengths))
    rows = []
    for length in args.lengths:
        for phase in args.phases:
            for sp in args.sp:
                for setting in args.settings:
                    row = run_in_subprocess(Configuration(phase, length, *SETTINGS[setting], sp=sp), args)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"vocab {args.vocab:,}, chunk {args.chunk_tokens:,} tokens, prompt {PROMPT_TOKENS} tokens, "
          f"{args.threads} thread(s) per process, fp32, ZeRO-0; SP {args.sp}: peak per rank")
    print(table(rows))


if __name__ == "__main__":
    main()
