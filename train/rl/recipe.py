"""RL recipe (GRPO family, AAPO, Bingo): the RL step as data flow between Ray actors.

    prompts -> rollouts (RolloutPool) -> rewards (RewardPool) -> (reference log-probs) -> advantages
            -> policy update (TrainerGroup, DeepSpeed ZeRO) -> weight sync -> rollouts ...

With ``rollout.async_steps=1`` the rollouts of step k+1 are generated (by the weights before update k) while
update k runs, as verl's one-step off-policy mode: generation leaves the critical path and every sample is one
policy version old (``rollout/staleness``); pi_old in the clipped ratio is the policy at the update, as when
verl recomputes old log-probs on the actor.

Reads top to bottom: check the config, prepare data, rewards and the algorithm (train/rl/setup.py: bad input fails
before any actor starts), start the actors (train/rl/startup.py: also the only teardown), run the loop
(train/rl/loop.py: the step, evaluation, checkpoints). The math lives in algorithms/ and rewards/.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from train.models.model_zoo import load_model
from train.models.runtime import seed_everything
from train.run.config_checks import check_fault_limits, check_lora_targets, check_rl
from train.run.run_logger import RunLogger


def run(cfg: DictConfig, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train ``cfg``; ``on_step(step, metrics)`` is called after every step (train/rl/loop.py)."""
    check_rl(cfg)
    check_fault_limits(cfg)
    from rewards.registry import RewardFunctionError
    from train.rl.loop import RLLoop
    from train.rl.setup import RLSetup
    from train.rl.startup import start_actors
    from train.workers.actors import TrainerFailure
    from train.workers.cluster_watch import ClusterWatch
    from train.workers.ray_session import init_ray
    from train.workers.run_stops import stop_message

    run_dir = Path(cfg.run_dir)
    if cfg.cluster.get("num_threads"):  # the driver's own torch work: packing, advantages, checkpoint conversion
        torch.set_num_threads(cfg.cluster.num_threads)
    seed_everything(cfg.seed)
    setup = RLSetup.from_config(cfg)
    hf_model = load_model(setup.model_path)  # the driver's copy, for HF-format checkpoints (evaluation: rollout workers)
    check_lora_targets(hf_model, cfg.model.get("lora"))  # before any actor starts
    loop = None
    try:  # a failure in start-up (a trainer rank stuck past cluster.actor_timeout_s) names the way back too
        with ExitStack() as stack:
            init_ray(cfg.cluster.get("ray_address"), cfg.cluster.get("ray_num_cpus"))
            stack.enter_context(ClusterWatch.of_this_driver(  # a lost Ray head: our stop line, not Ray's exit
                run_dir, lambda: loop.step_count if loop is not None else None, cfg.cluster.get("head_timeout_s", 30)))
            actors = stack.enter_context(start_actors(cfg, setup.start_path, setup.model_path, setup.driver_rewards,
                                                      setup.algorithm.kl_beta))
            logger = RunLogger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True))
            stack.callback(logger.finish)
            loop = RLLoop(cfg, setup, actors, logger, hf_model, on_step)
            summary = loop.run(setup.resume_from)
    except (TrainerFailure, RewardFunctionError) as err:
        raise type(err)(stop_message(err, loop.step_count if loop is not None else None, run_dir)) from err
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"metrics:    {logger.metrics_path}")
    if "eval/accuracy" in summary:
        start = summary["initial_eval"].get("eval/accuracy")
        print(f"held-out exact match: {summary['eval/accuracy']:.3f}" + (f" (start {start:.3f})" if start is not None else ""))
    return summary
