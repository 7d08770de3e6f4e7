"""Peak memory per rank (RSS, CPU) of one SFT step with Ulysses sequence parallelism (trainer.sequence_parallel_size)
off and on: a row of T tokens (4 packed documents of different lengths), one micro-batch, on SP ranks (gloo).

    python bench/sequence_parallel_memory.py                          # T 4096 and 16384, SP 1 and 2, vocab 32000
    python bench/sequence_parallel_memory.py --tokens 4096 --sp 2     # one configuration

Each configuration starts fresh trainer ranks (train/workers/actors.py TrainerGroup, world size = SP: one
data-parallel group) on a tiny Qwen2 model (hidden 64, 2 layers, 4 heads, 2 key/value heads) with a realistic
vocabulary, so that the tokens x vocabulary logits dominate as they do for long reasoning traces. Per rank it
reports the peak RSS of the process over the step (``ru_maxrss``, which includes the ~1 GB of torch / DeepSpeed /
Ray the rank holds before any step), the rise of that peak over the rank's RSS just before the step (what the step
itself needed), and the step's time (tokens/s of the whole group). SP 2 ranks keep half of every row's activations
(and logits) but gather each layer's keys/values for half of the heads, and both hold the whole row's dense mask.
"""

from __future__ import annotations

import argparse
import resource
import time

import psutil
import torch

ARCH = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 65536, "tie_word_embeddings": True}


def rss_now(trainer) -> float:
    """This rank's RSS now, GiB (``trainer`` is the PolicyTrainer actor's instance)."""
    return psutil.Process().memory_info().rss / 2**30


def peak_rss(trainer) -> float:
    """This rank's peak RSS so far, GiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def packed_row(tokens: int, vocab: int):
    """One row of ``tokens`` tokens: 4 documents of 40 / 30 / 20 / 10 % of the row, assistant tokens trained."""
    from data_pipelines.packing import Document, collate

    generator = torch.Generator().manual_seed(0)
    lengths = [tokens * 4 // 10, tokens * 3 // 10, tokens * 2 // 10]
    lengths.append(tokens - sum(lengths))
    docs = [Document(torch.randint(5, vocab, (n,), generator=generator).tolist(), [i >= n // 4 for i in range(n)],
                     sample_id=f"doc{j}") for j, n in enumerate(lengths)]
    return collate([docs], 0)


def build_model(cache_dir: str, vocab: int) -> str:
    """The bench model (random weights, ``ARCH`` with a ``vocab``-token vocabulary) saved once under ``cache_dir``;
    no tokenizer: the rows are random token ids."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(cache_dir) / f"bench-sp-qwen2-v{vocab}"
    if not (path / "config.json").exists():
        arch = dict(ARCH)
        torch.manual_seed(0)
        config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=vocab, **arch)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def measure(model_path: str, tokens: int, sp: int, vocab: int) -> dict:
    from train.sft.loss import TokenCrossEntropy, loss_tokens
    from train.workers.actors import TrainerGroup

    trainer_cfg = {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.0, "max_grad_norm": 1.0, "zero_stage": 0,
                   "sequence_parallel_size": sp}
    group = TrainerGroup(sp, model_path, "sdpa", trainer_cfg, micro_batches_per_rank=1, num_threads=1)
    try:
        batch = packed_row(tokens, vocab)
        before = group._get([r.__ray_call__.remote(rss_now) for r in group.ranks], "rss")
        start = time.perf_counter()
        group.train_step([batch], TokenCrossEntropy(loss_tokens(batch)), [{}])
        seconds = time.perf_counter() - start
        peak = group._get([r.__ray_call__.remote(peak_rss) for r in group.ranks], "peak rss")
    finally:
        group.shutdown()
    return {"tokens": tokens, "sp": sp, "peak_gib": peak, "step_gib": [p - b for p, b in zip(peak, before)],
            "tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--sp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--cache-dir", default=".cache/models")
    args = parser.parse_args()

    from train.workers.ray_session import init_ray

    model_path = build_model(args.cache_dir, args.vocab)
    init_ray(num_cpus=max(args.sp))
    print("| tokens | SP | peak RSS per rank (GiB) | step's rise per rank (GiB) | tokens/s |")
    print("| ---: | ---: | --- | --- | ---: |")
    for tokens in args.tokens:
        for sp in args.sp:
            r = measure(model_path, tokens, sp, args.vocab)
            print(f"| {tokens} | {sp} | {' / '.join(f'{p:.2f}' for p in r['peak_gib'])} | "
                  f"{' / '.join(f'{s:.2f}' for s in r['step_gib'])} | {r['tokens_per_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
