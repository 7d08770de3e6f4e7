"""Single-pass vs per-turn training on multi-turn reasoning chats: tokens and wall time per epoch, and the loss.

    python bench/multiturn.py                      # 4- and 8-turn chats, the embedded tiny model, CPU
    python bench/multiturn.py --chats 64 --turns 4 --device cuda

Both modes pack their documents into rows of ``--row-tokens`` with the same packer and run the same shared
forward + backward (``train.models.forward.sft_loss_sum``, sdpa backend); only the documents differ. The chats are
synthetic arithmetic reasoning chats (reasoning 3-10x longer than answers, printed) with a system prompt.
Single-pass saves the re-processed prefixes, so the speedup follows the token ratio
per_turn / single_pass = (K * prompt_0 + sum_k (k-th prefix)) / (one pass); it grows with the number of turns
and with the share of prompt (system, user, earlier answers) in each turn.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omegaconf import OmegaConf  # noqa: E402

from data_pipelines.arithmetic import ArithmeticSpec, generate  # noqa: E402
from data_pipelines.chat_format import split_reasoning  # noqa: E402
from data_pipelines.multiturn import chat_documents  # noqa: E402
from data_pipelines.packing import IGNORE_INDEX, pack  # noqa: E402
from train.models.attention import model_inputs  # noqa: E402
from train.models.forward import sft_loss_sum  # noqa: E402
from train.models.model_zoo import build_tiny_model, build_tiny_tokenizer  # noqa: E402

SYSTEM_PROMPT = "You are a helpful assistant. Think step by step, then give the final answer in \\boxed{}."
TINY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "model" / "tiny.yaml"


def make_chats(turns: int, num_chats: int, seed: int, system_prompt: str) -> list[dict]:
    spec = ArithmeticSpec(digits=2, num_ops=1, verbosity=0.3, turns=turns)
    rows = generate(spec, num_chats, seed=seed, prefix=f"bench{turns}")
    for row in rows:
        if system_prompt:
            row["messages"] = [{"role": "system", "content": system_prompt}, *row["messages"]]
    return rows


def proportions(tokenizer, rows) -> dict:
    """Mean tokens per turn of user text, reasoning and answer (content only, no chat markup)."""
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    user, reasoning, answer, turns = 0, 0, 0, 0
    for row in rows:
        for message in row["messages"]:
            if message["role"] == "user":
                user += count(message["content"])
            elif message["role"] == "assistant":
                r, a = split_reasoning(message)
                reasoning, answer, turns = reasoning + count(r), answer + count(a), turns + 1
    return {"user": user / turns, "reasoning": reasoning / turns, "answer": answer / turns}


def epoch(model, batches, backend: str) -> float:
    """Forward + backward over all batches (loss normalised by the epoch's loss tokens); seconds."""
    total = sum(b.num_loss_tokens for b in batches)
    start = time.perf_counter()
    for batch in batches:
        loss_sum, _ = sft_loss_sum(model, batch, backend)
        (loss_sum / total).backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


@torch.no_grad()
def chat_losses(model, batches, backend: str) -> dict[str, tuple[float, int]]:
    """(sum of token CE, loss tokens) per chat id (per-turn documents are named ``{chat}/turn{k}``)."""
    sums: dict[str, list] = {}
    for batch in batches:
        logits = model(**model_inputs(batch, backend), use_cache=False).logits[:, :-1].float()
        targets = batch.labels[:, 1:]  # [rows, seq-1]
        ce = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        doc = batch.doc_ids[:, 1:]
        for d, sample_id in enumerate(batch.sample_ids):
            chat = sample_id.split("/turn")[0]
            where = (doc == d) & (targets != IGNORE_INDEX)
            entry = sums.setdefault(chat, [0.0, 0])
            entry[0] += float(ce[where].double().sum())
            entry[1] += int(where.sum())
    return {chat: (s, n) for chat, (s, n) in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--chats", type=int, default=16, help="chats per epoch")
    parser.add_argument("--row-tokens", type=int, default=2048)
    parser.add_argument("--rows-per-batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per mode (median reported)")
    parser.add_argument("--system-prompt", default=SYSTEM_PROMPT, help="'' for none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tiny = OmegaConf.load(TINY_CONFIG).tiny
    tokenizer = build_tiny_tokenizer(tiny.vocab_size)
    model = build_tiny_model(tokenizer, OmegaConf.to_container(tiny.arch), tiny.seed).to(args.device).float().train()
    model.config._attn_implementation = "sdpa"
    backend = "sdpa"
    print(
        f"model: embedded tiny {tiny.arch.model_type} (hidden {tiny.arch.hidden_size}, {tiny.arch.num_hidden_layers} "
        f"layers, vocab {len(tokenizer)}), fp32, backend {backend}, device {args.device}, torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} (other processes share this CPU)"
    )
    print(f"rows of {args.row_tokens} tokens, {args.rows_per_batch} row(s) per batch, median of {args.repeats} epochs\n")
    header = f"{'turns':>5} {'mode':>12} {'docs':>5} {'tokens':>7} {'padded':>7} {'s/epoch':>8} {'tokens/s':>9} {'loss':>8}"
    print(header)
    print("-" * len(header))
    summary = []
    for turns in args.turns:
        rows = make_chats(turns, args.chats, args.seed, args.system_prompt)
        results, batches = {}, {}
        for mode in ("per_turn", "single_pass"):
            documents = [d for i, r in enumerate(rows) for d in chat_documents(tokenizer, r["messages"], mode, r["id"], i)]
            batches[mode] = [b.to(args.device) for b in pack(documents, args.row_tokens, args.rows_per_batch, tokenizer.pad_token_id)]
            results[mode] = {"docs": len(documents), "seconds": []}
            epoch(model, batches[mode], backend)  # warm-up (allocator, kernels for these shapes)
        for _ in range(args.repeats):  # alternate the modes so that a change in the CPU load hits both
            for mode in ("per_turn", "single_pass"):
                results[mode]["seconds"].append(epoch(model, batches[mode], backend))
        for mode in ("per_turn", "single_pass"):
            result = results[mode]
            result["seconds"] = statistics.median(result["seconds"])
            result["losses"] = chat_losses(model, batches[mode], backend)
            result["tokens"] = sum(b.num_tokens - b.num_padding for b in batches[mode])
            padded = sum(b.num_tokens for b in batches[mode])
            result["loss"] = sum(s for s, _ in result["losses"].values()) / sum(n for _, n in result["losses"].values())
            print(
                f"{turns:>5} {mode:>12} {result['docs']:>5} {result['tokens']:>7} {padded:>7} {result['seconds']:>8.2f} "
                f"{result['tokens'] / result['seconds']:>9.0f} {result['loss']:>8.5f}"
            )
        per_turn, single = results["per_turn"], results["single_pass"]
        chat_diff = max(
            abs(per_turn["losses"][c][0] / per_turn["losses"][c][1] - s / n) for c, (s, n) in single["losses"].items()
        )
        props = proportions(tokenizer, rows)
        summary.append(
            f"{turns} turns: speedup {per_turn['seconds'] / single['seconds']:.2f}x (token ratio "
            f"{per_turn['tokens'] / single['tokens']:.2f}x); max per-chat loss difference {chat_diff:.1e}, epoch loss "
            f"difference {abs(per_turn['loss'] - single['loss']):.1e}; tokens per turn: system "
            f"{len(tokenizer.encode(args.system_prompt)) if args.system_prompt else 0} (once), user {props['user']:.0f}, "
            f"reasoning {props['reasoning']:.0f}, answer {props['answer']:.0f} "
            f"(reasoning/answer {props['reasoning'] / props['answer']:.1f})"
        )
    print()
    print("\n".join(summary))
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
