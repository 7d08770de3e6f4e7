"""One reward signature, and the weighted sum the RL recipe calls (components named by Hydra `_target_`s in
configs/reward/, the registry of built-in rewards).

Every reward function (or callable object) has the signature::

    fn(prompts: list[str], responses: list[str], response_ids: list[list[int]], metadata: list[dict],
       *, step: int, group_size: int, components: dict[str, Tensor]) -> Tensor[batch] | (Tensor[batch], dict)

``metadata[i]`` holds at least "answer"; unknown keys must be ignored. ``components`` holds the
components already computed for this batch (in config order), so e.g. Bingo can reuse correctness.
The optional dict holds per-sample diagnostics ([batch] tensors or lists) for logging.

A component that raises, hangs past its ``timeout_s`` (a registry key beside ``weight``; default 300 s per batch,
enforced where the call runs in a process's main thread: the driver or a reward worker), returns the wrong number
of values or a NaN/inf stops the run with a ``RewardFunctionError`` naming the component and the first bad sample;
nothing is scored as a silent zero.

From the config (``cfg.reward`` is a node of named components, each with ``_target_``, ``weight`` and optionally
``timeout_s``)::

    reward_fn = build_reward(cfg.reward)
    total, components, diagnostics = reward_fn(prompts, responses, response_ids, metadata, step=step,
                                               group_size=cfg.algorithm.group_size)
    # total [batch] = sum_k weight_k * components[k]; log components[k].mean() as reward/<k>
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable

import torch

DEFAULT_TIMEOUT_S = 300.0


class RewardConfigError(ValueError):
    """A ``reward`` config the rewards cannot be built from (``python -m train`` prints it as one line)."""


class RewardFunctionError(RuntimeError):
    """A reward component that raised, hung, or returned unusable values (``python -m train`` prints one line)."""


class _RewardTimeout(BaseException):  # BaseException: a reward's own `except Exception` cannot swallow it
    pass


@contextmanager
def time_limit(seconds: float | None):
    """Raise ``_RewardTimeout`` in the block after ``seconds`` (SIGALRM: only in a process's main thread; elsewhere,
    and for ``None``, no limit)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise _RewardTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _function_name(fn) -> str:
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", None) or type(fn).__name__


def _sample(prompts, responses, index: int) -> str:
    """``sample i (prompt '...', response '...')``, each text cut to 60 characters."""
    def cut(text):
        return repr(text if len(text) <= 60 else text[:57] + "...")

    prompt = f"prompt {cut(prompts[index])}, " if prompts is not None else ""
    return f"sample {index} ({prompt}response {cut(responses[index])})"


class CombinedReward:
    """total_i = sum_k w_k * r_k(i); every component checked for shape and finiteness, by name."""

    def __init__(self, components: dict[str, Callable], weights: dict[str, float],
                 timeouts: dict[str, float | None] | None = None):
        if not components:
            raise RewardConfigError("reward: no reward component selected; use e.g. reward=[correctness,format]")
        self.components = components
        self.weights = weights
        self.timeouts = {name: (timeouts or {}).get(name, DEFAULT_TIMEOUT_S) for name in components}

    def __call__(self, prompts, responses, response_ids, metadata, *, step: int = 0, group_size: int = 1):
        batch = len(responses)
        if not (len(metadata) == batch and (prompts is None or len(prompts) == batch)):
            raise ValueError(f"reward: {batch} responses but {len(metadata)} metadata rows / prompts")
        total = torch.zeros(batch, dtype=torch.float32)
        scores: dict[str, torch.Tensor] = {}
        diagnostics: dict[str, object] = {}
        for name, fn in self.components.items():
            values, extra = self._component(name, fn, prompts, responses, response_ids, metadata, step, group_size,
                                            scores)
            scores[name] = values
            total = total + self.weights[name] * values
            for key, value in (extra or {}).items():
                diagnostics[f"{name}/{key}"] = value
        return total, scores, diagnostics

    def _component(self, name, fn, prompts, responses, response_ids, metadata, step, group_size, scores):
        """One component's (values [batch], diagnostics), checked; a failure names the component and the sample."""
        label = f"reward.{name} ({_function_name(fn)})"
        batch = len(responses)
        try:
            with time_limit(self.timeouts[name]):
                out = fn(prompts, responses, response_ids, metadata, step=step, group_size=group_size,
                         components=scores)
        except _RewardTimeout:
            raise RewardFunctionError(
                f"{label} did not return within reward.{name}.timeout_s={self.timeouts[name]:g} s on a batch of "
                f"{batch} (first: {_sample(prompts, responses, 0)}): fix the reward function or raise its timeout_s"
            ) from None
        except Exception as err:  # noqa: BLE001 - re-raised with the component and the sample named
            index = self._first_failing_sample(fn, prompts, responses, response_ids, metadata, step, group_size,
                                               scores)
            where = _sample(prompts, responses, index) if index is not None else f"a batch of {batch}"
            raise RewardFunctionError(f"{label} raised {type(err).__name__}: {err} on {where}: fix the reward "
                                      "function or its inputs") from err
        values, extra = out if isinstance(out, tuple) else (out, {})
        try:
            values = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as err:
            raise RewardFunctionError(f"{label} returned {type(values).__name__}, not one number per sample "
                                      f"({err}): return a [batch] tensor or list of floats") from None
        if values.shape[0] != batch:
            raise RewardFunctionError(f"{label} returned {values.shape[0]} values for a batch of {batch}: return "
                                      "one value per response, in order")
        if not torch.isfinite(values).all():
            bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
            raise RewardFunctionError(
                f"{label} returned {values[bad[0]].item()} for {_sample(prompts, responses, bad[0])} ({len(bad)} "
                f"non-finite of {batch}, at {bad[:8]}): fix the reward function or its inputs"
            )
        return values, extra

    @staticmethod
    def _first_failing_sample(fn, prompts, responses, response_ids, metadata, step, group_size, scores):
        """The first sample on which ``fn`` alone raises too (stateless functions only: a component with state, such
        as Bingo's schedule, is not called again); None if none does or ``fn`` keeps state."""
        if hasattr(fn, "state_dict"):
            return None
        for i in range(len(responses)):
            try:
                with time_limit(DEFAULT_TIMEOUT_S):
                    fn(None if prompts is None else prompts[i:i + 1], responses[i:i + 1], response_ids[i:i + 1],
                       metadata[i:i + 1], step=step, group_size=1, components={k: v[i:i + 1] for k, v in scores.items()})
            except Exception:  # noqa: BLE001 - this is the sample we are looking for
                return i
            except _RewardTimeout:
                return None
        return None

    def state_dict(self) -> dict:
        """State kept across steps by components that have any (Bingo's dynamic schedule), by component name."""
        states = {name: fn.state_dict() for name, fn in self.components.items() if hasattr(fn, "state_dict")}
        return {name: state for name, state in states.items() if state}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            if name not in self.components:
                raise KeyError(f"reward state names component {name!r}, but the run's rewards are {sorted(self.components)}")
            self.components[name].load_state_dict(value)

    def close(self) -> None:
        for fn in self.components.values():
            if hasattr(fn, "close"):
                fn.close()


def build_reward(reward_cfg) -> CombinedReward:
    """Instantiate every component of ``cfg.reward`` (a mapping name -> {_target_, weight, ...})."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(reward_cfg, resolve=True) if not isinstance(reward_cfg, dict) else dict(reward_cfg)
    components, weights, timeouts = {}, {}, {}
    for name, node in cfg.items():
        if not isinstance(node, dict) or "_target_" not in node:
            raise RewardConfigError(f"reward.{name} must be a node with `_target_` and `weight` (see configs/reward/)")
        node = dict(node)
        weight = node.pop("weight", 1.0)
        if weight is None or not isinstance(weight, (int, float)):
            raise RewardConfigError(f"reward.{name}.weight must be a number, got {weight!r}")
        timeout = node.pop("timeout_s", DEFAULT_TIMEOUT_S)
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise RewardConfigError(f"reward.{name}.timeout_s must be a positive number of seconds or null (no "
                                    f"limit), got {timeout!r}")
        components[name] = instantiate(node)
        weights[name] = float(weight)
        timeouts[name] = None if timeout is None else float(timeout)
    return CombinedReward(components, weights, timeouts)

