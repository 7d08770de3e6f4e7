"""The rollout sampling loop (train/models/sampling.py): the distribution it draws from, and the tokens it produces
against Hugging Face `generate`, with finished rows dropped from the batch or kept."""

import pytest
import torch

from train.models.sampling import cut_at_eos, left_padded, sample, sample_tokens

LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64))


@pytest.mark.parametrize(
    "temperature, top_p, expected",
    [
        (1.0, 1.0, [0.5, 0.3, 0.15, 0.05]),
        # nucleus 0.7: tokens whose more-likely mass is < 0.7 stay (0 and 0.5 -> tokens 0, 1), renormalised by 0.8
        (1.0, 0.7, [0.625, 0.375, 0.0, 0.0]),
        # T = 2: p_i^(1/2) / sum_j p_j^(1/2)
        (2.0, 1.0, [v**0.5 / sum(w**0.5 for w in (0.5, 0.3, 0.15, 0.05)) for v in (0.5, 0.3, 0.15, 0.05)]),
    ],
)
def test_sample_tokens_draws_from_the_tempered_nucleus_distribution(temperature, top_p, expected):
    n = 200_000
    generator = torch.Generator().manual_seed(0)
    tokens = sample_tokens(LOGITS.expand(n, 4), temperature, top_p, generator)
    freq = torch.bincount(tokens, minlength=4).double() / n
    # binomial standard error <= sqrt(0.25 / n) = 0.0011: 5 sigma
    assert freq.tolist() == pytest.approx(expected, abs=0.0056)
    assert all(f == 0 for f, e in zip(freq.tolist(), expected) if e == 0)  # cut tokens never drawn


def test_sample_tokens_is_reproducible_and_greedy_at_temperature_zero():
    logits = torch.randn(64, 50)
    a = sample_tokens(logits, 1.0, 0.9, torch.Generator().manual_seed(3))
    b = sample_tokens(logits, 1.0, 0.9, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(sample_tokens(logits, 0.0, 1.0, None), logits.argmax(-1))


@pytest.fixture
def tiny(model_cache):
    from omegaconf import OmegaConf

    from tests.conftest import TEST_ARCH
    from train.models.model_zoo import load_model, load_tokenizer, resolve_model_path

    cfg = OmegaConf.create({"path": None, "cache_dir": str(model_cache), "tiny": {"vocab_size": 384, "seed": 0, "arch": dict(TEST_ARCH)}})
    path = str(resolve_model_path(cfg))
    return load_model(path, "sdpa", torch.float32, torch.device("cpu")).eval(), load_tokenizer(path)


def test_greedy_tokens_equal_generate_with_rows_dropped_or_kept(tiny, one_thread):
    """Left-padded prompts of different lengths; ``eos`` is a token the random model emits early in some rows
    and late or never in others, so rows leave the batch at different steps."""
    model, tok = tiny
    side, tok.padding_side = tok.padding_side, "left"
    enc = tok(["Ann has 12 apples. How many?", "What is 3 + 4?", "Hi", "Ben gets 5 more pens now."],
              return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = side
    ids, mask = enc["input_ids"], enc["attention_mask"]
    free = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=40,
                          min_new_tokens=40, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    eos = int(free[0, 5])  # row 0 stops at step 5 at the latest; other rows whenever they emit it
    reference = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=40,
                               eos_token_id=eos, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    reference = torch.nn.functional.pad(reference, (0, 40 - reference.shape[1]), value=tok.pad_token_id)
    stops = [(row == eos).nonzero()[0].item() if (row == eos).any() else None for row in reference]
    assert len({s for s in stops}) > 1  # rows finish at different steps
    for fraction in (0.0, 0.5, 2.0):  # drop each finished row at once / once half finished / never
        got = sample(model, ids, mask, 40, eos, tok.pad_token_id, temperature=0.0, compact_fraction=fraction)
        assert torch.equal(got, reference), fraction


def test_one_prefill_per_prompt_gives_the_tokens_of_repeated_prompts(tiny, one_thread):
    model, tok = tiny
    side, tok.padding_side = tok.padding_side, "left"
    enc = tok(["What is 3 + 4?", "Ann has 12 apples. How many?"], return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = side
    ids, mask = enc["input_ids"], enc["attention_mask"]
    repeated = sample(model, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), 20, -1, tok.pad_token_id,
                      generator=torch.Generator().manual_seed(5))
    grouped = sample(model, ids, mask, 20, -1, tok.pad_token_id, generator=torch.Generator().manual_seed(5), group_size=3)
    assert torch.equal(grouped, repeated)
    assert not torch.equal(grouped[0], grouped[1])  # samples of one prompt differ


def test_sampled_rows_stop_at_eos_and_pad_after(tiny, one_thread):
    model, tok = tiny
    ids = torch.randint(5, 300, (16, 6))
    mask = torch.ones_like(ids)
    free = sample(model, ids, mask, 30, -1, tok.pad_token_id, generator=torch.Generator().manual_seed(1))
    eos = int(free[:, 3].mode().values)  # a token the model samples often
    out = sample(model, ids, mask, 30, eos, tok.pad_token_id, generator=torch.Generator().manual_seed(1))
    again = sample(model, ids, mask, 30, eos, tok.pad_token_id, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    finished = 0
    for row in out.tolist():
        if eos in row:
            finished += 1
            end = row.index(eos)
            assert all(t == tok.pad_token_id for t in row[end + 1:])
    assert finished > 0


def test_cut_at_eos_keeps_the_eos_and_marks_rows_without_one_truncated():
    eos, pad = 7, 0
    assert cut_at_eos([3, 4, 7, 0, 0], eos) == ([3, 4, 7], False)
    assert cut_at_eos([3, 7, 7], eos, pad) == ([3, 7], False)
    assert cut_at_eos([3, 0, 4], eos) == ([3, 0, 4], True)  # a rollout keeps every generated token
    assert cut_at_eos([3, 0, 4], eos, pad) == ([3, 4], True)  # evaluation drops padding


def test_left_padded_pads_texts_and_ids_on_the_left_and_restores_the_side(tiny_tokenizer):
    side = tiny_tokenizer.padding_side
    texts = left_padded(tiny_tokenizer, ["1+1=", "12+34="], "cpu")
    assert tiny_tokenizer.padding_side == side
    ids = [tiny_tokenizer("1+1=", add_special_tokens=False)["input_ids"], tiny_tokenizer("12+34=", add_special_tokens=False)["input_ids"]]
    from_ids = left_padded(tiny_tokenizer, ids, "cpu")
    for enc in (texts, from_ids):
        assert enc["attention_mask"].tolist()[1] == [1] * len(ids[1])
        assert enc["attention_mask"][0, -1] == 1 and enc["attention_mask"][0, 0] == 0  # padding on the left
    assert torch.equal(texts["input_ids"], from_ids["input_ids"])


@pytest.mark.parametrize("temperature, compact", [(0.7, 0.25), (1.0, 2.0)])
def test_recorded_logprobs_are_the_sampled_tokens_under_the_tempered_distribution(tiny, one_thread, temperature, compact):
    """The log-probs the loop records equal a teacher-forced forward of prompt + response: log_softmax(logits / T)
    at each sampled token (0 after eos), with rows dropped from the batch or kept; the tokens do not change."""
    model, tok = tiny
    ids = torch.randint(5, 300, (3, 5))
    mask = torch.ones_like(ids)
    free = sample(model, ids, mask, 12, -1, tok.pad_token_id, generator=torch.Generator().manual_seed(2))
    eos = int(free[:, 2].mode().values)
    kwargs = {"temperature": temperature, "generator": torch.Generator().manual_seed(4), "compact_fraction": compact,
              "group_size": 2}
    out, logprobs = sample(model, ids, mask, 12, eos, tok.pad_token_id, return_logprobs=True, **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(4)
    assert torch.equal(out, sample(model, ids, mask, 12, eos, tok.pad_token_id, **kwargs))
    assert logprobs.dtype == torch.float32 and logprobs.shape == out.shape
    for row in range(out.shape[0]):
        response, _ = cut_at_eos(out[row].tolist(), eos)
        full = torch.cat([ids[row // 2], torch.tensor(response)])[None]
        with torch.no_grad():
            logits = model(input_ids=full).logits[0, ids.shape[1] - 1:-1].double() / temperature
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)
        torch.testing.assert_close(logprobs[row, : len(response)].double(), expected, rtol=0, atol=2e-4)
        assert logprobs[row, len(response):].abs().sum() == 0


def test_greedy_records_zero_logprobs(tiny, one_thread):
    model, tok = tiny
    ids = torch.randint(5, 300, (2, 4))
    out, logprobs = sample(model, ids, torch.ones_like(ids), 6, -1, tok.pad_token_id, temperature=0.0, return_logprobs=True)
    assert torch.equal(out, sample(model, ids, torch.ones_like(ids), 6, -1, tok.pad_token_id, temperature=0.0))
    assert logprobs.abs().sum() == 0  # a point mass: log 1
