"""Held-out evaluation: greedy generation, exact match of the final boxed answer, response lengths."""

from __future__ import annotations

import torch

from data_pipelines.chat_format import generation_prompt
from data_pipelines.loading import final_boxed
from data_pipelines.prompts import prompt_messages


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[list[int]]:
    """Greedy completions (token ids, without the prompt, cut at end of turn) of ``prompts``."""
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    completions = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id) + 1]
                else:
                    row = [t for t in row if t != tokenizer.pad_token_id]
                completions.append(row)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return completions


def evaluate(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 64) -> dict:
    """eval/accuracy (exact match of the last boxed answer), eval/response_length (mean, p90), eval/truncated."""
    prompts = [generation_prompt(prompt_messages(row)) for row in rows]
    completions = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    correct = [final_boxed(text) == row["answer"] for text, row in zip(texts, rows)]
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.float)
    truncated = [tokenizer.eos_token_id not in c for c in completions]
    return {
        "eval/accuracy": sum(correct) / len(rows),
        "eval/response_length_mean": lengths.mean().item(),
        "eval/response_length_p90": lengths.quantile(0.9).item(),
        "eval/truncated_fraction": sum(truncated) / len(rows),
        "eval/tokens_per_correct": lengths.sum().item() / max(sum(correct), 1),
        "samples": [
            {"prompt": p, "response": t, "answer": row["answer"], "correct": c}
            for p, t, row, c in list(zip(prompts, texts, rows, correct))[:8]
        ],
    }
