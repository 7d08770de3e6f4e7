"""Mamba-2 generation on its constant-size recurrent state (train/models/ssm_decode.py, reached through
train/models/sampling.py's ``sample``), against recomputing the whole sequence with no cache for every token."""

import pytest
import torch
from omegaconf import OmegaConf

from train.models.model_zoo import load_model, load_tokenizer, resolve_model_path
from train.models.sampling import left_padded, sample, sample_tokens
from train.models.ssm_decode import RecurrentDecoder
from train.workers.rollout_worker import RolloutWorker

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = {"model_type": "mamba2", "hidden_size": 32, "num_hidden_layers": 2, "expand": 2, "num_heads": 4, "head_dim": 16,
        "state_size": 16, "n_groups": 1, "conv_kernel": 4, "chunk_size": 8, "tie_word_embeddings": True}
PROMPTS = ["What is 2 + 3?", "Compute 17 + 25, then subtract 9 from the result.", "7 * 8"]


@pytest.fixture(scope="module")
def mamba_path(tmp_path_factory):
    cfg = OmegaConf.create({"path": None, "cache_dir": str(tmp_path_factory.mktemp("ssm")),
                            "tiny": {"vocab_size": 384, "seed": 2, "arch": ARCH}})
    return resolve_model_path(cfg)


@pytest.fixture(scope="module")
def mamba(mamba_path):
    return load_model(mamba_path).eval(), load_tokenizer(mamba_path)


@torch.no_grad()
def recompute(model, ids, mask, max_new_tokens, eos, pad, temperature=0.0, top_p=1.0, generator=None,
              group_size=1, compact_fraction=0.25):
    """The reference: every token from a full no-cache forward over prompt + tokens so far (float64 log-probs),
    with the rows still generating (the same rule as ``sample``: finished rows leave once a ``compact_fraction``
    of those present is done) drawing in order from ``generator``."""
    ids, mask = ids.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0)
    out = torch.full((len(ids), max_new_tokens), pad)
    logprobs = torch.zeros(len(ids), max_new_tokens, dtype=torch.float64)
    seqs = [list(r) for r in ids.tolist()]
    masks = [list(r) for r in mask.tolist()]
    rows, done = list(range(len(ids))), [False] * len(ids)
    for t in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([seqs[r] for r in rows]),
                       attention_mask=torch.tensor([masks[r] for r in rows]), use_cache=False).logits[:, -1]
        token = sample_tokens(logits, temperature, top_p, generator)
        for k, r in enumerate(rows):
            if done[r]:
                continue
            out[r, t] = token[k]
            if temperature > 0:
                logprobs[r, t] = torch.log_softmax(logits[k].double() / temperature, -1)[token[k]]
            done[r] = int(token[k]) == eos
            seqs[r].append(int(token[k]))
            masks[r].append(1)
        if all(done[r] for r in rows):
            break
        if sum(done[r] for r in rows) >= max(1, int(compact_fraction * len(rows))):
            rows = [r for r in rows if not done[r]]
        width = max(len(seqs[r]) for r in rows)
        for r in rows:  # a finished row still present is fed pad, as ``sample`` does
            while len(seqs[r]) < width:
                seqs[r].append(pad)
                masks[r].append(1)
    return out, logprobs


def _eos_for_early_stop(model, tok, enc):
    """A token that row 0 produces greedily at step 2, so some rows finish early and compaction runs."""
    free, _ = recompute(model, enc["input_ids"], enc["attention_mask"], 12, -1, tok.pad_token_id)
    return int(free[0, 2])


def test_greedy_matches_recomputing_the_whole_sequence(mamba):
    model, tok = mamba
    enc = left_padded(tok, PROMPTS, "cpu")
    eos = _eos_for_early_stop(model, tok, enc)
    expected, _ = recompute(model, enc["input_ids"], enc["attention_mask"], 12, eos, tok.pad_token_id)
    got = sample(model, enc["input_ids"], enc["attention_mask"], 12, eos, tok.pad_token_id, temperature=0.0)
    assert got.tolist() == expected.tolist()
    assert (got[0, 3:] == tok.pad_token_id).all()  # row 0 stopped at its eos and left the state
    # Hugging Face's generate (its own Mamba-2 cache) agrees
    hf = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=-1, pad_token_id=tok.pad_token_id)
    free = sample(model, enc["input_ids"], enc["attention_mask"], 12, -1, tok.pad_token_id, temperature=0.0)
    assert free.tolist() == hf[:, enc["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("compact_fraction", [0.25, 2.0])  # 2.0: finished rows stay until the end
def test_seeded_samples_and_logprobs_match_recomputation(mamba, compact_fraction):
    model, tok = mamba
    enc = left_padded(tok, PROMPTS[:2], "cpu")
    eos = _eos_for_early_stop(model, tok, enc)
    kwargs = {"temperature": 0.8, "top_p": 0.9, "group_size": 3, "compact_fraction": compact_fraction}
    expected, expected_lp = recompute(model, enc["input_ids"], enc["attention_mask"], 10, eos, tok.pad_token_id,
                                      generator=torch.Generator().manual_seed(5), **kwargs)
    got, got_lp = sample(model, enc["input_ids"], enc["attention_mask"], 10, eos, tok.pad_token_id,
                         generator=torch.Generator().manual_seed(5), return_logprobs=True, **kwargs)
    assert got.tolist() == expected.tolist()
    assert torch.allclose(got_lp.double(), expected_lp, atol=1e-4)
    assert (got_lp[got == tok.pad_token_id] == 0).all() and (got_lp[got != tok.pad_token_id] < 0).all()


def test_chunked_prefill_equals_one_pass_and_steps_continue_it(mamba):
    model, tok = mamba
    enc = left_padded(tok, PROMPTS, "cpu")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
        for chunk in (3, ids.shape[1] - 1, ids.shape[1]):  # width - 1: the last chunk is one token
            decoder = RecurrentDecoder(model, prefill_chunk=chunk)
            assert torch.allclose(decoder.prefill(ids, mask), full, atol=1e-5), chunk
        nxt = full.argmax(-1)
        stepped = decoder.step(nxt)
        longer = model(input_ids=torch.cat([ids, nxt[:, None]], 1), attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
                       use_cache=False).logits[:, -1]
    assert torch.allclose(stepped, longer, atol=1e-5)


def test_state_size_is_fixed_by_the_architecture_not_the_length(mamba):
    model, _ = mamba
    decoder = RecurrentDecoder(model, prefill_chunk=64)
    conv_dim = ARCH["expand"] * ARCH["hidden_size"] + 2 * ARCH["n_groups"] * ARCH["state_size"]  # x, B, C channels
    per_row = ARCH["num_hidden_layers"] * 4 * (conv_dim * ARCH["conv_kernel"]
                                               + ARCH["num_heads"] * ARCH["head_dim"] * ARCH["state_size"])  # fp32
    sizes = []
    with torch.no_grad():
        for length in (5, 300):
            ids = torch.randint(10, 300, (2, length))
            logits = decoder.prefill(ids, torch.ones_like(ids))
            sizes.append(decoder.state_bytes())
            for _ in range(40):
                logits = decoder.step(logits.argmax(-1))
            sizes.append(decoder.state_bytes())
        decoder.repeat(3)
        assert decoder.state_bytes() == 3 * sizes[0]
        decoder.select(torch.tensor([0, 4]))
        assert decoder.state_bytes() == sizes[0]
    assert sizes == [2 * per_row] * 4


def test_rollout_worker_samples_mamba_with_logprobs(mamba_path):
    worker = RolloutWorker(str(mamba_path))
    rollouts = worker.generate(PROMPTS[:2], group_size=2, max_new_tokens=6, temperature=1.0, seed=3)
    again = worker.generate(PROMPTS[:2], group_size=2, max_new_tokens=6, temperature=1.0, seed=3)
    assert [r.response_ids for r in rollouts] == [r.response_ids for r in again]
    assert all(r.logprobs is not None and len(r.logprobs) == len(r.response_ids) for r in rollouts)
    assert all(lp < 0 for r in rollouts for lp in r.logprobs)


@pytest.mark.slow
def test_rl_with_mamba2_corrects_the_mismatch_from_recorded_logprobs(compose, tmp_path):
    """``python -m train experiment=quickstart_rl model=tiny_mamba2`` with the rollout/trainer mismatch correction:
    it needs the sampler's log-probs, which the recurrent-state rollout now records; in fp32 the recurrent step and
    the trainer's full forward agree, so the measured mismatch is ~0."""
    import os

    from omegaconf import open_dict

    from train.__main__ import run

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    mismatch = "algorithm.loss.mismatch={_target_:algorithms.mismatch.rollout_correction,_partial_:true,mode:tis,threshold:2.0}"
    cfg = compose(["experiment=quickstart_rl", "model=tiny_mamba2", "trainer.max_steps=1", "rollout.prompts_per_step=2",
                   "algorithm.group_size=2", "rollout.max_new_tokens=8", "trainer.eval_every=0", "trainer.save_every=0",
                   "trainer.resume=null", "data.synthetic.eval.num_samples=2", "cluster.ray_num_cpus=2",
                   "rollout.num_workers=1", mismatch, f"run_dir={tmp_path}/rl"], test_model=False)
    with open_dict(cfg):
        cfg.model.path = None
        cfg.model.tiny.arch = dict(ARCH)
    try:
        first = run(cfg)["history"][0]
    finally:
        import ray

        ray.shutdown()
    assert 0.0 <= first["train/mismatch_kl"] < 1e-4
