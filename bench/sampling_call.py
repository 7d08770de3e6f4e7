"""CPU time of one rollout sampling call: lean decode steps vs the Hugging Face forward vs ``generate``.

    python bench/sampling_call.py                       # P 8 x G 8, 96 new tokens, 7 rounds
    python bench/sampling_call.py --prompts 8 --group 8 --new-tokens 96 --rounds 9

The model is configs/model/tiny.yaml's (the embedded tiny Qwen2, random weights, built once under .cache/models);
the prompts are arithmetic questions of different lengths, left-padded. One thread. Each round calls, in turn:
``sample(..., lean=True)`` (train/models/lean_decode.py for the decode steps), ``sample(..., lean=False)`` (the
Hugging Face forward at every step) and ``model.generate`` on the P * G repeated prompts (temperature 1, top_k 0),
and records each call's CPU time (``time.process_time``: on a shared machine, wall time counts other processes'
turns). Prints the median per side and the ratios, and checks that the two ``sample`` paths give the same tokens
and log-probs (seeded alike); exit 1 if they differ.
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
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def prompts(count: int) -> list[str]:
    """``count`` arithmetic questions whose token lengths differ (so the batch is left-padded)."""
    return [f"Ann has {3 * i + 7} apples and buys {i + 2} bags of {5 + i % 3}." + " How many now?" * (1 + i % 3)
            for i in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    import torch
    from omegaconf import OmegaConf

    from train.models.model_zoo import load_model, load_tokenizer, resolve_model_path
    from train.models.sampling import left_padded, sample

    torch.set_num_threads(1)
    cfg = OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml")
    cfg.cache_dir = str(REPO / cfg.cache_dir)
    path = str(resolve_model_path(cfg))
    model = load_model(path, "sdpa", torch.float32, torch.device("cpu")).eval()
    tok = load_tokenizer(path)
    enc = left_padded(tok, prompts(args.prompts), "cpu")
    ids, mask = enc["input_ids"], enc["attention_mask"]

    def ours(lean: bool):
        return sample(model, ids, mask, args.new_tokens, tok.eos_token_id, tok.pad_token_id, 1.0, 1.0,
                      torch.Generator().manual_seed(0), group_size=args.group, return_logprobs=True, lean=lean)

    def generate():
        with torch.no_grad():
            return model.generate(input_ids=ids.repeat_interleave(args.group, 0),
                                  attention_mask=mask.repeat_interleave(args.group, 0), do_sample=True,
                                  temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    sides = {"lean": lambda: ours(True), "hf forward": lambda: ours(False), "generate": generate}
    seconds = {name: [] for name in sides}
    results = {}
    for _ in range(args.rounds):
        for name, call in sides.items():
            start = time.process_time()
            results[name] = call()
            seconds[name].append(time.process_time() - start)
    (lean_tokens, lean_logprobs), (hf_tokens, hf_logprobs) = results["lean"], results["hf forward"]
    same = torch.equal(lean_tokens, hf_tokens) and torch.equal(lean_logprobs, hf_logprobs)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"P {args.prompts} x G {args.group}, {args.new_tokens} new tokens, prompt widths "
          f"{mask.sum(1).tolist()}, {args.rounds} rounds, 1 thread, CPU s per call (median; all rounds):")
    for name, values in seconds.items():
        print(f"  {name:<11} {median[name]:.3f}   " + " ".join(f"{v:.3f}" for v in values))
    print(f"  lean vs hf forward {median['hf forward'] / median['lean']:.2f}x, vs generate "
          f"{median['generate'] / median['lean']:.2f}x; same tokens and log-probs: {same}")
    if os.path.exists("/proc/loadavg"):
        print("  load average:", open("/proc/loadavg").read().split()[:3])
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
