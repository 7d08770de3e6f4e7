"""GPU acceptance: every GPU-only path of the project, checked on one GPU in a few minutes, with pass/fail and figures.

    python bench/gpu_check.py                              # every check
    python bench/gpu_check.py --checks flash,weight_sync   # some of them
    python bench/gpu_check.py --model-path runs/<date>/<time>/checkpoints/step_1500   # a trained policy

Checks (each its own function ``check_<name>``, run in a fresh subprocess so that one engine's CUDA, vLLM and
torch.distributed state never reaches the next; ``--in-process`` runs them here instead):
- ``flash``: flash-attn varlen vs the exact sdpa mask on packed multi-row SFT micro-batches (several documents per
  row), bf16 weights and fp32 weights under bf16 autocast (the SFT trainer's mixed precision; flash-attn has no fp32
  kernel): loss and gradient relative errors, and those of attention that ignores the document boundaries (plain
  causal over each row), which the flash errors must stay far below.
- ``vllm_vs_hf``: the vLLM and Hugging Face rollout backends on the same prompts and weights: mean log-prob per
  sampled token under the trainer's forward for each (the same distribution sampled twice: close), mean
  |vLLM's reported log-prob - the trainer's| of vLLM's samples, generated tokens/s of each.
- ``weight_sync``: the vLLM worker loads other weights (``load_weights``, as after an update): its log-probs of a
  fixed set of sequences move from the old trainer's to the new trainer's, and its rollouts carry the new version.
- ``rl_step``: a 20-step quickstart_rl (bench/rl_step.py's setup: P prompts x G, same reward and optimizer) on the
  GPU with rollout.backend=vllm, s/step by phase, vs TRL's GRPOTrainer with its vLLM colocate mode, bf16.
- ``mamba2``: Mamba-2 (model=tiny_mamba2) on packed rows through the fused kernels (mamba_ssm, causal_conv1d, with
  seq_idx) vs the padded one-document-per-row fallback: loss and gradient relative errors.
A check whose package is missing (flash_attn, vllm, mamba_ssm) reports "skip" with the install line. Without CUDA
the script prints "skipped: no CUDA" and exits 0. Exit status 1 when any check fails.

Pass bounds (``verdict_*``) are set for bf16 numerics, relative to each tensor's largest entry; see each function.
The CPU-runnable parts (arguments, selection, the subprocess protocol, verdicts, report, the log-prob helpers) are
tested in tests/bench/test_gpu_check.py; the checks themselves have not run on a GPU yet (README, "GPU paths").
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402

CHECKS = ("flash", "vllm_vs_hf", "weight_sync", "rl_step", "mamba2")
RESULT_MARK = "GPU_CHECK_RESULT "  # the line a check's subprocess ends with: the mark, then the Result as JSON
INSTALL = {"flash_attn": "pip install -e '.[gpu]'", "vllm": "pip install -e '.[vllm]'",
           "mamba_ssm": "pip install mamba-ssm causal-conv1d", "causal_conv1d": "pip install mamba-ssm causal-conv1d"}


@dataclass
class Result:
    name: str
    status: str  # pass | fail | skip
    figures: dict = field(default_factory=dict)
    note: str = ""
    seconds: float = 0.0


class Skipped(Exception):
    """A check that cannot run here (a package missing): reported as skip, not as a failure."""


# -- arguments and selection -------------------------------------------------------------------------------------
def select_checks(spec: str) -> list[str]:
    """``all`` or a comma-separated list of check names, in the order given, each once."""
    if spec.strip() == "all":
        return list(CHECKS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        raise ValueError(f"--checks: unknown check {unknown[0] if unknown else spec!r}; choose from {', '.join(CHECKS)} or all")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checks", default="all", help=f"comma-separated subset of {', '.join(CHECKS)}, or all")
    parser.add_argument("--model-path", default=None, help="a local HF checkpoint or run dir (default: the embedded tiny model)")
    parser.add_argument("--prompts", type=int, default=8, help="P: prompts (vllm_vs_hf, rl_step)")
    parser.add_argument("--group", type=int, default=8, help="G: samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="generation budget (quickstart_rl's)")
    parser.add_argument("--rl-steps", type=int, default=20, help="rl_step: steps per side, warm-up included")
    parser.add_argument("--rl-warmup", type=int, default=2, help="rl_step: first steps not measured (>= 1)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="vLLM engines' share of the GPU")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per check before it counts as failed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-process", action="store_true", help="run the checks in this process (no subprocesses)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one check, print its Result
    args = parser.parse_args(argv)
    try:
        args.selected = select_checks(args.checks)
    except ValueError as err:
        parser.error(str(err))
    if args.one is not None and args.one not in CHECKS:
        parser.error(f"--one: unknown check {args.one!r}")
    if not 1 <= args.rl_warmup < args.rl_steps:
        parser.error(f"--rl-warmup={args.rl_warmup} must be >= 1 and < --rl-steps={args.rl_steps}")
    if not 0 < args.gpu_memory_utilization <= 1:
        parser.error(f"--gpu-memory-utilization={args.gpu_memory_utilization} must be in (0, 1]")
    return args


# -- verdicts (pure: figures -> (passed, reason)) ------------------------------------------------------------
FLASH_BOUND = {"loss": 2e-2, "grad": 1e-1}  # bf16 rounding (2^-8 relative per op) through 2 layers and backward
FLASH_MARGIN = 4.0  # ignoring the boundaries must cost at least this many times the flash error


def verdict_flash(figures: dict) -> tuple[bool, str]:
    """Per variant: flash's loss / gradient errors vs sdpa under FLASH_BOUND, and FLASH_MARGIN times below those of
    attention that mixes the documents of a row (which proves the batches can tell the two apart)."""
    problems = []
    for variant in ("bf16", "fp32_autocast"):
        loss, grad = figures[f"{variant}_loss_rel"], figures[f"{variant}_grad_rel"]
        mixed_loss, mixed_grad = figures[f"{variant}_mixed_loss_rel"], figures[f"{variant}_mixed_grad_rel"]
        if loss > FLASH_BOUND["loss"] or grad > FLASH_BOUND["grad"]:
            problems.append(f"{variant}: flash vs sdpa loss {loss:.2e} / grad {grad:.2e} above {FLASH_BOUND}")
        if FLASH_MARGIN * grad > mixed_grad or FLASH_MARGIN * loss > max(mixed_loss, FLASH_BOUND["loss"]):
            problems.append(f"{variant}: flash errors (loss {loss:.2e}, grad {grad:.2e}) not {FLASH_MARGIN}x below "
                            f"mixed-document attention's (loss {mixed_loss:.2e}, grad {mixed_grad:.2e})")
    return not problems, "; ".join(problems)


VLLM_LOGPROB_MAE = 0.05  # nats/token: vLLM's bf16 kernels vs the trainer's bf16 forward on the same tokens
SAMPLED_LOGPROB_GAP = 0.15  # nats/token between the two backends' mean: sampling noise of ~P*G*length tokens


def verdict_vllm_vs_hf(figures: dict) -> tuple[bool, str]:
    """vLLM reports the trainer's log-probs (mean abs gap <= VLLM_LOGPROB_MAE) and samples the distribution HF
    samples: the mean trainer log-prob per sampled token of each backend within SAMPLED_LOGPROB_GAP."""
    problems = []
    if figures["vllm_reported_vs_trainer_mae"] > VLLM_LOGPROB_MAE:
        problems.append(f"vLLM's sampled-token log-probs are {figures['vllm_reported_vs_trainer_mae']:.3f} nats/token "
                        f"from the trainer's (bound {VLLM_LOGPROB_MAE})")
    gap = abs(figures["hf_trainer_logprob_mean"] - figures["vllm_trainer_logprob_mean"])
    if gap > SAMPLED_LOGPROB_GAP:
        problems.append(f"mean trainer log-prob of the samples differs by {gap:.3f} nats/token between hf and vllm "
                        f"(bound {SAMPLED_LOGPROB_GAP}): the backends do not sample the same distribution")
    return not problems, "; ".join(problems)


def verdict_weight_sync(figures: dict) -> tuple[bool, str]:
    """After the sync vLLM matches the new weights (mean abs gap <= VLLM_LOGPROB_MAE, at least 10x below its gap
    before the sync) and labels its rollouts with the new version."""
    after, before = figures["after_sync_mae"], figures["before_sync_mae"]
    problems = []
    if after > VLLM_LOGPROB_MAE:
        problems.append(f"after the sync vLLM is {after:.3f} nats/token from the new trainer (bound {VLLM_LOGPROB_MAE})")
    if before < 10 * after:
        problems.append(f"the sync did not move vLLM to the new weights: gap {before:.3f} before, {after:.3f} after")
    if figures["rollout_version"] != figures["synced_version"]:
        problems.append(f"rollouts carry version {figures['rollout_version']}, synced {figures['synced_version']}")
    return not problems, "; ".join(problems)


def verdict_rl_step(figures: dict) -> tuple[bool, str]:
    """Both sides ran every step (the speed ratio is a figure, not a bound)."""
    problems = [f"{side}: {figures[f'{side}_steps_measured']} of {figures['steps_measured_expected']} steps measured"
                for side in ("ours", "trl") if figures[f"{side}_steps_measured"] != figures["steps_measured_expected"]]
    return not problems, "; ".join(problems)


MAMBA_BOUND = {"loss": 1e-3, "grad": 1e-2}  # fp32: chunked SSD scan vs the reference scan, summation order only


def verdict_mamba2(figures: dict) -> tuple[bool, str]:
    """The fused kernels with seq_idx give the padded fallback's loss and gradients (MAMBA_BOUND, fp32)."""
    loss, grad = figures["loss_rel"], figures["grad_rel"]
    ok = loss <= MAMBA_BOUND["loss"] and grad <= MAMBA_BOUND["grad"]
    return ok, "" if ok else f"kernels vs padded fallback: loss {loss:.2e}, grad {grad:.2e} above {MAMBA_BOUND}"


# -- shared helpers (CPU-runnable) -------------------------------------------------------------------------------
def require(*packages: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise Skipped(f"{missing[0]} is not installed ({INSTALL.get(missing[0], 'pip install ' + missing[0])})")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected| (0 when both are all zero)."""
    scale = float(expected.detach().float().abs().max())
    diff = float((got.detach().float() - expected.detach().float()).abs().max())
    return diff / scale if scale > 0 else diff


def max_relative_error(got: dict, expected: dict) -> float:
    return max(relative_error(got[n], e) for n, e in expected.items())


@torch.no_grad()
def sequence_logprobs(model, sequences: list[list[int]], pad_id: int, batch_size: int = 32) -> list[list[float]]:
    """log pi(x_t | x_<t) of every token after the first of each sequence, by a plain forward on right-padded rows
    (causal: padding after a sequence changes nothing before it); log-softmax in fp32."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.tensor([list(s) + [pad_id] * (width - len(s)) for s in chunk], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, width - 1]
        out.extend(row[: len(s) - 1].tolist() for row, s in zip(lp, chunk))
    return out


def response_logprobs(model, rollouts: list, pad_id: int) -> list[list[float]]:
    """The trainer's log-prob of each sampled token of each rollout (prompt_ids + response_ids)."""
    full = sequence_logprobs(model, [r.prompt_ids + r.response_ids for r in rollouts], pad_id)
    return [lp[len(r.prompt_ids) - 1 :] for lp, r in zip(full, rollouts)]


SYNC_NOISE = 0.1  # the "update" of check_weight_sync: Gaussian noise of this std added to every weight


def perturbed(model, seed: int):
    """``model`` with SYNC_NOISE Gaussian noise added to each weight (in place): other weights of the same names."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * SYNC_NOISE)
    return model


def mean_abs_gap(a: list[list[float]], b: list[list[float]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return statistics.mean(abs(x - y) for x, y in pairs) if pairs else 0.0


def token_mean(values: list[list[float]]) -> float:
    flat = [v for row in values for v in row]
    return statistics.mean(flat) if flat else 0.0


def _config(args, overrides: tuple = ()):
    """The quickstart_rl config with bench/rl_step.py's overrides (embedded tiny model unless --model-path)."""
    rl_step = _rl_step_module()
    return rl_step.compose_config(_rl_args(args), tempfile.mkdtemp(prefix="gpu_check_"), overrides)


def _prompt_pool(args) -> tuple:
    """quickstart_rl's prompt distribution, fewer of them (building its 2000 takes a minute; a check needs P)."""
    return (f"data.synthetic.train.num_samples={max(32, 4 * args.prompts)}",)


def _rl_args(args) -> SimpleNamespace:
    return SimpleNamespace(prompts=args.prompts, group=args.group, max_new_tokens=args.max_new_tokens, beta=0.0,
                           workers=1, world_size=1, warmup=args.rl_warmup, steps=args.rl_steps - args.rl_warmup,
                           seed=args.seed, model_path=args.model_path, ours=[])


def _rl_step_module():
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    spec = importlib.util.spec_from_file_location("bench_rl_step", REPO / "bench" / "rl_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sft_batches(tokenizer, num_docs: int = 16, rows: int = 2):
    """Packed multi-row SFT micro-batches of arithmetic chats (several documents per row)."""
    from data_pipelines.arithmetic import ArithmeticSpec, generate
    from data_pipelines.chat_format import chat_ids
    from data_pipelines.packing import Document, pack

    docs = []
    for row in generate(ArithmeticSpec(verbosity=0.5), num_docs, seed=11):
        ids, loss = chat_ids(tokenizer, row["messages"])
        docs.append(Document(ids, loss, sample_id=row["id"]))
    longest = max(len(d) for d in docs)
    return pack(docs, row_tokens=3 * longest, rows_per_batch=rows, pad_token_id=tokenizer.pad_token_id)


def _loss_and_grads(model, batches, loss_fn) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    sums = [loss_fn(b) for b in batches]
    loss = sum(s for s, _ in sums) / sum(n for _, n in sums)
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _mixed_loss_sum(model, batch):
    """The SFT loss sum with plain causal attention over each whole row: documents of a row see each other."""
    import torch.nn.functional as F

    from data_pipelines.packing import IGNORE_INDEX

    rows, seq = batch.input_ids.shape
    # an explicit causal 4D mask (transformers would find the documents from restarting position_ids without one)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=batch.input_ids.device).tril().expand(rows, 1, seq, seq)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=causal,
                   use_cache=False).logits[:, :-1].float()
    targets = batch.labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


DEVICE = torch.device("cuda")  # where the checks run (tests/bench/test_gpu_check.py dry-runs some on CPU)


def _synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


# grouped-query attention, as tests/train/models/test_flash_varlen.py's model
FLASH_ARCH = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
              "tie_word_embeddings": True}


# -- the checks (GPU) --------------------------------------------------------------------------------------------
def check_flash(args) -> dict:
    require("flash_attn")
    from train.models.forward import sft_loss_sum
    from train.models.model_zoo import build_tiny_model, build_tiny_tokenizer, load_model
    from train.models.runtime import autocast

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, dict(FLASH_ARCH), seed=3)
    with torch.no_grad():  # sharp attention, so that a document leak shows (as tests/train/models/test_flash_varlen.py)
        for name, param in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                param.mul_(20.0)
    path = Path(tempfile.mkdtemp(prefix="gpu_check_flash_"))
    model.save_pretrained(path)
    device = DEVICE
    batches = [b.to(device) for b in _sft_batches(tokenizer)]
    figures: dict = {"batches": len(batches), "rows": int(batches[0].input_ids.shape[0]),
                     "documents": sum(len(b.sample_ids) for b in batches)}
    for variant, load_dtype in (("bf16", torch.bfloat16), ("fp32_autocast", torch.float32)):
        results = {}
        for backend in ("sdpa", "flash"):
            m = load_model(str(path), backend, load_dtype, device).train()
            with autocast(device, torch.bfloat16):
                results[backend] = _loss_and_grads(m, batches, lambda b, m=m, backend=backend: sft_loss_sum(m, b, backend))
        sdpa = load_model(str(path), "sdpa", load_dtype, device).train()
        with autocast(device, torch.bfloat16):
            mixed = _loss_and_grads(sdpa, batches, lambda b, m=sdpa: _mixed_loss_sum(m, b))
        (ref_loss, ref_grads), (loss, grads) = results["sdpa"], results["flash"]
        figures[f"{variant}_loss_rel"] = relative_error(loss, ref_loss)
        figures[f"{variant}_grad_rel"] = max_relative_error(grads, ref_grads)
        figures[f"{variant}_mixed_loss_rel"] = relative_error(mixed[0], ref_loss)
        figures[f"{variant}_mixed_grad_rel"] = max_relative_error(mixed[1], ref_grads)
    return figures


def _vllm_worker(path: str, args, seed: int):
    from train.run.vllm_settings import vllm_settings
    from train.workers.vllm_worker import VLLMRolloutWorker

    settings = vllm_settings({"gpu_memory_utilization": args.gpu_memory_utilization, "enable_sleep_mode": True},
                             "colocated")
    worker = VLLMRolloutWorker(path, seed=seed, settings=settings, precision="auto")
    worker.device = DEVICE  # where the trainer's tensors go before load_weights
    return worker


def _timed_generate(worker, prompts, args, seed) -> tuple[list, float]:
    worker.generate(prompts[:2], group_size=2, max_new_tokens=8, seed=seed)  # warm-up (kernels, graphs, allocator)
    _synchronize()
    start = time.perf_counter()
    rollouts = worker.generate(prompts, group_size=args.group, max_new_tokens=args.max_new_tokens, temperature=1.0,
                               top_p=1.0, seed=seed)
    _synchronize()
    return rollouts, time.perf_counter() - start


def _model_and_prompts(args) -> tuple[str, list[str]]:
    """The policy's path and the first step's prompt texts of the check's RL config."""
    rl_step = _rl_step_module()
    cfg = _config(args, _prompt_pool(args))
    return rl_step.model_path_of(cfg), [p.text for p in rl_step.step_prompts(cfg, 1)[0]]


def check_vllm_vs_hf(args) -> dict:
    require("vllm")
    from train.models.model_zoo import load_model
    from train.models.runtime import component_dtype
    from train.workers.rollout_worker import RolloutWorker

    path, prompts = _model_and_prompts(args)
    figures: dict = {"prompts": len(prompts), "group": args.group, "max_new_tokens": args.max_new_tokens}
    sides = {}
    for name, build in (("hf", lambda: RolloutWorker(path, seed=args.seed, device=DEVICE.type, precision="auto")),
                        ("vllm", lambda: _vllm_worker(path, args, args.seed))):
        worker = build()
        rollouts, seconds = _timed_generate(worker, prompts, args, args.seed + 1)
        tokens = sum(len(r.response_ids) for r in rollouts)
        figures[f"{name}_tokens_per_s"] = tokens / seconds
        figures[f"{name}_response_length_mean"] = tokens / len(rollouts)
        sides[name] = rollouts
        del worker
        torch.cuda.empty_cache()
    trainer = load_model(path, "sdpa", component_dtype("trainer", "auto", DEVICE), DEVICE).eval()
    pad = trainer.config.pad_token_id if trainer.config.pad_token_id is not None else 0
    under_trainer = {name: response_logprobs(trainer, rollouts, pad) for name, rollouts in sides.items()}
    figures["hf_trainer_logprob_mean"] = token_mean(under_trainer["hf"])
    figures["vllm_trainer_logprob_mean"] = token_mean(under_trainer["vllm"])
    figures["vllm_reported_vs_trainer_mae"] = mean_abs_gap([r.logprobs for r in sides["vllm"]], under_trainer["vllm"])
    figures["vllm_over_hf_speed"] = figures["vllm_tokens_per_s"] / figures["hf_tokens_per_s"]
    return figures


def check_weight_sync(args) -> dict:
    require("vllm")
    from train.models.model_zoo import load_model
    from train.models.runtime import component_dtype

    path, prompts = _model_and_prompts(args)
    dtype = component_dtype("trainer", "auto", DEVICE)
    old = load_model(path, "sdpa", dtype, DEVICE).eval()
    new_model = perturbed(load_model(path, "sdpa", torch.float32, "cpu"), args.seed)  # what an update would send
    new_state = {n: p.detach().clone() for n, p in new_model.named_parameters()}  # named as the trainer names them
    new = new_model.to(DEVICE, dtype).eval()
    worker = _vllm_worker(path, args, args.seed)
    rollouts = worker.generate(prompts, group_size=2, max_new_tokens=args.max_new_tokens, seed=args.seed)
    sequences = [r.prompt_ids + r.response_ids for r in rollouts]
    pad = old.config.pad_token_id if old.config.pad_token_id is not None else 0
    trainer_new = sequence_logprobs(new, sequences, pad)
    figures = {"sequences": len(sequences),
               "before_sync_vs_old_trainer_mae": mean_abs_gap(worker.score(sequences), sequence_logprobs(old, sequences, pad)),
               "before_sync_mae": mean_abs_gap(worker.score(sequences), trainer_new)}
    figures["synced_version"] = worker.load_weights(new_state, 1)
    figures["after_sync_mae"] = mean_abs_gap(worker.score(sequences), trainer_new)
    figures["rollout_version"] = worker.generate(prompts[:1], group_size=2, max_new_tokens=8, seed=0)[0].policy_version
    return figures


def check_rl_step(args) -> dict:
    require("vllm")
    rl_step = _rl_step_module()
    ns = _rl_args(args)
    with tempfile.TemporaryDirectory(prefix="gpu_check_rl_") as tmp:
        cfg = rl_step.compose_config(ns, str(Path(tmp) / "ours"), ("rollout.async_steps=0", "rollout=vllm"))
        ours = rl_step.run_ours(cfg, ns.warmup)
        torch.cuda.empty_cache()
        with contextlib.chdir(tmp):
            trl = rl_step.run_trl(cfg, rl_step.step_prompts(cfg, ns.warmup + ns.steps), ns, str(Path(tmp) / "trl"),
                                  use_cpu=False, bf16=True, use_vllm=True, vllm_mode="colocate",
                                  vllm_gpu_memory_utilization=args.gpu_memory_utilization, vllm_enable_sleep_mode=True)
        rl_step.report(ns, {"ours (vllm)": ours, "TRL": trl})
    figures = {"steps_measured_expected": ns.steps, "ours_steps_measured": len(ours["walls"]),
               "trl_steps_measured": len(trl["walls"]),
               "ours_s_per_step_median": statistics.median(ours["walls"]),
               "trl_s_per_step_median": statistics.median(trl["walls"]),
               "ours_response_length_mean": ours["length"], "trl_response_length_mean": trl["length"]}
    figures["trl_over_ours_speedup"] = figures["trl_s_per_step_median"] / figures["ours_s_per_step_median"]
    figures.update({f"ours_{k}_s": v for k, v in ours["phases"].items()})
    figures.update({f"trl_{k}_s": v for k, v in trl["phases"].items()})
    return figures


def check_mamba2(args) -> dict:
    require("mamba_ssm", "causal_conv1d")
    from unittest import mock

    from omegaconf import OmegaConf

    from train.models import forward
    from train.models.model_zoo import build_tiny_model, build_tiny_tokenizer

    arch = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny_mamba2.yaml").tiny.arch)
    tokenizer = build_tiny_tokenizer()
    device = DEVICE
    model = build_tiny_model(tokenizer, arch, seed=args.seed).to(device).train()
    batches = [b.to(device) for b in _sft_batches(tokenizer)]
    if not forward.ssm_kernels_available(device):
        raise RuntimeError("mamba_ssm and causal_conv1d are installed but forward.ssm_kernels_available is false")
    kernel = _loss_and_grads(model, batches, lambda b: forward.sft_loss_sum(model, b, "sdpa"))
    with mock.patch.object(forward, "ssm_kernels_available", lambda _device: False):
        fallback = _loss_and_grads(model, batches, lambda b: forward.sft_loss_sum(model, b, "sdpa"))
    return {"batches": len(batches), "documents": sum(len(b.sample_ids) for b in batches),
            "loss_rel": relative_error(kernel[0], fallback[0]), "grad_rel": max_relative_error(kernel[1], fallback[1])}


VERDICTS = {"flash": verdict_flash, "vllm_vs_hf": verdict_vllm_vs_hf, "weight_sync": verdict_weight_sync,
            "rl_step": verdict_rl_step, "mamba2": verdict_mamba2}


# -- running and reporting ---------------------------------------------------------------------------------------
def run_one(name: str, args, checks: dict | None = None) -> Result:
    """Run ``check_<name>`` and judge its figures; a missing package is a skip, an exception a failure."""
    fn = (checks or {n: globals()[f"check_{n}"] for n in CHECKS})[name]
    start = time.perf_counter()
    try:
        figures = fn(args)
    except Skipped as skip:
        return Result(name, "skip", note=str(skip), seconds=time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 - a failing check is reported, the others still run
        return Result(name, "fail", note=f"{type(err).__name__}: {err}", seconds=time.perf_counter() - start)
    passed, reason = VERDICTS[name](figures)
    return Result(name, "pass" if passed else "fail", figures, reason, time.perf_counter() - start)


def parse_child_output(name: str, returncode: int, stdout: str, stderr: str) -> Result:
    """The Result a check's subprocess printed last, or a failure naming its exit status and last error line."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return Result(**json.loads(line[len(RESULT_MARK):]))
    last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "no output")
    return Result(name, "fail", note=f"the check's process exited with status {returncode} without a result: {last}")


def run_in_subprocess(name: str, argv: list[str], timeout: float, runner=subprocess.run) -> Result:
    """``check_<name>`` in a fresh Python process (its output echoed here), so no GPU state outlives it."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--one", name]
    start = time.perf_counter()
    try:
        proc = runner(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return Result(name, "fail", note=f"timed out after {timeout:.0f} s (--timeout)", seconds=time.perf_counter() - start)
    sys.stdout.write("".join(line + "\n" for line in proc.stdout.splitlines() if not line.startswith(RESULT_MARK)))
    sys.stderr.write(proc.stderr[-4000:])
    result = parse_child_output(name, proc.returncode, proc.stdout, proc.stderr)
    result.seconds = result.seconds or time.perf_counter() - start
    return result


def _figure(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def format_report(results: list[Result]) -> str:
    lines = ["GPU check: " + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")]
    for r in results:
        lines.append(f"{r.status.upper():4s}  {r.name:12s} {r.seconds:7.1f} s" + (f"  {r.note}" if r.note else ""))
        for key, value in r.figures.items():
            lines.append(f"        {key} = {_figure(value)}")
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    lines.append(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    return "\n".join(lines)


def exit_code(results: list[Result]) -> int:
    return 1 if any(r.status == "fail" for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.one is not None:  # inside a check's subprocess
        print(RESULT_MARK + json.dumps(asdict(run_one(args.one, args))), flush=True)
        return 0
    if not torch.cuda.is_available():
        print("skipped: no CUDA")
        return 0
    results = []
    for name in args.selected:
        print(f"== {name}", flush=True)
        results.append(run_one(name, args) if args.in_process else run_in_subprocess(name, argv, args.timeout))
    print(format_report(results))
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
