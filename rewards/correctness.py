"""Correctness reward: the final answer is extracted and compared with the reference by math-verify.

    r_i = 1.0 if verify(parse(gold_i), parse(answer_part(response_i))) else 0.0

math-verify's own timeouts use ``signal.alarm``, which only works in a process's main thread (it raises
in a Ray actor thread or a trainer's worker thread). So every call runs in a dedicated child process
(started once, reused) whose main thread can use those timeouts, and the parent enforces a hard
per-sample wall-clock limit (``time_limit_s``) on top: a sample that exceeds it scores 0, the child is
killed and restarted, and the rest of the batch continues. This works from any thread or process.
"""

from __future__ import annotations

import json
import math
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch


def _answer_part(response: str, answer_after: str | None) -> str:
    if answer_after and answer_after in response:
        return response.rsplit(answer_after, 1)[1]
    return response


class MathVerifyProcess:
    """One child process (``rewards/_verify_worker.py``) that scores (response, gold) pairs with a hard
    per-sample wall-clock limit. Thread-safe; the child is started lazily and restarted after a timeout."""

    def __init__(self, time_limit_s: float = 5.0):
        if time_limit_s <= 0:
            raise ValueError(f"reward.correctness.time_limit_s must be > 0, got {time_limit_s}")
        self.time_limit_s = time_limit_s
        # math-verify takes whole seconds; keep its own limit inside ours so it usually fires first
        self.inner_timeout = max(1, math.floor(time_limit_s))
        self._proc: subprocess.Popen | None = None
        self._buffer = b""
        self._lock = threading.Lock()

    def _read_line(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # child died
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def _start(self) -> None:
        self._buffer = b""
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("_verify_worker.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        # importing math-verify/sympy takes seconds once; it must not count against a sample
        if self._read_line(120.0) != "ready":
            self._kill()
            raise RuntimeError("reward.correctness: the math-verify worker process did not start within 120 s")

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._proc, self._buffer = None, b""

    def close(self) -> None:
        with self._lock:
            self._kill()

    def __del__(self):
        try:
            self._kill()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def score(self, pairs: list[tuple[str, str]]) -> tuple[list[float], list[bool]]:
        """(scores, timed_out) per pair; a pair that exceeds time_limit_s scores 0."""
        scores, timed_out = [0.0] * len(pairs), [False] * len(pairs)
        with self._lock:
            for index, (response, gold) in enumerate(pairs):
                if self._proc is None or self._proc.poll() is not None:
                    self._start()
                # one sample at a time: a stuck sample can then never block a write to the child
                self._proc.stdin.write((json.dumps([response, gold, self.inner_timeout]) + "\n").encode())
                self._proc.stdin.flush()
                line = self._read_line(self.time_limit_s)
                if line is None:  # over the limit (or crashed): score 0, restart for the next sample
                    timed_out[index] = True
                    self._kill()
                else:
                    scores[index] = float(line)
        return scores, timed_out


class CorrectnessReward:
    """1.0 when math-verify finds the response's final answer equal to ``metadata["answer"]``, else 0.0.

    Equivalent forms are accepted (1/2, 0.5, \\frac{1}{2}, \\boxed{...} or plain). ``answer_after``: only
    the text after this marker (the think-close tag) is searched for the answer, so numbers in the
    reasoning are not mistaken for it; responses without the marker are searched whole.
    Diagnostics: ``timed_out`` (bool per sample).
    """

    def __init__(self, time_limit_s: float = 5.0, answer_after: str | None = "</think>", answer_key: str = "answer"):
        self.verifier = MathVerifyProcess(time_limit_s)
        self.answer_after = answer_after
        self.answer_key = answer_key

    def __call__(self, prompts, responses, response_ids, metadata, **context):
        pairs = []
        for i, (response, meta) in enumerate(zip(responses, metadata)):
            if self.answer_key not in meta:
                raise KeyError(
                    f"reward.correctness: metadata row {i} has no {self.answer_key!r} key (keys: {sorted(meta)}); "
                    "the data pipeline must carry the reference answer"
                )
            pairs.append((_answer_part(response, self.answer_after), str(meta[self.answer_key])))
        scores, timed_out = self.verifier.score(pairs)
        return torch.tensor(scores, dtype=torch.float32), {"timed_out": torch.tensor(timed_out)}

    def close(self) -> None:
        self.verifier.close()
