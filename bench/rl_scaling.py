"""How our on-policy GRPO step and TRL's GRPOTrainer scale: s/step and peak memory as the model width, the
response length and the group size grow, one axis at a time from a default.

    python bench/rl_scaling.py                                  # the grid below, 1 warm-up + 3 measured steps
    python bench/rl_scaling.py --widths 64 256 --lengths 96 --groups 8 --plot runs/rl_scaling.png
    python bench/rl_scaling.py --points 64,96,8 512,96,8        # explicit (width, length, G) points

Each point runs bench/rl_step.py's two sides with the same settings (ours: the RL recipe, rollout.async_steps=0;
TRL: GRPOTrainer on the same prompts, weights, reward and optimizer; see bench/rl_step.py), each in its own
subprocess, ours then TRL, point after point, so that the two figures of a point are taken minutes apart at most.
The model is the embedded tiny Qwen2 (4 layers, 4 heads, 2 KV heads, vocabulary 384) at hidden size = width and
MLP 4 x width, random weights (model.tiny.arch overrides; both sides load the same saved checkpoint).
Response length is max_new_tokens: the random model rarely emits eos, so most responses use the whole budget.
Peak memory is the peak resident set (VmHWM of /proc/<pid>/status) of each process: ours the driver and each Ray
actor (trainer rank, rollout worker, reward worker), read at every step; TRL its one process.
Threads: as in bench/rl_step.py (ours: train/run/threads.py cpu_threads; TRL: --trl-threads, default every core).
Speed ratio = TRL median s/step / ours median s/step. On a shared machine the figures are measured under load;
the load average at each side's start is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT = (64, 96, 8)  # width, max_new_tokens, G
MARK = "RL_SCALING_RESULT "
RAY_INFRA = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::IDLE")  # Ray's processes, not the recipe's actors


# -- pure helpers (tests/bench/test_rl_scaling.py) --------------------------------------------------------------
def grid(widths, lengths, groups, default=DEFAULT) -> list[tuple[int, int, int]]:
    """Points that vary one axis at a time from ``default`` (width, length, G): the default first, then G, width,
    length (roughly cheapest first), no repeats."""
    w0, l0, g0 = default
    points = [default]
    points += [(w0, l0, g) for g in groups]
    points += [(w, l0, g0) for w in widths]
    points += [(w0, length, g0) for length in lengths]
    seen, out = set(), []
    for p in points:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def arch_overrides(width: int) -> list[str]:
    """Hydra overrides of the embedded model at hidden size ``width`` (MLP 4x); heads stay 4 (query) / 2 (kv)."""
    if width % 4:
        raise ValueError(f"width {width} must be a multiple of 4 (4 attention heads)")
    return [f"model.tiny.arch.hidden_size={width}", f"model.tiny.arch.intermediate_size={4 * width}"]


def peak_rss_mib(pid: int) -> float | None:
    """Peak resident set of process ``pid`` in MiB (VmHWM), None if it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def ratio_rows(results: list[dict]) -> list[dict]:
    """Table rows: point, both sides' median s/step and peak RSS, and the speed ratio TRL/ours."""
    rows = []
    for r in results:
        ours, trl = r["ours"], r["trl"]
        rows.append({**r["point"], "ours_s": statistics.median(ours["walls"]), "trl_s": statistics.median(trl["walls"]),
                     "ours_rss": ours["rss_total"], "ours_rss_max": ours["rss_max"], "trl_rss": trl["rss_total"],
                     "params": r["params"],
                     "speedup": statistics.median(trl["walls"]) / statistics.median(ours["walls"])})
    return rows


# -- one side, in a subprocess ------------------------------------------------------------------------------------
def child(side: str, width: int, length: int, group: int, args) -> dict:
    """Run one side of bench/rl_step.py at one point; returns its result plus peak RSS figures."""
    import resource

    import psutil

    sys.path.insert(0, str(HERE))
    import rl_step

    step_args = argparse.Namespace(
        prompts=args.prompts, group=group, max_new_tokens=length, steps=args.steps, warmup=args.warmup, beta=0.0,
        workers=1, world_size=1, model_path=None, seed=args.seed, ours=arch_overrides(width), trl_threads=args.trl_threads,
    )
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_rl_scaling_") as tmp:
        cfg = rl_step.compose_config(step_args, str(Path(tmp) / "ours"), ("rollout.async_steps=0",))
        from train.models.model_zoo import load_model

        params = sum(p.numel() for p in load_model(rl_step.model_path_of(cfg)).parameters())
        if side == "ours":
            me = psutil.Process()
            peaks: dict[int, tuple[str, float]] = {}

            def sample_rss() -> None:  # the driver and every process it started (Ray's raylet, workers, actors)
                for proc in [me, *me.children(recursive=True)]:
                    try:
                        name = proc.name()
                    except psutil.Error:
                        continue
                    if proc is not me and (not name.startswith("ray::") or name in RAY_INFRA):
                        continue  # Ray's own daemons (gcs, raylet, dashboard, idle workers) are not our processes
                    rss = peak_rss_mib(proc.pid)
                    if rss is not None:
                        peaks[proc.pid] = (name if proc is not me else "driver", max(rss, peaks.get(proc.pid, ("", 0.0))[1]))

            from train.rl import recipe

            run = recipe.run

            def sampled_run(cfg, on_step=None, **kw):
                def hook(step, metrics):
                    sample_rss()
                    if on_step is not None:
                        on_step(step, metrics)
                return run(cfg, on_step=hook, **kw)

            recipe.run = sampled_run
            try:
                out = rl_step.run_ours(cfg, args.warmup)
            finally:
                recipe.run = run
            sample_rss()
            by_name = {}
            for name, rss in peaks.values():
                by_name[name] = max(rss, by_name.get(name, 0.0))
            out["rss"] = by_name
        else:
            import contextlib

            import torch

            torch.set_num_threads(rl_step.trl_threads(args.trl_threads))  # every core unless --trl-threads
            with contextlib.chdir(tmp):
                out = rl_step.run_trl(cfg, rl_step.step_prompts(cfg, args.warmup + args.steps), step_args, str(Path(tmp) / "trl"))
            out["rss"] = {"TRL process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    out["rss_total"] = sum(out["rss"].values())
    out["rss_max"] = max(out["rss"].values())
    out["params"], out["load_start"] = params, load
    out.pop("load", None)
    return out


def run_point(side: str, point: tuple[int, int, int], args) -> dict:
    width, length, group = point
    command = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--points", f"{width},{length},{group}",
               "--prompts", str(args.prompts), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--seed", str(args.seed)] + (["--trl-threads", str(args.trl_threads)] if args.trl_threads else [])
    done = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"{side} at {point} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


# -- report -----------------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    header = (f"{'width':>6s}{'params':>9s}{'L':>6s}{'G':>4s}{'ours s/step':>13s}{'TRL s/step':>12s}{'TRL/ours':>10s}"
              f"{'ours RSS MiB (sum / largest)':>30s}{'TRL RSS MiB':>13s}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['width']:6d}{r['params'] / 1e6:8.2f}M{r['length']:6d}{r['group']:4d}{r['ours_s']:13.3f}{r['trl_s']:12.3f}"
                     f"{r['speedup']:9.2f}x{r['ours_rss']:19.0f} / {r['ours_rss_max']:<8.0f}{r['trl_rss']:13.0f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Three panels (width, length, G): s/step of both sides (left axis), speed ratio in the titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w0, l0, g0 = DEFAULT
    axes_of = {"width": lambda r: r["length"] == l0 and r["group"] == g0,
               "length": lambda r: r["width"] == w0 and r["group"] == g0,
               "group": lambda r: r["width"] == w0 and r["length"] == l0}
    labels = {"width": "model width (hidden size)", "length": "max new tokens", "group": "G (samples per prompt)"}
    fig, panels = plt.subplots(2, 3, figsize=(13, 7), sharex="col")
    for col, (axis, keep) in enumerate(axes_of.items()):
        chosen = sorted((r for r in rows if keep(r)), key=lambda r: r[axis])
        xs = [r[axis] for r in chosen]
        top, bottom = panels[0][col], panels[1][col]
        top.plot(xs, [r["ours_s"] for r in chosen], "o-", label="ours (on-policy)")
        top.plot(xs, [r["trl_s"] for r in chosen], "s--", label="TRL GRPOTrainer")
        for x, r in zip(xs, chosen):
            top.annotate(f"{r['speedup']:.2f}x", (x, r["ours_s"]), textcoords="offset points", xytext=(0, 6), fontsize=8)
        top.set_ylabel("median s/step")
        top.set_title(f"s/step vs {axis} (TRL/ours above each point)")
        bottom.plot(xs, [r["ours_rss"] for r in chosen], "o-", label="ours: all processes")
        bottom.plot(xs, [r["ours_rss_max"] for r in chosen], "o:", label="ours: largest process")
        bottom.plot(xs, [r["trl_rss"] for r in chosen], "s--", label="TRL (one process)")
        bottom.set_ylabel("peak RSS (MiB)")
        bottom.set_xlabel(labels[axis])
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.grid(alpha=0.3)
    panels[0][0].legend(fontsize=8)
    panels[1][0].legend(fontsize=8)
    fig.suptitle("On-policy GRPO step, ours vs TRL (CPU, measured under load)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="*", default=[64, 256, 512])
    parser.add_argument("--lengths", type=int, nargs="*", default=[96, 384, 1024])
    parser.add_argument("--groups", type=int, nargs="*", default=[4, 8, 16])
    parser.add_argument("--points", nargs="*", default=None, help="explicit width,length,G points instead of the grid")
    parser.add_argument("--prompts", type=int, default=8, help="P prompts per step")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per side and point")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-threads", type=int, default=None)
    parser.add_argument("--plot", default="rl_scaling.png", help="PNG path")
    parser.add_argument("--json", default=None, help="also write the raw results here (after every point)")
    parser.add_argument("--previous", default=None,
                        help="a --json file of an earlier run: its points are reported with this run's and not rerun")
    parser.add_argument("--child", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    points = ([tuple(int(v) for v in p.split(",")) for p in args.points] if args.points
              else grid(args.widths, args.lengths, args.groups))
    if args.child:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import logging

        logging.basicConfig(level=logging.WARNING)
        print(MARK + json.dumps(child(args.child, *points[0], args)), flush=True)
        return
    results = json.loads(Path(args.previous).read_text()) if args.previous else []
    done = {tuple(r["point"][k] for k in ("width", "length", "group")) for r in results}
    todo = [p for p in points if p not in done]
    if not todo and results:
        write_report(results, args)
    for point in todo:
        sides = {side: run_point(side, point, args) for side in ("ours", "trl")}
        width, length, group = point
        results.append({"point": {"width": width, "length": length, "group": group}, "params": sides["ours"]["params"], **sides})
        o, t = sides["ours"], sides["trl"]
        print(f"width {width} L {length} G {group}: ours {statistics.median(o['walls']):.3f} s/step (load {o['load_start']:.1f}), "
              f"TRL {statistics.median(t['walls']):.3f} (load {t['load_start']:.1f}); ours RSS {o['rss']}, TRL {t['rss']}", flush=True)
        write_report(results, args)  # after every point: a long run that is stopped keeps what it measured


def write_report(results: list[dict], args) -> None:
    rows = ratio_rows(results)
    print(f"\nOn-policy GRPO, ours vs TRL GRPOTrainer: P {args.prompts}, median of {args.steps} steps after {args.warmup} "
          f"warm-up, each side in its own process; default point width {DEFAULT[0]}, L {DEFAULT[1]}, G {DEFAULT[2]}")
    print(table(rows), flush=True)
    plot(rows, args.plot)
    print(f"plot: {args.plot}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
