"""Common architectures from their configs (random weights, tiny sizes), through our training and rollout code:
a packed SFT step equals the per-document unpacked step, the rollout sampling loop equals ``generate`` (greedy),
a checkpoint we write loads with ``AutoModelForCausalLM``, and two GRPO steps run from ``model=hf model.path=``.
Architectures our packed mask cannot drive exactly are refused (train/models/architectures.py), shown here by
the same equivalence failing for them."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from data_pipelines.arithmetic import ArithmeticSpec, generate
from data_pipelines.chat_format import chat_ids, generation_prompt
from data_pipelines.packing import IGNORE_INDEX, Document, collate
from train.models.architectures import packed_attention_problem
from train.models.attention import model_inputs
from train.models.forward import sft_loss_sum
from train.models.model_zoo import build_tiny_model, load_model, load_tokenizer
from train.models.sampling import left_padded, sample
from train.run import checkpoint

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 1024}
ARCHITECTURES = {
    "qwen2": {"model_type": "qwen2"},
    "qwen3": {"model_type": "qwen3", "head_dim": 8},
    "llama": {"model_type": "llama"},
    "mistral": {"model_type": "mistral", "sliding_window": None},  # Mistral-7B-v0.3 / Nemo: no window
    "gemma3": {"model_type": "gemma3_text", "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 512},
    "phi3": {"model_type": "phi3"},
    "qwen3_moe": {"model_type": "qwen3_moe", "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32},
    "mixtral": {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2},
}
# fp32 throughout (the MoE kernels take no float64): observed differences are ~1e-7 relative, the refused
# sliding-window cases below miss by > 1e-4 (loss) and ~1x (gradients)
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4


def _documents(tokenizer, n=3, seed=11):
    rows = generate(ArithmeticSpec(verbosity=0.5), n, seed=seed)
    return rows, [Document(*chat_ids(tokenizer, row["messages"]), sample_id=row["id"]) for row in rows]


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def saved(request, tiny_tokenizer, tmp_path_factory):
    """(name, directory) of a random model of the architecture saved with the tiny tokenizer, as a user's
    checkpoint would be (``model=hf model.path=<directory>``)."""
    path = tmp_path_factory.mktemp(request.param)
    build_tiny_model(tiny_tokenizer, {**SMALL, **ARCHITECTURES[request.param]}, seed=0).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return request.param, path


def _unpacked_loss(model, documents):
    """Sum of token cross-entropies over the loss tokens, one document per forward, the model's own causal mask."""
    total = 0.0
    for doc in documents:
        ids = torch.tensor([doc.input_ids])
        labels = torch.tensor([[t if keep else IGNORE_INDEX for t, keep in zip(doc.input_ids, doc.loss_mask)]])
        logits = model(input_ids=ids).logits[0, :-1].float()
        total = total + F.cross_entropy(logits, labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum")
    return total


def _loss_and_grads(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close_grads(packed, unpacked):
    assert packed.keys() == unpacked.keys() and packed
    for name, reference in unpacked.items():
        scale = reference.abs().max().item()
        assert (packed[name] - reference).abs().max().item() <= GRAD_RTOL * scale + 1e-12, name


def test_packed_sft_step_equals_the_unpacked_step(saved):
    name, path = saved
    tokenizer, model = load_tokenizer(path), load_model(path, "sdpa")
    _, docs = _documents(tokenizer)
    batch = collate([[docs[0], docs[1]], [docs[2]]], tokenizer.pad_token_id)  # two packed rows, tail padding
    packed_loss, packed_grads = _loss_and_grads(model, lambda: sft_loss_sum(model, batch, "sdpa")[0])
    unpacked_loss, unpacked_grads = _loss_and_grads(model, lambda: _unpacked_loss(model, docs))
    assert packed_loss == pytest.approx(unpacked_loss, rel=LOSS_RTOL)
    _assert_close_grads(packed_grads, unpacked_grads)


def test_rollout_sampling_loop_equals_generate_greedy(saved):
    name, path = saved
    tokenizer, model = load_tokenizer(path), load_model(path, "sdpa").eval()
    rows, _ = _documents(tokenizer, n=2)
    prompts = [generation_prompt(tokenizer, row["messages"][:-1]) for row in rows]
    prompts[1] += "<think>\nLet me"  # different lengths: left padding
    enc = left_padded(tokenizer, prompts, "cpu")
    with torch.no_grad():
        ours = sample(model, enc["input_ids"], enc["attention_mask"], 16, tokenizer.eos_token_id,
                      tokenizer.pad_token_id, temperature=0.0)
        theirs = model.generate(**enc, max_new_tokens=16, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)[:, enc["input_ids"].shape[1]:]
    assert ours[:, : theirs.shape[1]].tolist() == theirs.tolist()
    assert (ours[:, theirs.shape[1]:] == tokenizer.pad_token_id).all()  # generate stops early only when all ended


def test_our_checkpoint_loads_with_auto_model(saved, tmp_path):
    name, path = saved
    tokenizer, model = load_tokenizer(path), load_model(path, "sdpa").eval()
    written = checkpoint.save(tmp_path / "run", 1, model, tokenizer, {"note": "test"})
    loaded = AutoModelForCausalLM.from_pretrained(written).eval()
    assert type(loaded) is type(model) and loaded.config.model_type == model.config.model_type
    ids = torch.tensor([_documents(tokenizer, n=1)[1][0].input_ids])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.fixture(scope="module")
def ray_session():
    """One Ray instance for every architecture's RL run (the runs start and stop their own actors)."""
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    yield
    ray.shutdown()


@pytest.mark.slow
def test_two_grpo_steps_run(saved, compose, tmp_path, ray_session):
    from tests.train.rl.test_rl import FAST_RL, VARIED_REWARD
    from train.rl.recipe import run

    name, path = saved
    cfg = compose(FAST_RL + VARIED_REWARD + ["model=hf", f"model.path={path}", "trainer.world_size=1",
                                             "rollout.num_workers=1", "rollout.reward_workers=0",
                                             "algorithm.group_size=2", "rollout.max_new_tokens=8",
                                             "trainer.save_every=0", f"run_dir={tmp_path}/rl",
                                             "data.max_seq_len=256"])  # + 8 new tokens: inside Gemma-3's window
    out = run(cfg)
    assert out["step"] == 2 and [h["rollout/policy_version"] for h in out["history"]] == [0, 1]
    assert all(torch.isfinite(torch.tensor(h["train/grad_norm"])) and h["train/grad_norm"] > 0 for h in out["history"])


# ------------------------------------------------------------------------------------------- refused


@pytest.mark.parametrize("arch", [
    {"model_type": "mistral", "sliding_window": 16},  # Mistral-7B-v0.1 style (window 4096 there)
    {"model_type": "gemma3_text", "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 16},
], ids=["mistral-window", "gemma3-window"])
def test_sliding_window_shorter_than_a_document_breaks_the_packed_mask_and_is_refused(tiny_tokenizer, arch):
    model = build_tiny_model(tiny_tokenizer, {**SMALL, **arch}, seed=0)
    model.set_attn_implementation("sdpa")
    _, docs = _documents(tiny_tokenizer)
    assert min(len(d) for d in docs) > 16
    batch = collate([docs], tiny_tokenizer.pad_token_id)
    packed = sft_loss_sum(model, batch, "sdpa")[0].item()
    unpacked = _unpacked_loss(model, docs).item()
    assert abs(packed - unpacked) > 1e-4 * abs(unpacked)  # the custom mask replaces the window
    problem = packed_attention_problem(model.config, "sdpa", 1024, "data.max_seq_len")
    assert f"model_type={arch['model_type']} has sliding-window attention layers (sliding_window=16)" in problem
    assert "set data.max_seq_len <= 16" in problem
    assert packed_attention_problem(model.config, "sdpa", 16, "data.max_seq_len") is None


def test_gemma2_has_no_sdpa_and_is_refused_there_and_exact_under_flex(tiny_tokenizer):
    arch = {"model_type": "gemma2", "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 512}
    model = build_tiny_model(tiny_tokenizer, {**SMALL, **arch}, seed=0).eval()
    _, docs = _documents(tiny_tokenizer)
    batch = collate([docs], tiny_tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="Gemma2ForCausalLM does not support an attention implementation through "
                                         "torch.nn.functional.scaled_dot_product_attention"):
        model.set_attn_implementation("sdpa")
    problem = packed_attention_problem(model.config, "sdpa", 100, "data.max_seq_len")
    assert problem == ("model_type=gemma2 has no model.attn_backend=sdpa implementation in transformers (it soft-caps "
                       "attention logits, attn_logit_softcapping=50.0): use model.attn_backend=flex or flash")
    with torch.no_grad():  # flex (forward-only on CPU) applies the soft-cap with our packed BlockMask
        model.set_attn_implementation("flex_attention")
        packed = model(**model_inputs(batch, "flex"), use_cache=False).logits[0]
        model.set_attn_implementation("eager")
        start = 0
        for doc in docs:
            reference = model(input_ids=torch.tensor([doc.input_ids])).logits[0]
            assert (packed[start:start + len(doc)] - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()
            start += len(doc)


def test_run_with_a_refused_architecture_stops_before_any_work(compose):
    from train.run.config_checks import ConfigError, check_rl, check_sft

    sft = compose(["experiment=quickstart"])
    sft.model.tiny.arch = {**SMALL, "model_type": "mistral", "sliding_window": 64}
    with pytest.raises(ConfigError, match=r"sliding_window=64.*data\.max_seq_len=\d+ tokens.*set data\.max_seq_len <= 64"):
        check_sft(sft)
    rl = compose(["experiment=quickstart_rl"])
    rl.model.tiny.arch = {**SMALL, "model_type": "gemma2", "head_dim": 8}
    with pytest.raises(ConfigError, match=r"model_type=gemma2 has no model\.attn_backend=sdpa implementation"):
        check_rl(rl)
    check_sft(compose(["experiment=quickstart"]))  # the default architecture passes
