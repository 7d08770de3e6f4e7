"""Everything an RL run needs before its first actor starts, so that bad data, reward settings or config values
fail in seconds: the prompts and their sampler, held-out rows, the model path, the tokenizer, the algorithm's
parts, the reward functions (when they run in the driver), prompt sharing and the checkpoint to resume from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from transformers import AutoConfig

from data_pipelines.loading import load_split
from data_pipelines.prompts import to_prompts
from rewards.registry import build_reward
from train.models.model_zoo import ATTENTION_FREE, load_tokenizer, resolve_model_path
from train.rl.algorithm import Algorithm
from train.rl.multiturn_rollout import chat_prompts
from train.run import checkpoint
from train.run.config_checks import ConfigError


def make_sampler(sampler_cfg, prompts, batch_size: int, seed: int):
    """The ``sampler`` group's prompt sampler. ``_partial_``: the prompts must reach it as objects (instantiate
    would turn call-time arguments into configs: dataclasses to DictConfig, lists to ListConfig)."""
    return instantiate(sampler_cfg, _partial_=True)(prompts=prompts, batch_size=batch_size, seed=seed)


@dataclass
class RLSetup:
    sampler: object
    eval_rows: list
    model_path: str  # the starting policy (also the reference and AAPO's momentum model)
    tokenizer: object
    algorithm: Algorithm
    driver_rewards: object | None  # the reward functions when rollout.reward_workers=0, else None (reward workers)
    share_prompt: bool
    resume_from: Path | None
    start_path: str  # what the trainer and rollout workers load: the checkpoint when resuming

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "RLSetup":
        r_cfg = cfg.rollout
        multi_turn = bool(r_cfg.get("multi_turn", False))  # the policy answers every user turn of each chat itself
        train_rows = load_split(cfg.data, "train", require_assistant=False)
        eval_rows = load_split(cfg.data, "eval") if cfg.data.source == "synthetic" or cfg.data.eval_files else []
        if cfg.model.get("path"):
            with open_dict(cfg):  # a run directory means its latest checkpoint
                cfg.model.path = str(checkpoint.resolve_model_dir(cfg.model.path))
        model_path = str(resolve_model_path(cfg.model))
        if "bingo" in cfg.reward and cfg.reward.bingo.get("scorer", {}).get("model", "") is None:
            with open_dict(cfg):  # the self-information scorer defaults to the policy's starting weights
                cfg.reward.bingo.scorer.model = model_path
        # rollout.reward_workers=0: the reward functions run in the driver (built now, so bad settings fail first)
        driver_rewards = build_reward(cfg.reward) if int(r_cfg.get("reward_workers", 1)) == 0 else None
        algorithm = Algorithm.from_config(cfg.algorithm)
        tokenizer = load_tokenizer(model_path)
        prompts = (chat_prompts if multi_turn else to_prompts)(tokenizer, train_rows, cfg.data.system_prompt)
        sampler = make_sampler(cfg.sampler, prompts, r_cfg.prompts_per_step, cfg.seed)
        resume_from = checkpoint.resolve_resume(cfg.trainer.resume, Path(cfg.run_dir))
        return cls(sampler, eval_rows, model_path, tokenizer, algorithm, driver_rewards,
                   share_prompt(cfg, model_path, multi_turn), resume_from, str(resume_from) if resume_from else model_path)


def share_prompt(cfg, model_path: str, multi_turn: bool) -> bool:
    """trainer.share_prompt: the update (and log-prob forwards) run each prompt once for its G responses
    (data_pipelines/shared_prompt.py); auto = on for single-turn rollouts of attention models under sdpa, without
    trainer.gradient_checkpointing (Hugging Face's checkpointed layers drop the prompt's KV cache)."""
    wanted = cfg.trainer.get("share_prompt", "auto")
    attention_free = AutoConfig.from_pretrained(model_path).model_type in ATTENTION_FREE
    if wanted is True and attention_free:
        raise ConfigError("trainer.share_prompt=true needs an attention model (a KV cache to share); this model is "
                          "attention-free: set trainer.share_prompt=auto or false")
    whole_rows = int(cfg.trainer.get("sequence_parallel_size", 1) or 1) == 1  # SP splits rows; a shared prompt cannot be
    checkpointed = bool(cfg.trainer.get("gradient_checkpointing", False))  # checkpointed layers drop the KV cache
    return wanted is True or (wanted == "auto" and cfg.model.attn_backend == "sdpa" and not multi_turn and not attention_free
                              and whole_rows and not checkpointed)
