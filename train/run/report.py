"""Plots of a run from its local metrics: ``python -m train.run.report RUN_DIR [--out DIR]``.

Reads ``RUN_DIR/metrics.jsonl`` (written by every run, with or without W&B) and draws one PNG per panel
(loss, reward, accuracy, response length, KL, throughput, ...) plus ``overview.png`` with all panels that
have data. Metrics absent from the run are skipped.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

PANELS = {
    "loss": ["train/loss"],
    "reward": ["reward/total"],
    "accuracy": ["eval/accuracy", "reward/correctness"],  # RL: the mean correctness reward is the rollout accuracy
    "response_length": ["eval/response_length_mean", "rollout/response_length_mean", "rollout/response_length_p90"],
    "kl": ["train/kl", "train/kl_mean"],
    "throughput": ["perf/tokens_per_s"],
    "learning_rate": ["train/lr"],
    "grad_norm": ["train/grad_norm"],
}


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give the run directory of a finished or running run")
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for line_number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_number}: not valid JSON ({e})") from e
        step = row.pop("step")
        for key, value in row.items():
            series[key].append((step, value))
    return series


def draw(run_dir, out_dir=None) -> list[Path]:
    """Write the PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(Path(run_dir))
    out = Path(out_dir or Path(run_dir) / "plots")
    out.mkdir(parents=True, exist_ok=True)
    panels = {name: [k for k in keys if k in series] for name, keys in PANELS.items()}
    panels = {name: keys for name, keys in panels.items() if keys}
    if not panels:
        raise ValueError(f"{run_dir}: metrics.jsonl has none of the plotted metrics ({sorted(k for v in PANELS.values() for k in v)})")
    written = []

    def plot(ax, name, keys):
        for key in keys:
            steps, values = zip(*series[key])
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, label=key)
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if name in ("loss", "grad_norm") and all(v > 0 for k in keys for _, v in series[k]):
            ax.set_yscale("log")

    for name, keys in panels.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        plot(ax, name, keys)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        written.append(out / f"{name}.png")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels.items()):
        plot(ax, name, keys)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out / "overview.png", dpi=100)
    plt.close(fig)
    written.append(out / "overview.png")
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="run directory containing metrics.jsonl")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    for path in draw(args.run_dir, args.out):
        print(path)


if __name__ == "__main__":
    main()
