"""Shared fixtures: composed configs, a tiny tokenizer and tiny models (all built locally, fast)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# REASONPOST_TEST_THREADS=N runs the suite at N torch intra-op threads: in this process and, through
# OMP_NUM_THREADS, in the processes it starts (Ray workers, `python -m train` subprocesses) unless they set their
# own. The suite's tolerances must not depend on it (reduction order changes with the thread count); run it at 1
# and 2, and in random order with `--random-order` (pytest-random-order, installed with .[test]; off unless asked).
TEST_THREADS = os.environ.get("REASONPOST_TEST_THREADS")
if TEST_THREADS:
    if not TEST_THREADS.isdigit() or int(TEST_THREADS) < 1:
        raise pytest.UsageError(f"REASONPOST_TEST_THREADS={TEST_THREADS!r} must be a positive integer (or unset)")
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = TEST_THREADS
    import torch

    torch.set_num_threads(int(TEST_THREADS))

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(REPO / "configs")

# Small enough for fast tests, same architecture family as the embedded default.
TEST_ARCH = {
    "model_type": "qwen2",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from train.models.model_zoo import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture
def compose(tmp_path, model_cache):
    """compose(overrides) -> the run config, with run_dir in tmp, W&B off and the test-size model."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    def _compose(overrides=(), test_model: bool = True):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        with open_dict(cfg):
            cfg.run_dir = cfg.run_dir or str(tmp_path / "run")
            if not any(o.startswith("logger.mode=") for o in overrides):
                cfg.logger.mode = "disabled"
            if cfg.model.get("tiny") is not None:
                cfg.model.cache_dir = str(model_cache)
                if test_model:
                    cfg.model.tiny.arch = dict(TEST_ARCH)
                    if not any(o.startswith("model.path=") for o in overrides):
                        cfg.model.path = None  # experiments may start from a run (quickstart_rl); tests use the test model
        return cfg

    return _compose


@pytest.fixture(autouse=True)
def _process_wide_torch_state():
    """Each test starts with the same process-wide torch settings, whatever ran before it: the recipes set the
    thread count (cluster.num_threads) and flush denormals (train/models/runtime.py) in the calling process, and a later
    test must not inherit either, or its results would depend on test order."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test: tiny models gain nothing from more, and on a shared 2-core machine
    OpenMP threads spinning against other processes made steps ~10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_node_ray():
    """A two-node Ray cluster on this machine (node_a at 127.0.0.2, the head; node_b at 127.0.0.3; custom resources
    of those names pin actors to them), this process connected to it; both nodes stopped after the module."""
    pytest.importorskip("ray")
    from tests.loopback_cluster import loopback_cluster

    with loopback_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray with 4 CPUs for one test module's actors, shut down after the module (modules that need
    another size define their own)."""
    ray = pytest.importorskip("ray")
    from train.workers.ray_session import init_ray

    init_ray(num_cpus=4)
    yield
    ray.shutdown()


def tiny_model_path(model_cache: Path, seed: int, arch: dict | None = None) -> str:
    """Directory of the test-size tiny model built from ``seed`` (``arch``: TEST_ARCH unless given), built once
    per session in ``model_cache``."""
    from omegaconf import OmegaConf

    from train.models.model_zoo import resolve_model_path

    tiny = {"vocab_size": 384, "seed": seed, "arch": dict(arch or TEST_ARCH)}
    return str(resolve_model_path(OmegaConf.create({"path": None, "cache_dir": str(model_cache), "tiny": tiny})))


def rewind_checkpoints(run_dir: Path, step: int) -> None:
    """Make ``run_dir`` look like a run that died right after its step-``step`` checkpoint: the later
    ``checkpoints/step_*`` directories are removed and ``checkpoints/latest`` names ``step_<step>``."""
    import shutil

    ckpts = Path(run_dir) / "checkpoints"
    assert (ckpts / f"step_{step}").is_dir(), f"no checkpoint step_{step} in {ckpts}"
    for later in ckpts.glob("step_*"):
        if later.is_dir() and int(later.name.removeprefix("step_")) > step:
            shutil.rmtree(later)
    (ckpts / "latest").write_text(f"step_{step}")


def arithmetic_documents(tokenizer, count: int, seed: int, **spec) -> list:
    """``count`` synthetic arithmetic chats (ArithmeticSpec(verbosity=0.5, **spec), generator ``seed``) as
    training documents: token ids, the assistant-token loss mask and the row id."""
    from data_pipelines.arithmetic import ArithmeticSpec, generate
    from data_pipelines.chat_format import chat_ids
    from data_pipelines.packing import Document

    rows = generate(ArithmeticSpec(**{"verbosity": 0.5, **spec}), count, seed=seed)
    return [Document(*chat_ids(tokenizer, row["messages"]), sample_id=row["id"]) for row in rows]
