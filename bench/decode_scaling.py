"""Decode cost as the context grows: tiny Transformer (KV cache) vs tiny Mamba-2 (recurrent state), same size.

    python bench/decode_scaling.py                                   # contexts 512 2048 8192 16384, 32 new tokens
    python bench/decode_scaling.py --contexts 512 4096 --new-tokens 16 --out runs/bench/decode_scaling

The Transformer is configs/model/tiny.yaml's Qwen2 (``max_position_embeddings`` raised to fit the longest
context); the Mamba-2 is configs/model/tiny_mamba2.yaml's with its hidden size (and so its heads) chosen to match the
Transformer's parameter count as closely as the head size allows (both counts are printed). Both are built once
under .cache/models with the embedded tokenizer (random weights: the cost of a token does not depend on them).

Each (model, context) runs in a fresh subprocess with one thread (torch, OpenMP, MKL): a random prompt of
``context`` tokens is prefilled, then ``--new-tokens`` tokens are generated greedily (eos never stops them). The
Transformer runs the loop of train/models/sampling.py (``DynamicCache``, one token per step, growing mask); the
Mamba-2 runs train/models/ssm_decode.py's ``RecurrentDecoder`` (the path ``sample`` takes for it: chunked prefill,
then one step per token on the conv and SSM states). Reported per configuration:

- ms/token: the median (and mean) wall time of one decode step (forward of one token + the argmax); each
  configuration runs ``--repeats`` times (round robin over all of them) and the repeat with the lowest median is
  kept (load on a shared machine only adds time; every repeat's median is in the JSON);
- state MiB: the bytes of the decode state after the last token, counted from its tensors (the KV cache, or the
  conv + SSM states);
- peak RSS MiB: the subprocess's peak resident memory over prefill + decode (Linux VmHWM, reset just before the
  prefill; elsewhere ``getrusage``'s peak since the start), weights and the interpreter included;
- decode RSS MiB: the highest resident memory sampled after each decode step (psutil).

The verdict (exit 1 if it fails): Mamba-2's ms/token at the longest context within ``--max-time-ratio`` (1.2) of the
shortest, its state bytes identical at every context and its peak RSS within ``--max-rss-ratio`` (1.1); the
Transformer's ratios are printed beside. Writes ``<out>/decode_scaling.json``, ``.md`` (the table) and ``.png``.
CPU timings move with the machine's load: compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KINDS = ("transformer", "mamba2")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def base_arch(kind: str) -> dict:
    """The ``tiny.arch`` of configs/model/tiny.yaml (transformer) or tiny_mamba2.yaml."""
    from omegaconf import OmegaConf

    name = {"transformer": "tiny", "mamba2": "tiny_mamba2"}[kind]
    return OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml").tiny.arch)


def mamba_at_width(arch: dict, hidden: int) -> dict | None:
    """``arch`` at hidden size ``hidden`` (inner width expand * hidden split into heads of the same head_dim), or
    None when the inner width is not a whole number of heads."""
    inner = arch["expand"] * hidden
    if inner % arch["head_dim"]:
        return None
    return {**arch, "hidden_size": hidden, "num_heads": inner // arch["head_dim"]}


def parameter_count(arch: dict, vocab_size: int) -> int:
    """Parameters of a model of ``arch`` (tied weights once), built on the meta device (no memory, no init)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(arch)
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=vocab_size, **arch)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def closest(candidates: list[tuple[int, dict]], target: int) -> tuple[int, dict]:
    """The (count, arch) whose count is nearest ``target`` (the smaller on a tie)."""
    if not candidates:
        raise ValueError("no candidate architecture")
    return min(candidates, key=lambda c: (abs(c[0] - target), c[0]))


def transformer_arch(max_context: int) -> dict:
    return {**base_arch("transformer"), "max_position_embeddings": max_context}


def matched_archs(transformer: dict, vocab_size: int, widths=range(32, 513, 16)) -> dict[str, tuple[int, dict]]:
    """kind -> (parameters, arch): the Transformer ``transformer``, and the tiny Mamba-2 at the hidden size whose
    parameter count is closest to it."""
    target = parameter_count(transformer, vocab_size)
    mamba = base_arch("mamba2")
    candidates = [(parameter_count(a, vocab_size), a) for a in (mamba_at_width(mamba, w) for w in widths) if a]
    return {"transformer": (target, transformer), "mamba2": closest(candidates, target)}


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: ``5`` into /proc/self/clear_refs resets VmHWM); False if it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """VmHWM (peak RSS since the last reset) from /proc/self/status, else ``getrusage``'s since the start."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def kv_bytes(cache) -> int:
    """Bytes of a ``DynamicCache``'s keys and values."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


class KVDecoder:
    """train/models/sampling.py's loop for one unpadded row: a ``DynamicCache``, explicit positions and a mask that
    grows by one per token (the interface of ssm_decode.RecurrentDecoder)."""

    def __init__(self, model):
        from transformers import DynamicCache

        self.model, self.cache = model, DynamicCache()
        self.mask = self.position = None

    def prefill(self, input_ids, attention_mask):
        import torch

        positions = torch.arange(input_ids.shape[1])[None]
        self.mask, self.position = attention_mask, positions[:, -1:]
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                          past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def step(self, tokens):
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        self.position = self.position + 1
        return self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.position,
                          past_key_values=self.cache, use_cache=True).logits[:, -1]

    def state_bytes(self) -> int:
        return kv_bytes(self.cache)


def measure(model_path: str, context: int, new_tokens: int, seed: int = 0) -> dict:
    """Prefill a random ``context``-token prompt, then time ``new_tokens`` greedy decode steps (this process)."""
    import torch

    from train.models.forward import is_ssm
    from train.models.model_zoo import load_model
    from train.models.ssm_decode import RecurrentDecoder

    model = load_model(model_path).eval()
    rss_model = rss_mib()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, model.config.vocab_size, (1, context), generator=generator)
    decoder = RecurrentDecoder(model) if is_ssm(model) else KVDecoder(model)
    steps, rss = [], []
    peak_reset = reset_peak_rss()  # the peak then covers prefill + decode, not the imports and loading
    with torch.no_grad():
        start = time.perf_counter()
        logits = decoder.prefill(ids, torch.ones_like(ids))
        prefill_s = time.perf_counter() - start
        for _ in range(new_tokens):
            t0 = time.perf_counter()
            logits = decoder.step(logits.argmax(-1))
            steps.append(time.perf_counter() - t0)
            rss.append(rss_mib())
    return {
        "context": context, "new_tokens": new_tokens, "prefill_s": prefill_s,
        "ms_per_token_median": 1e3 * statistics.median(steps), "ms_per_token_mean": 1e3 * statistics.fmean(steps),
        "state_mib": decoder.state_bytes() / 2**20, "rss_model_mib": rss_model, "decode_rss_mib": max(rss),
        "peak_rss_mib": peak_rss_mib(), "peak_since": "prefill" if peak_reset else "process start",
    }


def run_child(kind: str, model_path: str, context: int, new_tokens: int, timeout_s: float) -> dict:
    """``measure`` in a fresh one-thread subprocess (its peak RSS is this configuration's alone)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model_path, "--contexts", str(context),
           "--new-tokens", str(new_tokens)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, **ONE_THREAD})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} at context {context} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return {"model": kind, **json.loads(lines[-1])}


def best_of(runs: list[dict]) -> list[dict]:
    """One row per (model, context): the repeat with the lowest median ms/token (load on a shared machine only adds
    time), with ``repeats_ms_median`` listing every repeat's median."""
    rows = []
    for key in dict.fromkeys((r["model"], r["context"]) for r in runs):
        mine = [r for r in runs if (r["model"], r["context"]) == key]
        best = min(mine, key=lambda r: r["ms_per_token_median"])
        rows.append({**best, "repeats_ms_median": [r["ms_per_token_median"] for r in mine]})
    return rows


def summarize(rows: list[dict], max_time_ratio: float, max_rss_ratio: float) -> dict:
    """Per model: longest / shortest context ratios of ms/token (median) and peak RSS, whether its state bytes are
    the same at every context; and the verdict on the Mamba-2 rows."""
    out = {}
    for kind in sorted({r["model"] for r in rows}):
        mine = sorted((r for r in rows if r["model"] == kind), key=lambda r: r["context"])
        first, last = mine[0], mine[-1]
        out[kind] = {
            "contexts": [first["context"], last["context"]],
            "time_ratio": last["ms_per_token_median"] / first["ms_per_token_median"],
            "rss_ratio": last["peak_rss_mib"] / first["peak_rss_mib"],
            "state_flat": len({round(r["state_mib"] * 2**20) for r in mine}) == 1,
        }
    m = out.get("mamba2")
    out["pass"] = bool(m and m["time_ratio"] <= max_time_ratio and m["rss_ratio"] <= max_rss_ratio and m["state_flat"])
    return out


def markdown_table(rows: list[dict], params: dict[str, int]) -> str:
    head = ("| model (parameters) | context | ms/token (median) | ms/token (mean) | prefill s | state MiB "
            "| peak RSS MiB | decode RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(
        f"| {r['model']} ({params[r['model']] / 1e6:.2f}M) | {r['context']} | {r['ms_per_token_median']:.2f} "
        f"| {r['ms_per_token_mean']:.2f} | {r['prefill_s']:.1f} | {r['state_mib']:.2f} | {r['peak_rss_mib']:.0f} "
        f"| {r['decode_rss_mib']:.0f} |\n"
        for r in sorted(rows, key=lambda r: (r["model"] != "transformer", r["context"])))
    return head + body


def plot(rows: list[dict], path: Path, new_tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, color in zip(KINDS, ("tab:blue", "tab:orange")):
        mine = sorted((r for r in rows if r["model"] == kind), key=lambda r: r["context"])
        if not mine:
            continue
        x = [r["context"] for r in mine]
        ax_t.plot(x, [r["ms_per_token_median"] for r in mine], marker="o", color=color, label=kind)
        ax_m.plot(x, [r["peak_rss_mib"] for r in mine], marker="o", color=color, label=f"{kind}: peak RSS")
        ax_m.plot(x, [r["state_mib"] for r in mine], marker="s", linestyle="--", color=color,
                  label=f"{kind}: decode state")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.legend(fontsize=7)
    ax_t.set(ylabel="ms per generated token (median)", title=f"decode time ({new_tokens} new tokens, 1 thread)")
    ax_m.set(ylabel="MiB", yscale="log", title="memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "decode_scaling")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "models")
    parser.add_argument("--repeats", type=int, default=2, help="subprocesses per (model, context); the fastest counts")
    parser.add_argument("--max-time-ratio", type=float, default=1.2)
    parser.add_argument("--max-rss-ratio", type=float, default=1.1)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--child", metavar="MODEL_PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.new_tokens < 1 or min(args.contexts) < 1 or args.repeats < 1:
        parser.error("--new-tokens, --contexts and --repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(measure(args.child, args.contexts[0], args.new_tokens)), flush=True)
        return 0
    from transformers import AutoConfig

    from train.models.model_zoo import embedded_model_path

    transformer = transformer_arch(max(args.contexts) + args.new_tokens)
    first = embedded_model_path(args.cache_dir, transformer, 384, 0)  # builds the tokenizer: its size is the vocab
    archs = matched_archs(transformer, AutoConfig.from_pretrained(first).vocab_size)
    paths = {kind: str(embedded_model_path(args.cache_dir, arch, 384, 0)) for kind, (_, arch) in archs.items()}
    params = {kind: count for kind, (count, _) in archs.items()}
    for kind, (count, arch) in archs.items():
        print(f"{kind}: {count:,} parameters, hidden {arch['hidden_size']}, {arch['num_hidden_layers']} layers")
    runs = []
    for repeat in range(args.repeats):  # round robin: both models side by side at each context, then again
        for context in sorted(args.contexts):
            for kind in KINDS:
                runs.append(run_child(kind, paths[kind], context, args.new_tokens, args.timeout))
                r = runs[-1]
                print(f"[{repeat + 1}/{args.repeats}] {kind:>11} context {context:>6}: {r['ms_per_token_median']:.2f} "
                      f"ms/token, state {r['state_mib']:.2f} MiB, peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    rows = best_of(runs)
    summary = summarize(rows, args.max_time_ratio, args.max_rss_ratio)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, params)
    (args.out / "decode_scaling.md").write_text(table)
    (args.out / "decode_scaling.json").write_text(json.dumps({"params": params, "rows": rows, "summary": summary}, indent=1))
    plot(rows, args.out / "decode_scaling.png", args.new_tokens)
    print(table)
    for kind in KINDS:
        s = summary.get(kind)
        if s:
            print(f"{kind}: ms/token {s['contexts'][1]} / {s['contexts'][0]} = {s['time_ratio']:.2f}x, peak RSS "
                  f"{s['rss_ratio']:.2f}x, decode state {'flat' if s['state_flat'] else 'grows'}")
    print(f"{'PASS' if summary['pass'] else 'FAIL'}: Mamba-2 ms/token ratio <= {args.max_time_ratio:g}, peak RSS ratio "
          f"<= {args.max_rss_ratio:g}, state flat; results in {args.out}")
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
