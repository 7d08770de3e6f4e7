"""Config validation that runs before any expensive work (model build, data generation, training).

Each message names the config key and the fix.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from data_pipelines.loading import check_files
from data_pipelines.multiturn import check_mode
from train.models.architectures import packed_attention_problem
from train.models.attention import BACKENDS, check_backend
from train.models.lora import linear_module_names, lora_enabled, missing_target_modules
from train.models.runtime import PRECISIONS, resolve_device, resolve_precision
from train.run.vllm_settings import DTYPES, vllm_settings


class ConfigError(ValueError):
    pass


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _bf16_supported() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


def check_missing(cfg: DictConfig) -> None:
    """Every mandatory (``???``) value must be set."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required config value(s): {', '.join(missing)}; set them on the command line, e.g. {missing[0]}=...")


def check_common(cfg: DictConfig) -> None:
    check_missing(cfg)
    t = cfg.trainer
    _require(t.lr > 0, f"trainer.lr={t.lr} must be > 0")
    _require(t.weight_decay >= 0, f"trainer.weight_decay={t.weight_decay} must be >= 0")
    _require(t.warmup_steps >= 0, f"trainer.warmup_steps={t.warmup_steps} must be >= 0")
    _require(0 <= t.min_lr_ratio <= 1, f"trainer.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    _require(t.grad_accum >= 1, f"trainer.grad_accum={t.grad_accum} must be >= 1")
    _require(t.rows_per_micro_batch >= 1, f"trainer.rows_per_micro_batch={t.rows_per_micro_batch} must be >= 1")
    _require(t.max_grad_norm >= 0, f"trainer.max_grad_norm={t.max_grad_norm} must be >= 0 (0 disables clipping)")
    _require(t.max_steps is not None or t.epochs is not None, "set trainer.max_steps or trainer.epochs")
    if t.max_steps is not None:
        _require(t.max_steps >= 1, f"trainer.max_steps={t.max_steps} must be >= 1 (or null to use trainer.epochs)")
    elif t.epochs is not None:
        _require(t.epochs > 0, f"trainer.epochs={t.epochs} must be > 0")
    horizon = t.get("schedule_steps")
    if horizon is not None:
        _require(t.max_steps is not None and horizon >= t.max_steps,
                 f"trainer.schedule_steps={horizon} must be >= trainer.max_steps={t.max_steps} (the run stops on the "
                 "schedule of a longer one); null = the schedule spans max_steps")
    _require(t.eval_every >= 0 and t.save_every >= 0, "trainer.eval_every and trainer.save_every must be >= 0")
    _require(cfg.logger.mode in ("offline", "online", "disabled"), f"logger.mode={cfg.logger.mode!r} must be offline, online or disabled")
    _require(cfg.model.attn_backend in BACKENDS, f"model.attn_backend={cfg.model.attn_backend!r} must be one of {list(BACKENDS)}")
    device = resolve_device(cfg.cluster.device)
    resolve_precision(t.precision, device)
    check_precision(t.precision, device.type == "cuda", device.type == "cuda" and _bf16_supported(), cfg.model.attn_backend)
    check_backend(cfg.model.attn_backend, device)
    d = cfg.data
    _require(d.source in ("synthetic", "files"), f"data.source={d.source!r} must be 'synthetic' or 'files'")
    _require(d.max_seq_len >= 8, f"data.max_seq_len={d.max_seq_len} is too small")
    _require(
        t.row_tokens >= d.max_seq_len,
        f"trainer.row_tokens={t.row_tokens} < data.max_seq_len={d.max_seq_len}: a row must hold the longest document; "
        "raise trainer.row_tokens or lower data.max_seq_len",
    )
    turns = d.synthetic.train.turns if d.source == "synthetic" else 2  # files: assume multi-turn chats may occur
    check_mode(d.get("multi_turn", "single_pass"), cfg.model.attn_backend, max_turns=turns)
    arch = (cfg.model.get("tiny") or {}).get("arch") or {}
    if not cfg.model.get("path") and arch.get("model_type") == "mamba2" and turns > 1:
        _require(d.get("multi_turn") == "per_turn", "model=tiny_mamba2 has no attention mask for single-pass multi-turn "
                 "chats: set data.multi_turn=per_turn")
    if d.source == "files":
        _require(len(d.train_files) > 0, "data.train_files is empty: give at least one jsonl/parquet file")
        check_files(d.train_files, "data.train_files")
        check_files(d.eval_files, "data.eval_files")


def check_precision(precision: str, on_gpu: bool, bf16_supported: bool, attn_backend: str = "sdpa") -> None:
    """``trainer.precision`` must be one the components can run (train/models/runtime.py ``component_dtype``):
    auto | fp32 | bf16; bf16 on a GPU only where the GPU computes in bf16 (NVIDIA Ampere or newer); and not fp32
    with flash-attn on a GPU (its kernels take fp16/bf16 only, and an fp32 model's queries stay fp32)."""
    _require(precision in PRECISIONS, f"trainer.precision={precision!r} must be auto, fp32 or bf16 (fp16 is not supported)")
    _require(not (on_gpu and precision in ("auto", "bf16") and not bf16_supported),
             f"trainer.precision={precision}: this GPU has no bf16 support (needs NVIDIA Ampere or newer); "
             "set trainer.precision=fp32")
    _require(not (on_gpu and precision == "fp32" and attn_backend == "flash"),
             "trainer.precision=fp32 with model.attn_backend=flash: flash-attn kernels run fp16/bf16 only; "
             "set trainer.precision=auto (bf16) or model.attn_backend=sdpa")


def check_vllm(r: DictConfig, placement: str, world_size: int, on_gpu: bool, installed: bool,
               worker_gpus: int = 1) -> None:
    """``rollout.backend=vllm``: a CUDA GPU, the vllm package, and ``rollout.vllm.*`` values an engine can take.
    ``worker_gpus``: the GPUs of a rollout worker's bundle (train/workers/placement.py gives each one GPU, or a
    share of one)."""
    _require(on_gpu, "rollout.backend=vllm needs a CUDA GPU; use rollout.backend=hf on this machine")
    _require(installed, "rollout.backend=vllm needs the vllm package: pip install -e '.[vllm]' (or rollout.backend=hf)")
    try:
        v = vllm_settings(r.get("vllm"), placement)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    tp = v["tensor_parallel_size"]
    _require(isinstance(tp, int) and 1 <= tp <= worker_gpus,
             f"rollout.vllm.tensor_parallel_size={tp} exceeds the {worker_gpus} GPU(s) of a rollout worker's bundle; "
             "set it to 1 and add GPUs through rollout.num_workers")
    util = v["gpu_memory_utilization"]
    _require(isinstance(util, (int, float)) and 0 < util <= 1,
             f"rollout.vllm.gpu_memory_utilization={util} must be in (0, 1] (a fraction of the GPU's memory)")
    if placement == "colocated":  # the workers of a bundle and its trainer rank share one GPU
        per_gpu = -(-r.num_workers // world_size)
        _require(per_gpu * util < 1, f"rollout.vllm.gpu_memory_utilization={util}: {per_gpu} rollout worker(s) share "
                 f"each GPU with a trainer rank (cluster.placement=colocated), so {per_gpu} x {util} leaves the trainer "
                 "nothing; lower it (e.g. 0.3) or use cluster.placement=disaggregated")
    _require(v["dtype"] == "auto" or v["dtype"] in DTYPES,
             f"rollout.vllm.dtype={v['dtype']!r} must be auto, bfloat16 or float32")
    length = v["max_model_len"]
    _require(length is None or (isinstance(length, int) and length > r.max_new_tokens),
             f"rollout.vllm.max_model_len={length} must be null or > rollout.max_new_tokens={r.max_new_tokens} "
             "(it holds the prompt and the response)")
    _require(v["enable_sleep_mode"] in (True, False),
             f"rollout.vllm.enable_sleep_mode={v['enable_sleep_mode']!r} must be auto, true or false")


def policy_config(model_cfg):
    """The policy's transformers config: the embedded model's ``model.tiny.arch``, or ``model.path``'s config.json
    (a run directory: its latest checkpoint); None while that does not exist yet (its loading reports it)."""
    from pathlib import Path

    from transformers import AutoConfig

    from train.run.checkpoint import resolve_model_dir

    if not model_cfg.get("path"):
        arch = dict((model_cfg.get("tiny") or {}).get("arch") or {})
        return AutoConfig.for_model(arch.pop("model_type"), **arch) if arch.get("model_type") else None
    try:
        path = Path(resolve_model_dir(model_cfg.path))
    except (FileNotFoundError, ValueError):
        return None
    return AutoConfig.from_pretrained(path) if (path / "config.json").exists() else None


def check_architecture(cfg: DictConfig, max_tokens: int, length_key: str) -> None:
    """Refuse an architecture whose attention our packed mask cannot drive exactly (train/models/architectures.py)."""
    config = policy_config(cfg.model)
    if config is not None:
        problem = packed_attention_problem(config, cfg.model.attn_backend, max_tokens, length_key)
        _require(problem is None, str(problem))


def check_zero(t: DictConfig) -> None:
    """``trainer.zero_stage`` and ``trainer.offload_optimizer``: DeepSpeed offloads the optimizer state of stages 1-3."""
    stage = t.get("zero_stage", 0)
    _require(stage in (0, 1, 2, 3), f"trainer.zero_stage={stage} must be 0, 1, 2 or 3")
    _require(not (t.get("offload_optimizer", False) and stage == 0),
             "trainer.offload_optimizer=true needs trainer.zero_stage 1, 2 or 3 (stage 0 keeps no partitioned optimizer "
             "state to offload): set trainer.zero_stage=1 or trainer.offload_optimizer=false")


def check_lora(lora) -> None:
    """``model.lora.*`` (train/models/lora.py): rank >= 1, alpha > 0, 0 <= dropout < 1, target modules given."""
    if not lora_enabled(lora):
        return
    rank, alpha, dropout, targets = lora.get("rank"), lora.get("alpha"), lora.get("dropout", 0.0), lora.get("target_modules")
    _require(isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1,
             f"model.lora.rank={rank} must be an integer >= 1 (or null to train the full model)")
    _require(isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0,
             f"model.lora.alpha={alpha} must be > 0 (the update is scaled by alpha / rank; 2 * rank is common)")
    _require(isinstance(dropout, (int, float)) and 0 <= dropout < 1, f"model.lora.dropout={dropout} must be in [0, 1)")
    _require(targets is not None and not isinstance(targets, str) and len(targets) > 0
             and all(isinstance(t, str) and t for t in targets),
             f"model.lora.target_modules={targets} must be a non-empty list of module names, e.g. [q_proj,k_proj,v_proj,o_proj]")


def check_lora_targets(model, lora) -> None:
    """Every ``model.lora.target_modules`` name must match a linear layer of the loaded model."""
    if not lora_enabled(lora):
        return
    missing = missing_target_modules(model, lora.target_modules)
    _require(not missing, f"model.lora.target_modules: {missing} match no linear layer of {type(model).__name__}; "
             f"its linear module names are {linear_module_names(model)}")


def check_trainer_world(t: DictConfig, cluster: DictConfig) -> None:
    """``trainer.world_size`` ranks must fit this machine (one GPU, or one CPU, each) unless Ray is remote."""
    import os

    import torch

    _require(isinstance(t.world_size, int) and t.world_size >= 1, f"trainer.world_size={t.world_size} must be an integer >= 1")
    threads = t.get("num_threads")
    _require(threads is None or (isinstance(threads, int) and threads >= 1),
             f"trainer.num_threads={threads} must be an integer >= 1 or null (cores // world_size)")
    if cluster.get("ray_address"):  # a remote Ray cluster is checked by Ray's own scheduler
        return
    on_gpu = torch.cuda.is_available()
    available = torch.cuda.device_count() if on_gpu else int(cluster.get("ray_num_cpus") or os.cpu_count() or 1)
    _require(t.world_size <= available,
             f"trainer.world_size={t.world_size} exceeds the {available} {'GPUs' if on_gpu else 'CPUs'} of this machine "
             "(one per rank); lower trainer.world_size or give cluster.ray_address of a larger Ray cluster")


def check_sft(cfg: DictConfig) -> None:
    check_common(cfg)
    _require(cfg.algorithm.name == "sft", f"algorithm={cfg.algorithm.name} is not an SFT algorithm")
    check_architecture(cfg, cfg.data.max_seq_len, "data.max_seq_len")
    for key in ("world_size", "zero_stage"):
        _require(cfg.trainer.get(key) is not None, f"trainer.{key} is not set: SFT runs need trainer=default (or set trainer.{key})")
    check_zero(cfg.trainer)
    check_logits_chunk_tokens(cfg.trainer)
    check_gradient_checkpointing(cfg.trainer)
    check_compile(cfg.trainer)
    check_trainer_world(cfg.trainer, cfg.cluster)
    check_lora(cfg.model.get("lora"))
    check_sequence_parallel(cfg)


def check_rl_group_size(a) -> None:
    """Group baselines need >= 2 responses per prompt; ReMax (greedy baseline) and REINFORCE++ without a group
    baseline run with any group size."""
    target = str(a.advantage.get("_target_", ""))
    single_ok = a.get("greedy_rollout", False) or (target.endswith("reinforce_pp_advantages") and a.advantage.get("baseline") == "none")
    minimum = 1 if single_ok else 2
    _require(a.group_size >= minimum, f"algorithm.group_size={a.group_size} must be >= {minimum}"
             + ("" if single_ok else " (group-relative advantages need a group)"))


def check_rl_policy_options(cfg: DictConfig) -> None:
    """The policy-optimisation options of algorithms/ (issue 22): KL estimator, entropy bonus, ReMax's greedy round,
    pass@k's k, the rollout/trainer mismatch correction."""
    from algorithms.kl import ESTIMATORS
    from algorithms.mismatch import MODES

    a, r = cfg.algorithm, cfg.rollout
    _require(a.kl.estimator in ESTIMATORS, f"algorithm.kl.estimator={a.kl.estimator!r} must be one of {', '.join(ESTIMATORS)}")
    coef = a.loss.get("entropy_coef", 0.0)
    _require(coef is not None and coef >= 0, f"algorithm.loss.entropy_coef={coef} must be >= 0 (0 = no entropy bonus)")
    target = str(a.advantage.get("_target_", ""))
    greedy = bool(a.get("greedy_rollout", False))
    _require(greedy == target.endswith("remax_advantages"),
             "algorithm.greedy_rollout=true (one greedy response per prompt) goes with ReMax's advantage and ReMax's "
             "advantage needs it: use algorithm=remax, or set both")
    _require(not (greedy and r.get("multi_turn", False)),
             "algorithm=remax samples one greedy response per prompt for single-turn prompts: set rollout.multi_turn=false")
    if target.endswith("passk_advantages"):
        k = a.advantage.get("k")
        _require(isinstance(k, int) and 1 <= k <= a.group_size,
                 f"algorithm.advantage.k={k} must be an integer in [1, algorithm.group_size={a.group_size}]")
    mismatch = a.loss.get("mismatch")
    if mismatch is not None:
        _require(mismatch.get("mode", "tis") in MODES, f"algorithm.loss.mismatch.mode={mismatch.get('mode')!r} must be "
                 f"one of {', '.join(MODES)}")
        threshold = mismatch.get("threshold", 2.0)
        _require(threshold is not None and threshold > 1, f"algorithm.loss.mismatch.threshold={threshold} must be > 1")
        _require(float(r.temperature) == 1.0, f"algorithm.loss.mismatch compares the sampler's log-probs with the trainer's, "
                 f"which are at temperature 1; rollout.temperature={r.temperature}: set rollout.temperature=1")
        _require(not r.get("multi_turn", False), "algorithm.loss.mismatch reads single-turn rollouts' log-probs; "
                 "multi-turn chats record none: set algorithm.loss.mismatch=null")


BUNDLE_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's placement-group strategies


def check_bundle_strategy(cluster) -> None:
    """``cluster.bundle_strategy``: one of Ray's placement-group strategies, for the colocated trainer bundles
    (train/workers/placement.py)."""
    strategy = cluster.get("bundle_strategy") or "PACK"
    _require(strategy in BUNDLE_STRATEGIES, f"cluster.bundle_strategy={strategy!r} must be one of {', '.join(BUNDLE_STRATEGIES)}")
    _require(strategy == "PACK" or cluster.placement == "colocated",
             f"cluster.bundle_strategy={strategy} places the bundles of cluster.placement=colocated; with "
             f"cluster.placement={cluster.placement} every actor holds its own device: set cluster.bundle_strategy=PACK")


WEIGHT_SYNC_MODES = ("auto", "object_store", "nccl", "gloo")  # rollout.weight_sync (train/workers/weight_broadcast.py)


def check_weight_sync(rollout, placement: str, on_gpu: bool) -> None:
    """``rollout.weight_sync``: nccl needs CUDA and a GPU per rollout worker; broadcasts reach hf workers only."""
    mode = rollout.get("weight_sync") or "auto"
    _require(mode in WEIGHT_SYNC_MODES, f"rollout.weight_sync={mode!r} must be one of {', '.join(WEIGHT_SYNC_MODES)}")
    _require(mode != "nccl" or on_gpu, "rollout.weight_sync=nccl needs CUDA GPUs (none found): use rollout.weight_sync=auto "
             "(the object store on CPU) or gloo")
    _require(mode != "nccl" or placement == "disaggregated",
             f"rollout.weight_sync=nccl needs a GPU per rollout worker apart from trainer rank 0's (NCCL refuses two "
             f"members on one GPU); cluster.placement={placement}: set cluster.placement=disaggregated or rollout.weight_sync=auto")
    _require(mode in ("auto", "object_store") or rollout.backend == "hf",
             f"rollout.weight_sync={mode} broadcasts to rollout.backend=hf workers; with rollout.backend={rollout.backend} "
             "use rollout.weight_sync=auto")


def check_rl(cfg: DictConfig) -> None:
    """RL-specific checks (trainer world, ZeRO stage, rollout backend) on top of the common ones."""
    import importlib.util
    import os

    import torch

    check_missing(cfg)
    _require(cfg.algorithm.get("recipe") == "rl", f"algorithm={cfg.algorithm.name} is not an RL algorithm")
    t, r = cfg.trainer, cfg.rollout
    for key in ("world_size", "micro_batches_per_rank", "ppo_epochs"):
        _require(t.get(key) is not None, f"trainer.{key} is not set: RL runs need trainer=rl (or set trainer.{key})")
    _require(t.lr > 0, f"trainer.lr={t.lr} must be > 0")
    _require(t.max_steps is not None and t.max_steps >= 1, f"trainer.max_steps={t.max_steps} must be >= 1")
    check_zero(t)
    check_logits_chunk_tokens(t)
    check_gradient_checkpointing(t)
    check_compile(t)
    _require(t.world_size >= 1, f"trainer.world_size={t.world_size} must be >= 1")
    check_lora(cfg.model.get("lora"))
    _require(t.ppo_epochs >= 1, f"trainer.ppo_epochs={t.ppo_epochs} must be >= 1")
    on_gpu = torch.cuda.is_available()
    available = torch.cuda.device_count() if on_gpu else (os.cpu_count() or 1)
    if not cfg.cluster.get("ray_address"):  # a remote Ray cluster is checked by Ray's own scheduler
        _require(
            t.world_size <= available,
            f"trainer.world_size={t.world_size} exceeds the {available} {'GPUs' if on_gpu else 'CPUs'} of this machine; "
            "lower trainer.world_size or give cluster.ray_address of a larger Ray cluster",
        )
    _require(r.backend in ("hf", "vllm"), f"rollout.backend={r.backend!r} must be hf or vllm")
    check_bundle_strategy(cfg.cluster)
    check_weight_sync(r, cfg.cluster.placement, on_gpu)
    check_precision(t.get("precision", "auto"), on_gpu, on_gpu and torch.cuda.is_bf16_supported(), cfg.model.attn_backend)
    if r.backend == "vllm":
        check_vllm(r, cfg.cluster.placement, t.world_size, on_gpu, importlib.util.find_spec("vllm") is not None)
    a = cfg.algorithm
    check_rl_group_size(a)
    check_rl_policy_options(cfg)
    check_micro_batch_budget(t)
    _require(a.kl.placement in ("loss", "reward"), f"algorithm.kl.placement={a.kl.placement!r} must be loss or reward")
    _require(a.kl.beta >= 0, f"algorithm.kl.beta={a.kl.beta} must be >= 0")
    if a.kl.placement == "reward" and a.kl.beta > 0:
        _require(a.get("kl_reward") is not None, "algorithm.kl.placement=reward needs an algorithm.kl_reward block "
                 "(see configs/algorithm/grpo.yaml)")
    uses_momentum = "aapo" in str(a.advantage.get("_target_", ""))
    _require(not uses_momentum or a.get("momentum_rollout", False),
             "algorithm.advantage is AAPO's (needs momentum-model rewards): set algorithm.momentum_rollout=true")
    _require(not a.get("momentum_rollout", False) or uses_momentum,
             "algorithm.momentum_rollout=true samples a momentum model whose rewards only AAPO's advantage uses; "
             "set algorithm.momentum_rollout=false or algorithm=aapo")
    if a.get("momentum"):
        _require(0 <= a.momentum.alpha <= 1, f"algorithm.momentum.alpha={a.momentum.alpha} must be in [0, 1] (1 = frozen)")
        _require(a.momentum.period >= 1, f"algorithm.momentum.period={a.momentum.period} must be >= 1")
    if a.get("overlong_penalty"):
        cache = a.overlong_penalty.cache_len
        _require(0 < cache <= r.max_new_tokens, f"algorithm.overlong_penalty.cache_len={cache} must be in "
                 f"(0, rollout.max_new_tokens={r.max_new_tokens}]: the penalty ramps over the end of the budget")
    _require(r.get("max_refill_rounds", 0) >= 0, f"rollout.max_refill_rounds={r.get('max_refill_rounds')} must be >= 0")
    if r.get("multi_turn", False):  # single-pass multi-turn documents need a backend that reads the span description
        check_mode("single_pass", cfg.model.attn_backend, max_turns=2)
    check_architecture(cfg, cfg.data.max_seq_len + r.max_new_tokens, "data.max_seq_len + rollout.max_new_tokens")
    sampler = str(cfg.get("sampler", {}).get("_target_", ""))
    if sampler.endswith(("BandSampler", "ScheduleSampler")) and not (sampler.endswith("ScheduleSampler") and cfg.sampler.get("key")):
        _require("correctness" in cfg.reward, f"sampler={sampler.rsplit('.', 1)[-1]} tracks pass rates from the correctness "
                 "reward: add it (reward=[correctness,...]) or use sampler=uniform")
    _require(r.get("async_steps", 0) in (0, 1), f"rollout.async_steps={r.get('async_steps')} must be 0 (on-policy) or 1 "
             "(the next step's rollouts generated during the update)")
    _require(not (r.get("async_steps", 0) and r.get("multi_turn", False)),
             "rollout.async_steps=1 overlaps single-turn generation with the update; multi-turn rollouts take several "
             "rounds in the driver: set rollout.async_steps=0 with rollout.multi_turn=true")
    for key, value in (("rollout.num_threads", r.get("num_threads")), ("trainer.num_threads", t.get("num_threads"))):
        _require(value is None or value >= 1, f"{key}={value} must be >= 1 or null (automatic)")
    share = t.get("share_prompt", "auto")
    _require(share in ("auto", True, False), f"trainer.share_prompt={share!r} must be auto, true or false")
    _require(not (share is True and r.get("multi_turn", False)),
             "trainer.share_prompt=true runs single-turn rollouts; multi-turn chats train as single-pass documents: "
             "set trainer.share_prompt=auto or false")
    _require(not (share is True and cfg.model.attn_backend != "sdpa"),
             f"trainer.share_prompt=true is implemented for model.attn_backend=sdpa, got {cfg.model.attn_backend}; "
             "set trainer.share_prompt=auto or false")
    _require(r.num_workers >= 1, f"rollout.num_workers={r.num_workers} must be >= 1")
    reward_workers = r.get("reward_workers", 1)
    _require(isinstance(reward_workers, int) and reward_workers >= 0,
             f"rollout.reward_workers={reward_workers} must be an integer >= 0 (0 = rewards computed in the driver)")
    if cfg.cluster.placement == "disaggregated" and not cfg.cluster.get("ray_address"):
        # every actor holds a device (rollout, reference) or CPU (reward) of its own: Ray would wait forever otherwise
        cpus = cfg.cluster.get("ray_num_cpus") or os.cpu_count() or 1
        devices = t.world_size + r.num_workers * (2 if a.get("momentum_rollout") else 1) + (1 if a.kl.beta > 0 else 0)
        needed_cpus = reward_workers + (0 if on_gpu else devices)
        _require(not on_gpu or devices <= available,
                 f"cluster.placement=disaggregated needs {devices} GPUs (trainer ranks + rollout workers + reference), "
                 f"this machine has {available}: use cluster.placement=colocated or fewer workers")
        _require(needed_cpus <= cpus,
                 f"cluster.placement=disaggregated needs {needed_cpus} CPUs (one per trainer rank, rollout, reference and "
                 f"reward worker), Ray has {cpus}: use cluster.placement=colocated, fewer workers, or set cluster.ray_num_cpus")
    _require(r.max_new_tokens >= 1, f"rollout.max_new_tokens={r.max_new_tokens} must be >= 1")
    minis = t.get("ppo_mini_batches", 1)
    _require(isinstance(minis, int) and 1 <= minis <= r.prompts_per_step,
             f"trainer.ppo_mini_batches={minis} must be an integer in [1, rollout.prompts_per_step={r.prompts_per_step}] "
             "(each mini-batch holds whole groups)")
    _require(
        r.prompts_per_step // max(minis, 1) * a.group_size >= t.world_size * t.micro_batches_per_rank,
        f"trainer.ppo_mini_batches={minis}: each mini-batch of {r.prompts_per_step // max(minis, 1)} prompts x "
        f"algorithm.group_size={a.group_size} responses cannot fill trainer.world_size * trainer.micro_batches_per_rank "
        f"= {t.world_size * t.micro_batches_per_rank} micro-batches; lower trainer.ppo_mini_batches",
    )
    _require(
        r.prompts_per_step * a.group_size >= t.world_size * t.micro_batches_per_rank,
        f"rollout.prompts_per_step * algorithm.group_size = {r.prompts_per_step * a.group_size} responses cannot fill "
        f"trainer.world_size * trainer.micro_batches_per_rank = {t.world_size * t.micro_batches_per_rank} micro-batches",
    )
    _require(cfg.logger.mode in ("offline", "online", "disabled"), f"logger.mode={cfg.logger.mode!r} must be offline, online or disabled")
    check_backend(cfg.model.attn_backend, "cuda" if on_gpu else "cpu")
    check_sequence_parallel(cfg)


def check_micro_batch_budget(t: DictConfig) -> None:
    """trainer.max_tokens_per_micro_batch (null = a fixed count) must hold the longest document, a whole row."""
    budget = t.get("max_tokens_per_micro_batch")
    if budget is None:
        return
    _require(isinstance(budget, int) and budget >= t.row_tokens,
             f"trainer.max_tokens_per_micro_batch={budget} must be an integer >= trainer.row_tokens={t.row_tokens} (a "
             "micro-batch must hold the longest prompt + response); raise it, lower trainer.row_tokens, or set it to null")


def check_max_bad_steps(t: DictConfig) -> None:
    """``trainer.max_bad_steps``: skipped (non-finite) steps in a row before the run stops (train/workers/run_stops.py)."""
    limit = t.get("max_bad_steps", 3)
    _require(limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1),
             f"trainer.max_bad_steps={limit} must be an integer >= 1 (non-finite steps in a row before the run stops) "
             "or null (never stop)")


def check_actor_timeout(cluster: DictConfig) -> None:
    """``cluster.actor_timeout_s``: the longest wait of the driver on an actor call (train/workers/actors.py)."""
    limit = cluster.get("actor_timeout_s", 1800)
    _require(limit is None or (isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit > 0),
             f"cluster.actor_timeout_s={limit} must be a number of seconds > 0 (the longest wait on a trainer rank, "
             "rollout or reward worker) or null (no limit)")


def check_head_timeout(cluster: DictConfig) -> None:
    """``cluster.head_timeout_s``: how long the Ray head may be unreachable (train/workers/cluster_watch.py)."""
    limit = cluster.get("head_timeout_s", 30)
    _require(limit is None or (isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit > 0),
             f"cluster.head_timeout_s={limit} must be a number of seconds > 0 (below Ray's 60 s GCS reconnect limit) "
             "or null (no watch of the Ray head)")


def check_fault_limits(cfg: DictConfig) -> None:
    """The limits that turn a diverged or stuck run into a stop with a message (both recipes)."""
    check_max_bad_steps(cfg.trainer)
    check_actor_timeout(cfg.cluster)
    check_head_timeout(cfg.cluster)


def check_sequence_parallel_size(t: DictConfig, attn_backend: str) -> None:
    """``trainer.sequence_parallel_size`` (train/models/sequence_parallel.py): an integer >= 1 dividing
    ``trainer.world_size``; above 1 only under ``model.attn_backend=sdpa`` (the exact dense mask of the whole row is
    handed to DeepSpeed's Ulysses attention) and without a shared-prompt update (it runs whole sequences)."""
    size = t.get("sequence_parallel_size", 1)
    _require(isinstance(size, int) and not isinstance(size, bool) and size >= 1,
             f"trainer.sequence_parallel_size={size} must be an integer >= 1 (1 = no sequence parallelism)")
    if size == 1:
        return
    _require(isinstance(t.world_size, int) and t.world_size % size == 0,
             f"trainer.world_size={t.world_size} must be a multiple of trainer.sequence_parallel_size={size} (groups of "
             "SP consecutive ranks split each sequence); change either")
    _require(attn_backend == "sdpa",
             f"trainer.sequence_parallel_size={size} runs under model.attn_backend=sdpa only (flex and flash masks are not "
             f"wired for sequence-parallel shards), got model.attn_backend={attn_backend}: set model.attn_backend=sdpa "
             "or trainer.sequence_parallel_size=1")
    _require(t.get("share_prompt", "auto") is not True,
             f"trainer.share_prompt=true runs whole sequences; with trainer.sequence_parallel_size={size} set "
             "trainer.share_prompt=auto or false")


def check_sequence_parallel_model(config, size: int) -> None:
    """The policy's heads must split over ``trainer.sequence_parallel_size`` ranks (Ulysses scatters heads): attention
    heads divisible by SP; key/value heads divisible by SP, or SP a multiple of them (DeepSpeed's
    ``UlyssesSPAttentionHF`` then replicates each kv head). An attention-free model (Mamba-2) has nothing to split."""
    from train.models.model_zoo import ATTENTION_FREE

    if size == 1 or config is None:
        return
    _require(config.model_type not in ATTENTION_FREE,
             f"trainer.sequence_parallel_size={size}: {config.model_type} is attention-free (no heads for Ulysses to "
             "split); set trainer.sequence_parallel_size=1")
    text = config.get_text_config()
    heads, kv = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    _require(heads % size == 0,
             f"trainer.sequence_parallel_size={size} must divide the model's {heads} attention heads "
             "(num_attention_heads); choose a divisor of it")
    _require(kv % size == 0 or size % kv == 0,
             f"trainer.sequence_parallel_size={size} and the model's {kv} key/value heads (num_key_value_heads): one "
             "must divide the other; choose trainer.sequence_parallel_size accordingly")


def check_sequence_parallel(cfg: DictConfig) -> None:
    """All ``trainer.sequence_parallel_size`` checks of a run (SFT and RL)."""
    check_sequence_parallel_size(cfg.trainer, cfg.model.attn_backend)
    check_sequence_parallel_model(policy_config(cfg.model), int(cfg.trainer.get("sequence_parallel_size", 1)))


def check_logits_chunk_tokens(t: DictConfig) -> None:
    """``trainer.logits_chunk_tokens``: tokens per chunk of the tiled logits (train/models/tiled_logits.py), or null."""
    chunk = t.get("logits_chunk_tokens")
    _require(chunk is None or (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1),
             f"trainer.logits_chunk_tokens={chunk!r} must be an integer >= 1 (tokens per logits chunk, e.g. 4096) "
             "or null (the full logits)")


def check_compile(t: DictConfig) -> None:
    """``trainer.compile``: a bool; on CPU, torch.compile's kernels need a C++ compiler on this machine."""
    import torch

    from train.models.compiled import compiler_problem

    compiled = t.get("compile", False)
    _require(isinstance(compiled, bool), f"trainer.compile={compiled!r} must be true or false")
    problem = compiler_problem(torch.cuda.is_available()) if compiled else None
    _require(problem is None, problem or "")


def check_gradient_checkpointing(t: DictConfig) -> None:
    """``trainer.gradient_checkpointing``: a bool; it drops the KV cache that ``trainer.share_prompt=true`` needs."""
    checkpointed = t.get("gradient_checkpointing", False)
    _require(isinstance(checkpointed, bool), f"trainer.gradient_checkpointing={checkpointed!r} must be true or false")
    _require(not (checkpointed and t.get("share_prompt", "auto") is True),
             "trainer.gradient_checkpointing=true recomputes layers without the prompt KV cache that "
             "trainer.share_prompt=true reads: set trainer.share_prompt=auto (off under checkpointing) or false")
