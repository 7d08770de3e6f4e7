"""Held-out evaluation metrics, greedy and sampled (pass@1 averaged over k samples), on scripted completions."""

import pytest
import torch

import train.models.evaluate as ev


def test_sampled_metrics_average_over_k_samples_per_problem(tiny_tokenizer, monkeypatch):
    tok = tiny_tokenizer
    eos = tok.eos_token_id

    def ids(text, end=True):
        return tok.encode(text, add_special_tokens=False) + ([eos] if end else [])

    rows = [{"messages": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"},
            {"messages": [{"role": "user", "content": "What is 3 + 4?"}], "answer": "7"}]
    scripted = [ids("The answer is \\boxed{5}."), ids("so \\boxed{6}."),  # problem 0: right, wrong
                ids("The answer is \\boxed{7}."), ids("\\boxed{7}", end=False)]  # problem 1: right, right but truncated
    width = max(len(s) for s in scripted)
    calls = []

    def fake_sample(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_p,
                    generator, group_size):
        calls.append((input_ids.shape[0] * group_size, temperature, top_p))
        return torch.tensor([s + [pad_token_id] * (width - len(s)) for s in scripted])

    monkeypatch.setattr(ev, "sample", fake_sample)
    monkeypatch.setattr(ev, "generate_greedy", lambda *a, **k: [scripted[0], scripted[1]])
    model = torch.nn.Linear(1, 1)
    out = ev.evaluate(model, tok, rows, max_new_tokens=width, batch_size=8, samples=2, temperature=0.7, top_p=0.9)
    assert calls == [(4, 0.7, 0.9)]  # both problems x 2 samples in one batch, at the requested temperature
    lengths = [len(s) for s in scripted]
    assert out["eval/accuracy"] == 0.5  # greedy: right, wrong
    assert out["eval/sampled_accuracy"] == 0.75
    assert out["eval/sampled_response_length_mean"] == pytest.approx(sum(lengths) / 4)
    assert out["eval/sampled_truncated_fraction"] == 0.25
    assert out["eval/sampled_tokens_per_correct"] == pytest.approx(sum(lengths) / 3)
    assert "eval/sampled_accuracy" not in ev.evaluate(model, tok, rows, max_new_tokens=width, samples=0)


def test_held_out_accuracy_uses_math_verify_equivalence(tiny_tokenizer, monkeypatch):
    """Training-time evaluation scores like the correctness reward: \\frac{1}{2} = 0.5 and x=3 = 3 are right
    (the former exact match of the boxed string counted both wrong); a wrong value and a missing answer are wrong."""
    tok = tiny_tokenizer
    texts = ["<think>half of one</think> The answer is \\boxed{\\frac{1}{2}}.", "so \\boxed{x=3}",
             "The answer is \\boxed{0.5}.", "The answer is \\boxed{4}.", "The answer is \\boxed{7}."]
    answers = ["0.5", "3", "\\frac{1}{2}", "5", None]
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}], "answer": a} for i, a in enumerate(answers)]
    completions = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
    monkeypatch.setattr(ev, "generate_greedy", lambda *a, **k: completions)
    out = ev.evaluate(torch.nn.Linear(1, 1), tok, rows, max_new_tokens=64)
    assert [s["correct"] for s in out["samples"]] == [True, True, True, False, False]
    assert out["eval/accuracy"] == pytest.approx(3 / 5)
