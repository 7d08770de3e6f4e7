"""SFT throughput: our packed rows vs right-padded batches vs TRL's SFTTrainer, real (non-pad) tokens per second.

    python bench/sft_packing.py                                   # quickstart data and rows (2 x 512 tokens/step)
    python bench/sft_packing.py --data data.synthetic.train.verbosity=0.5   # mixed lengths (filler sentences)
    python bench/sft_packing.py --row-tokens 1024 --rows 1 --steps 40

Sides, all on the same model (the embedded tiny model, or --model-path), the same documents (the quickstart data:
experiment=quickstart, tokenized by data_pipelines.loading.tokenize_rows, loss on assistant tokens) and AdamW:
- "ours packed": the project's stream (data_pipelines/batching.py: first-fit-decreasing rows of --row-tokens,
  --rows rows per step) through the SFT forward and loss (train.models.forward.token_logprobs under sdpa, the model
  loaded by load_model: attention per document, train/models/document_attention.py; train.sft.loss.TokenCrossEntropy),
  backward, grad clip, AdamW. The model is called directly (no DeepSpeed engine, no Ray rank), so the figure is the
  data layout + forward/loss cost. --dense adds "ours dense mask": the same under transformers' own sdpa, i.e. the
  dense [rows, 1, seq, seq] mask (the path before per-document attention).
- "padded": what a plain Hugging Face loop does: the same documents in a seeded shuffle, --padded-batch documents
  per step (default: as many as our step holds on average), right-padded to the longest in the batch, attention
  mask, ``model(input_ids, attention_mask, labels)`` (HF's mean token cross-entropy), backward, clip, AdamW.
- "TRL packing": trl.SFTTrainer with ``packing=True, packing_strategy="bfd", max_length=--row-tokens``,
  per_device_train_batch_size=--rows (TRL flattens them into one padding-free row with restarting position_ids;
  transformers derives the per-document sdpa mask from them); "TRL padding-free": ``padding_free=True`` without
  packing, --padded-batch documents per step. The padded loop and TRL run transformers' own sdpa (TRL's varlen
  boundaries are then ignored, as in stock transformers). Both TRL modes get the same token ids and assistant-token mask
  (``assistant_masks``), fp32, no gradient checkpointing, constant lr, no logging.

Timing: the sides take turns, step by step, in this one process with torch.set_num_threads(--threads) (default 1):
after each TRL step (its on_step_end callback, outside TRL's timed span) ours and padded run one step each, so
a change of load on a shared machine hits every side alike and they never compete for cores. TRL runs twice (its
two modes), so ours and padded are measured over both runs (their first --warmup steps not measured). Real
tokens/s = non-pad tokens of the measured steps / their summed seconds (TRL: on_step_begin to on_step_end,
including its metrics in compute_loss). Padding fraction = pad tokens / all input positions of the measured steps.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

IGNORE_INDEX = -100


# -- pure helpers (tests/bench/test_sft_packing.py) -------------------------------------------------------------
def padding_fraction(real_tokens: int, total_tokens: int) -> float:
    """Share of the model's input positions that are padding: 1 - real / total (0 for an empty input)."""
    return 0.0 if total_tokens <= 0 else 1.0 - real_tokens / total_tokens


def padded_batch(documents: list, pad_token_id: int) -> dict[str, torch.Tensor]:
    """``documents`` right-padded to the longest: input_ids, attention_mask (1 on tokens) and labels (the token
    where its loss_mask is True, IGNORE_INDEX elsewhere and on padding; HF shifts them inside the model)."""
    width = max(len(d) for d in documents)
    input_ids = torch.full((len(documents), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(documents), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(documents), width), dtype=torch.long)
    for r, d in enumerate(documents):
        ids = torch.tensor(d.input_ids)
        input_ids[r, : len(d)] = ids
        labels[r, : len(d)] = torch.where(torch.tensor(d.loss_mask, dtype=torch.bool), ids, IGNORE_INDEX)
        attention_mask[r, : len(d)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def padded_batches(documents: list, batch_size: int, pad_token_id: int, seed: int, num_batches: int) -> list[dict]:
    """``num_batches`` padded batches of ``batch_size`` documents from a seeded shuffle, cycling over epochs."""
    rng, order, batches = random.Random(seed), [], []
    for _ in range(num_batches):
        if len(order) < batch_size:
            fresh = list(range(len(documents)))
            rng.shuffle(fresh)
            order += fresh
        batches.append(padded_batch([documents[i] for i in order[:batch_size]], pad_token_id))
        order = order[batch_size:]
    return batches


def tokens_of(batch: dict) -> tuple[int, int]:
    """(real tokens, all input positions) of a model input: attention_mask ones where given, else every position
    whose position_id continues a document (TRL's padding-free rows have no mask and no padding unless padded)."""
    ids = batch["input_ids"]
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum()), ids.numel()
    return ids.numel(), ids.numel()


def throughput(real_tokens: list[int], total_tokens: list[int], seconds: list[float]) -> dict:
    """Real tokens/s over the steps, padding fraction, mean real tokens and median seconds per step."""
    return {
        "tokens_per_s": sum(real_tokens) / sum(seconds),
        "padding": padding_fraction(sum(real_tokens), sum(total_tokens)),
        "tokens_per_step": statistics.mean(real_tokens),
        "s_per_step": statistics.median(seconds),
    }


# -- setup ------------------------------------------------------------------------------------------------------
def load_documents(args):
    """(config, tokenizer, model path, documents) of the quickstart data (plus --data overrides)."""
    from hydra import compose, initialize_config_dir

    from data_pipelines.loading import load_split, tokenize_rows
    from train.models.model_zoo import load_tokenizer, resolve_model_path

    overrides = ["experiment=quickstart", f"model.cache_dir={REPO / '.cache' / 'models'}",
                 f"data.synthetic.train.num_samples={args.docs}", *args.data]
    if args.model_path:
        overrides.append(f"model.path={args.model_path}")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path)
    rows = load_split(cfg.data, "train")
    documents, _ = tokenize_rows(rows, tokenizer, cfg.data.max_seq_len, cfg.data.system_prompt, cfg.data.multi_turn)
    return cfg, tokenizer, str(path), documents


def fresh_model(path: str, cfg, stock_sdpa: bool = False):
    """The model as our recipes load it (``sdpa``: attention per document on plain packed rows), or with
    ``stock_sdpa`` under transformers' own sdpa (what a plain HF loop and TRL run; our forward then uses the
    dense mask)."""
    from transformers import AutoModelForCausalLM

    from train.models.model_zoo import load_model

    if stock_sdpa:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    else:
        model = load_model(path, "sdpa", torch.float32)
    model.train()
    return model


def optimizer_of(model, cfg):
    t = cfg.trainer
    return torch.optim.AdamW(model.parameters(), lr=float(t.lr), betas=tuple(float(b) for b in t.betas),
                             weight_decay=float(t.weight_decay))


class Loop:
    """One of our two hand-written sides, a step at a time (so that the sides can take turns): the loss of a
    batch, backward, grad clip, AdamW. Records each step's seconds and (real, all) tokens after ``warmup``."""

    def __init__(self, model, cfg, batches, step_loss, counts, warmup: int):
        self.model, self.batches, self.step_loss, self.counts, self.warmup = model, batches, step_loss, counts, warmup
        self.max_grad_norm = float(cfg.trainer.max_grad_norm)
        self.optimizer = optimizer_of(model, cfg)
        self.done, self.seconds, self.tokens = 0, [], []

    def step(self) -> None:
        batch = self.batches[self.done % len(self.batches)]
        start = time.perf_counter()
        loss = self.step_loss(self.model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.done >= self.warmup:
            self.seconds.append(time.perf_counter() - start)
            self.tokens.append(self.counts(batch))
        self.done += 1

    def result(self) -> dict:
        return throughput([c[0] for c in self.tokens], [c[1] for c in self.tokens], self.seconds)


# -- sides ------------------------------------------------------------------------------------------------------
def ours_loop(cfg, tokenizer, path, documents, args, dense: bool = False) -> Loop:
    """The project's packed stream through the SFT forward and loss (``dense``: the dense-mask attention, the path
    before per-document attention)."""
    from data_pipelines.batching import PackedBatchStream
    from train.models.forward import token_logprobs
    from train.sft.loss import TokenCrossEntropy, loss_tokens

    stream = PackedBatchStream(documents, args.row_tokens, args.rows, tokenizer.pad_token_id, args.seed)
    batches = [stream.next() for _ in range(args.warmup + args.steps)]

    def step_loss(model, batch):
        logprobs, _ = token_logprobs(model, batch, "sdpa")
        loss, _ = TokenCrossEntropy(loss_tokens(batch))(logprobs, None, batch, {})
        return loss

    return Loop(fresh_model(path, cfg, stock_sdpa=dense), cfg, batches, step_loss,
                lambda b: (b.num_tokens - b.num_padding, b.num_tokens),
                args.warmup)


def padded_loop(cfg, tokenizer, path, documents, args) -> Loop:
    """A plain HF loop: right-padded batches, ``model(..., labels)``."""
    batches = padded_batches(documents, args.padded_batch, tokenizer.pad_token_id, args.seed, args.warmup + args.steps)
    return Loop(fresh_model(path, cfg, stock_sdpa=True), cfg, batches, lambda model, b: model(**b, use_cache=False).loss, tokens_of,
                args.warmup)


def run_trl(cfg, tokenizer, path, documents, args, mode: str, output_dir: str, between=None) -> dict:
    """trl.SFTTrainer in ``mode`` "packing" (bfd) or "padding_free"; per-step time from its callbacks, tokens
    from its collator's output. ``between()`` runs after each of its steps, outside the timed span (the other
    sides' turns)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    order = list(range(len(documents)))
    random.Random(args.seed).shuffle(order)
    dataset = Dataset.from_list([{"input_ids": documents[i].input_ids, "assistant_masks": [int(m) for m in documents[i].loss_mask]}
                                 for i in order])
    t = cfg.trainer
    packing = mode == "packing"
    config = SFTConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, gradient_checkpointing=False, activation_checkpointing=False,
        packing=packing, packing_strategy="bfd", padding_free=not packing,
        max_length=args.row_tokens if packing else None,
        per_device_train_batch_size=args.rows if packing else args.padded_batch, gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps, learning_rate=float(t.lr), adam_beta1=float(t.betas[0]),
        adam_beta2=float(t.betas[1]), weight_decay=float(t.weight_decay), max_grad_norm=float(t.max_grad_norm),
        optim="adamw_torch", lr_scheduler_type="constant", warmup_steps=0, logging_strategy="no",
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=args.seed,
        shuffle_dataset=False, dataset_num_proc=None,
    )
    begins, seconds, counts = [], [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            begins.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            seconds.append(time.perf_counter() - begins[-1])
            if between is not None:
                between()

    trainer = SFTTrainer(model=fresh_model(path, cfg, stock_sdpa=True), args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Clock()])
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        counts.append(tokens_of(batch))
        return batch

    trainer.data_collator = counting
    trainer.train()
    measured = counts[args.warmup : args.warmup + args.steps]  # the dataloader may prefetch one batch more
    return throughput([c[0] for c in measured], [c[1] for c in measured], seconds[args.warmup:])


# -- report -----------------------------------------------------------------------------------------------------
def report(args, results: dict, loads: dict) -> None:
    padded = results["padded"]["tokens_per_s"]
    print(f"\nSFT throughput, {args.steps} measured steps after {args.warmup} warm-up, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), the sides taking turns step by step in one process; rows {args.rows} x "
          f"{args.row_tokens} tokens, padded batch {args.padded_batch} documents{'; data ' + ' '.join(args.data) if args.data else ''}")
    header = f"{'side':22s}{'real tok/s':>12s}{'vs padded':>11s}{'padding':>9s}{'real tok/step':>15s}{'s/step (med)':>14s}{'load 1m':>10s}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:22s}{r['tokens_per_s']:12.0f}{r['tokens_per_s'] / padded:10.2f}x{100 * r['padding']:8.1f}%"
              f"{r['tokens_per_step']:15.0f}{r['s_per_step']:14.3f}{loads[name]:10.1f}")
    ours = results["ours packed"]
    print(f"ours: padding {100 * ours['padding']:.1f}% (goal < 3%: {'met' if ours['padding'] < 0.03 else 'NOT met'}); "
          f"{ours['tokens_per_s'] / padded:.2f}x the padded loop's real tokens/s (goal >= 1.5x: "
          f"{'met' if ours['tokens_per_s'] >= 1.5 * padded else 'NOT met'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row-tokens", type=int, default=512, help="our row budget and TRL's max_length (quickstart: 512)")
    parser.add_argument("--rows", type=int, default=2, help="rows per step, ours and TRL packing (quickstart: 2)")
    parser.add_argument("--padded-batch", type=int, default=None,
                        help="documents per padded / TRL padding-free step (default: ours' documents per step)")
    parser.add_argument("--docs", type=int, default=2000, help="training rows generated (data.synthetic.train.num_samples)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (every side)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--dense", action="store_true",
                        help="also ours with the dense [rows, 1, seq, seq] mask (the path before per-document attention)")
    parser.add_argument("--data", nargs="*", default=[], help="Hydra overrides of the data, e.g. data.synthetic.train.verbosity=0.5")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    cfg, tokenizer, path, documents = load_documents(args)
    if args.padded_batch is None:
        mean_length = statistics.mean(len(d) for d in documents)
        args.padded_batch = max(1, round(args.rows * args.row_tokens * 0.97 / mean_length))
    print(f"{len(documents)} documents, {statistics.mean(len(d) for d in documents):.1f} tokens on average "
          f"(min {min(len(d) for d in documents)}, max {max(len(d) for d in documents)})", flush=True)
    torch.manual_seed(args.seed)
    loops = {"ours packed": ours_loop(cfg, tokenizer, path, documents, args),
             "padded": padded_loop(cfg, tokenizer, path, documents, args)}
    if args.dense:
        loops["ours dense mask"] = ours_loop(cfg, tokenizer, path, documents, args, dense=True)

    def turns():  # one step of each of our sides
        for loop in loops.values():
            loop.step()

    results, loads = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp, contextlib.chdir(tmp):
        if args.skip_trl:
            for _ in range(args.warmup + args.steps):
                turns()
        for mode, name in (() if args.skip_trl else (("packing", "TRL packing"), ("padding_free", "TRL padding-free"))):
            results[name] = run_trl(cfg, tokenizer, path, documents, args, mode, tmp, between=turns)
            loads[name] = os.getloadavg()[0]
            print(f"{name}: {results[name]['tokens_per_s']:.0f} real tokens/s, padding {100 * results[name]['padding']:.1f}%", flush=True)
    for name, loop in loops.items():
        results[name], loads[name] = loop.result(), os.getloadavg()[0]
    results = {n: results[n] for n in ("ours packed", "ours dense mask", "padded", "TRL packing", "TRL padding-free")
               if n in results}
    report(args, results, loads)


if __name__ == "__main__":
    main()
