"""SFT on the trainer ranks (train/sft/ranks.py + the PolicyTrainer shared with RL): the step on 2 ranks under
ZeRO-0/1/2/3 equals one process on the same rows, every packed row is trained once per epoch on one rank, a
2-rank run resumes exactly mid-epoch, and bad rank settings fail before any work naming the key."""

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from data_pipelines.packing import Document, collate
from tests.conftest import arithmetic_documents, rewind_checkpoints, tiny_model_path
from train.sft.loss import TokenCrossEntropy, loss_tokens

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("one_thread")
TRAINER = {"lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.0, "max_grad_norm": 0.0, "warmup_steps": 0}
FAST = [
    "experiment=quickstart",
    "trainer.warmup_steps=2",
    "trainer.lr=2e-2",
    "trainer.row_tokens=256",
    "data.max_seq_len=256",
    "trainer.rows_per_micro_batch=1",
    "trainer.grad_accum=2",
    "trainer.world_size=2",
    "trainer.eval_every=0",
    "trainer.resume=null",
    "data.synthetic.eval.num_samples=2",
    "rollout.max_new_tokens=4",
]


def _documents(tokenizer, count: int, seed: int) -> list[Document]:
    return arithmetic_documents(tokenizer, count, seed)


def _reference_gradients(path: str, docs: list[Document]) -> tuple[float, dict]:
    """float64, one document at a time, no packing: mean token cross-entropy over every loss token and its gradient."""
    from train.models.model_zoo import load_model

    model = load_model(path).double()
    total = sum(sum(d.loss_mask[1:]) for d in docs)
    loss = 0.0
    for doc in docs:
        ids = torch.tensor([doc.input_ids])
        logits = model(input_ids=ids).logits[0, :-1]  # [len-1, vocab]
        targets = torch.where(torch.tensor(doc.loss_mask[1:]), ids[0, 1:], -100)
        loss = loss + F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / total
    loss.backward()
    return float(loss.detach()), {n: p.grad.float() for n, p in model.named_parameters()}


def test_sft_step_on_2_ranks_under_every_zero_stage_equals_one_process(ray_session, model_cache, tiny_tokenizer):
    """ZeRO-0/1/2/3 (and ZeRO-2 with the optimizer offloaded to CPU). 4 micro-batches of 1, 2, 3 and 1 documents: rank 0 of 2 gets the first two (3 documents), rank 1 the last two
    (4), so their loss-token counts differ; each rank accumulates 2 micro-batches. Against a float64 computation,
    one document at a time without packing:
    - the loss within 1e-6 (relative) and the gradient within 1e-5 of each tensor's largest entry: fp32 sums of the
      same terms in another order;
    - the AdamW step of every split within 1% of lr of the 1-rank step (Adam's first step is lr * g / (|g| + eps):
      near-zero gradients amplify reduction-order noise elementwise; the bound of test_policy_trainer_zero.py).
    """
    from train.models.model_zoo import load_model
    from train.workers.actors import TrainerGroup

    path = tiny_model_path(model_cache, seed=5)
    docs = _documents(tiny_tokenizer, 7, seed=21)
    groups = [docs[0:1], docs[1:3], docs[3:6], docs[6:7]]
    batches = [collate([group], tiny_tokenizer.pad_token_id) for group in groups]  # one packed row each
    step_tokens = sum(loss_tokens(b) for b in batches)
    per_rank = [loss_tokens(batches[0]) + loss_tokens(batches[1]), loss_tokens(batches[2]) + loss_tokens(batches[3])]
    assert per_rank[0] != per_rank[1] and sum(per_rank) == step_tokens
    want_loss, want_grads = _reference_gradients(path, docs)
    initial = {n: p.detach() for n, p in load_model(path).named_parameters()}

    one_rank_step = None
    for world, stage, offload in [(1, 0, False), (2, 0, False), (2, 1, False), (2, 2, False), (2, 2, True), (2, 3, False)]:
        trainer_cfg = {**TRAINER, "zero_stage": stage, "offload_optimizer": offload}
        group = TrainerGroup(world, path, "sdpa", trainer_cfg, micro_batches_per_rank=4 // world)
        try:
            stats = group.train_step(batches, TokenCrossEntropy(step_tokens), [{}] * 4, keep_gradients=True)
            grads, weights = group.gradients(), group.full_state_dict()
        finally:
            group.shutdown()
        what = f"{world} rank(s) ZeRO-{stage}" + (" + CPU offload" if offload else "")
        if world == 2:
            assert [s["loss_tokens"] for s in stats] == per_rank, what  # each rank trained its own rows
        assert sum(s["loss_sum"] for s in stats) == pytest.approx(want_loss, rel=1e-6), what
        for name, want in want_grads.items():
            error = (grads[name] - want).abs().max().item()
            assert error <= 1e-5 * want.abs().max().item(), f"{what}: gradient of {name} off by {error:.2e}"
        step = {n: weights[n] - initial[n] for n in weights}
        if one_rank_step is None:
            one_rank_step = step
            assert max(s.abs().max().item() for s in step.values()) > 1e-3  # the step moved the weights
        for name, want in one_rank_step.items():
            assert (step[name] - want).abs().max().item() <= 1e-2 * TRAINER["lr"], f"{what}: AdamW step of {name}"


class RecordingLoss(TokenCrossEntropy):
    """The SFT loss that also appends (rank, sample ids of the micro-batch) to ``path`` (the ranks run locally)."""

    def __init__(self, step_loss_tokens: int, path: str):
        super().__init__(step_loss_tokens)
        self.path = path

    def __call__(self, logprobs, entropy, batch, extra):
        with open(self.path, "a") as f:
            f.write(json.dumps([torch.distributed.get_rank(), batch.sample_ids]) + "\n")
        return super().__call__(logprobs, entropy, batch, extra)


def test_one_epoch_on_2_ranks_trains_every_packed_row_exactly_once(ray_session, compose, tiny_tokenizer, tmp_path):
    from functools import partial

    from train.sft import curriculum
    from train.sft.recipe import run

    overrides = FAST + ["trainer.max_steps=null", "trainer.epochs=1", "trainer.save_every=0", "trainer.grad_accum=1"]
    for num_samples in range(60, 80):  # a training set whose packed rows fill whole steps of 2 rows (one per rank)
        cfg = compose(overrides + [f"data.synthetic.train.num_samples={num_samples}", f"run_dir={tmp_path}/run"])
        (phase,), _ = curriculum.plan(cfg, tiny_tokenizer)
        if phase.stream.batches_per_epoch() % 2 == 0:
            break
    rows = phase.stream.batches_per_epoch()
    assert phase.steps == rows // 2
    record = tmp_path / "trained.jsonl"
    run(cfg, loss_class=partial(RecordingLoss, path=str(record)))
    trained = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(trained) == rows  # one micro-batch (one packed row) per rank per step
    by_rank = {r: [tuple(ids) for rank, ids in trained if rank == r] for r in (0, 1)}
    assert len(by_rank[0]) == len(by_rank[1]) == rows // 2
    assert not set(by_rank[0]) & set(by_rank[1])  # no row on both ranks
    documents = [sid for _, ids in trained for sid in ids]
    assert sorted(documents) == sorted(d.sample_id for d in phase.stream.documents)  # every document exactly once


def test_resume_of_a_2_rank_run_mid_epoch_continues_with_the_same_losses(ray_session, compose, tmp_path):
    overrides = FAST + ["trainer.max_steps=6", "trainer.save_every=3", "trainer.zero_stage=2",
                        "data.synthetic.train.num_samples=200"]
    full = run_sft(compose(overrides + [f"run_dir={tmp_path}/full"]))
    run_sft(compose(overrides + [f"run_dir={tmp_path}/cut"]))
    ckpts = tmp_path / "cut" / "checkpoints"
    assert (ckpts / "step_3" / "deepspeed").is_dir()
    rewind_checkpoints(tmp_path / "cut", 3)  # the run "died" after its step-3 checkpoint, mid-epoch
    resumed = run_sft(compose(overrides + [f"run_dir={tmp_path}/cut", "trainer.resume=auto"]))
    assert resumed["losses"] == full["losses"][3:]  # exact on CPU: same rows per rank, weights, Adam state and lr
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(resumed["checkpoint"])  # HF format


def run_sft(cfg):
    from train.sft.recipe import run

    return run(cfg)


@pytest.mark.parametrize("overrides, key", [
    (["trainer.world_size=64"], r"trainer\.world_size=64 exceeds the \d+ (CPUs|GPUs)"),
    (["trainer.zero_stage=4"], r"trainer\.zero_stage=4 must be 0, 1, 2 or 3"),
    (["trainer.offload_optimizer=true", "trainer.zero_stage=0"], r"trainer\.offload_optimizer=true needs trainer\.zero_stage 1, 2 or 3"),
    (["trainer.num_threads=0"], r"trainer\.num_threads=0 must be an integer >= 1"),
])
def test_bad_rank_settings_fail_before_any_work_naming_the_key(compose, tmp_path, overrides, key):
    from train.run.config_checks import ConfigError

    cfg = compose(FAST + ["trainer.max_steps=2"] + overrides + [f"run_dir={tmp_path}/run"])
    with pytest.raises(ConfigError, match=key):
        run_sft(cfg)
    assert not (tmp_path / "run").exists()  # nothing written, no actor started


def test_curriculum_freezing_on_2_ranks_under_zero_2_holds_the_frozen_layer(ray_session, compose, tmp_path):
    """The two-phase curriculum of test_curriculum.py (layer 0 frozen in phase 1) on 2 ranks with ZeRO-2: layer 0
    is unchanged from the phase switch (step 3) to the end (step 6), layer 1 moved (train/workers/frozen_params.py)."""
    from omegaconf import open_dict
    from safetensors.torch import load_file

    from tests.train.sft.test_curriculum import BASE, CURRICULUM
    from train.__main__ import run

    cfg = compose(BASE + ["trainer.world_size=2", "trainer.zero_stage=2", "trainer.grad_accum=1",
                          f"run_dir={tmp_path}/run"])
    with open_dict(cfg):
        cfg.curriculum = OmegaConf.create(CURRICULUM)
    run(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    at_3, at_6 = load_file(ckpts / "step_3" / "model.safetensors"), load_file(ckpts / "step_6" / "model.safetensors")
    layer0 = [k for k in at_3 if "layers.0." in k]
    assert layer0 and all(torch.equal(at_3[k], at_6[k]) for k in layer0)
    assert all(not torch.equal(at_3[k], at_6[k]) for k in at_3 if "layers.1." in k and "norm" not in k)
