"""RL weight-sync time as the model grows: trainer gather -> object store -> rollout workers' load_weights.

    python bench/weight_sync.py                                    # widths 64 256 512, world sizes 1 2, 2 workers
    python bench/weight_sync.py --widths 1024 --layers 8 --repeats 3
    python bench/weight_sync.py --zero-stage 3                     # gather ZeRO-3 shards on rank 0
    python bench/weight_sync.py --methods object_store             # the CPU default only

One sync is what the RL loop times as perf/time_weight_sync (train/rl/loop.py): ``TrainerGroup.full_state_dict()``
(every rank takes part; rank 0 gathers the full fp32 weights, sharded under ZeRO-3, and returns them to the driver
through Ray) then ``RolloutPool.sync`` (``ray.put`` once, every worker ``load_weights`` from the object store).
``--methods gloo`` times ``rollout.weight_sync=gloo`` beside it: trainer rank 0 broadcasts each parameter to the
workers over a group of their own (train/workers/weight_broadcast.py, the protocol of the GPU path ``nccl``), so
"gather" is the driver's copy alone and "put + load" is the broadcast + load. The tiny Qwen2 architecture of configs/model/tiny.yaml is widened: hidden size W, intermediate 4W, W/32 heads
(2 KV heads per 4), ``--layers`` layers, the tokenizer's vocabulary (tied embeddings). Each model is built once
under .cache/models. Per (width, world size): one warm-up sync, then ``--repeats`` timed ones; the median is
printed. After every sync each worker's weights are checked against the trainer's (a sum of every parameter), so
a sync that silently skipped a tensor fails the bench. CPU only, one local Ray instance; on a shared machine the
figures move with the load: compare rows of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def arch_of(width: int, layers: int) -> dict:
    """configs/model/tiny.yaml's architecture at hidden size ``width``."""
    if width % 32:
        raise SystemExit(f"--widths: {width} must be a multiple of 32 (32 dimensions per attention head)")
    heads = width // 32
    return {"model_type": "qwen2", "hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2), "max_position_embeddings": 2048,
            "tie_word_embeddings": True, "rope_theta": 10000.0}


def trainer_config(zero_stage: int) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["trainer=rl", f"trainer.zero_stage={zero_stage}", "trainer.precision=fp32"])
    return OmegaConf.to_container(cfg.trainer, resolve=True)


def checksum(weights: dict) -> float:
    return float(sum(t.double().sum().item() for t in weights.values()))


def worker_checksum(worker) -> float:
    import ray

    return ray.get(worker.__ray_call__.remote(lambda self: float(sum(p.double().sum().item() for p in self.model.parameters()))))


def _timed_syncs(trainer, pool, repeats: int, first_version: int) -> tuple[list[float], list[float], int]:
    gather, load = [], []
    for i in range(repeats + 1):
        version = first_version + i
        t0 = time.perf_counter()
        weights = trainer.full_state_dict()
        t1 = time.perf_counter()
        pool.sync(weights, version)
        t2 = time.perf_counter()
        want = checksum(weights)
        for worker in pool.workers:
            got = worker_checksum(worker)
            if abs(got - want) > 1e-9 * max(1.0, abs(want)):
                raise RuntimeError(f"worker weights differ from the trainer's after sync {version}: {got} vs {want}")
        if i:  # the first sync of a method warms Ray's object store (or forms the broadcast group) and the workers up
            gather.append(t1 - t0)
            load.append(t2 - t1)
    return gather, load, sum(t.numel() for t in weights.values())


def measure(model_path: str, world_size: int, workers: int, repeats: int, trainer_cfg: dict,
            methods: tuple = ("object_store",)) -> list[dict]:
    """Per method (object_store first: the broadcast, once on, stays on), the median seconds of the gather, of
    put (or broadcast) + load, and of the whole sync over ``repeats`` syncs after one warm-up; one trainer group and
    rollout pool serve every method."""
    from train.workers.actors import RolloutPool, TrainerGroup

    trainer = TrainerGroup(world_size, model_path, "sdpa", trainer_cfg, 1, rank_options=[{"num_cpus": 1}] * world_size,
                           num_threads=1)
    pool = RolloutPool(workers, model_path, worker_options=[{"num_cpus": 0}] * workers, num_threads=1)
    rows = []
    try:
        for n, method in enumerate(sorted(methods, key=lambda m: m != "object_store")):
            if method != "object_store":
                pool.use_broadcast(trainer, method)
            gather, load, params = _timed_syncs(trainer, pool, repeats, n * (repeats + 1))
            total = [g + w for g, w in zip(gather, load, strict=True)]
            rows.append({"method": method, "params": params, "megabytes": 4 * params / 1e6, "gather_s": statistics.median(gather),
                         "load_s": statistics.median(load), "total_s": statistics.median(total)})
    finally:
        pool.shutdown()
        trainer.shutdown()
    return rows


def run(widths: list[int], world_sizes: list[int], workers: int, repeats: int, layers: int, zero_stage: int,
        cache_dir: str, num_cpus: int | None = None, methods: tuple = ("object_store",)) -> list[dict]:
    import ray

    from train.models.model_zoo import embedded_model_path
    from train.workers.ray_session import init_ray

    init_ray(None, num_cpus or max(2, max(world_sizes)))
    trainer_cfg = trainer_config(zero_stage)
    rows = []
    try:
        for width in widths:
            path = str(embedded_model_path(cache_dir, arch_of(width, layers), vocab_size=384, seed=0))
            for world_size in world_sizes:
                rows += [{"width": width, "world_size": world_size, **row}
                         for row in measure(path, world_size, workers, repeats, trainer_cfg, methods)]
    finally:
        ray.shutdown()
    return rows


def table(rows: list[dict], workers: int) -> str:
    lines = [f"| width | parameters | fp32 MB | world size | method | gather s | put or broadcast + load ({workers} workers) s | sync s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['width']} | {r['params']:,} | {r['megabytes']:.1f} | {r['world_size']} | {r['method']} | {r['gather_s']:.3f} | "
              f"{r['load_s']:.3f} | {r['total_s']:.3f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 512], help="hidden sizes (multiples of 32)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2], help="trainer ranks")
    parser.add_argument("--workers", type=int, default=2, help="rollout workers loading each sync")
    parser.add_argument("--repeats", type=int, default=5, help="timed syncs per row (after one warm-up)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=["object_store", "gloo"], choices=["object_store", "gloo"],
                        help="rollout.weight_sync paths to time")
    parser.add_argument("--cache-dir", default=str(REPO / ".cache" / "models"))
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.workers < 1 or min(args.world_sizes) < 1:
        parser.error("--repeats, --workers and --world-sizes must be >= 1")
    start = time.perf_counter()
    rows = run(args.widths, args.world_sizes, args.workers, args.repeats, args.layers, args.zero_stage, args.cache_dir,
               methods=tuple(args.methods))
    print(table(rows, args.workers))
    print(f"ZeRO-{args.zero_stage}, {args.layers} layers, median of {args.repeats}; load averages {os.getloadavg()}; "
          f"{time.perf_counter() - start:.0f} s in all")
    return rows


if __name__ == "__main__":
    main()
