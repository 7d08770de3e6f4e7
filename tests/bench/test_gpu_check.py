"""bench/gpu_check.py's CPU-runnable parts: the clean skip without CUDA, arguments and check selection, the
subprocess protocol, the verdicts, the report, and the log-prob / loss helpers the GPU checks are built on; and dry
runs on CPU of the flash, weight-sync and vLLM-vs-HF checks through stand-ins (flash_attn: SDPA per segment; vllm: an
engine computing with the checkpoint's HF model), which exercise each check's code and verdict, not GPU numerics.
The rl_step and mamba2 checks need a GPU (none here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import TEST_ARCH

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu_check"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_gpu_check", None)


def test_without_cuda_the_script_skips_cleanly():
    assert not torch.cuda.is_available()
    proc = subprocess.run([sys.executable, str(BENCH)], capture_output=True, text=True, timeout=300, check=False)
    assert (proc.returncode, proc.stdout.strip()) == (0, "skipped: no CUDA")


def test_selection_keeps_the_order_given_each_check_once(gc):
    assert gc.select_checks("all") == ["flash", "vllm_vs_hf", "weight_sync", "rl_step", "mamba2"]
    assert gc.select_checks("mamba2, flash,mamba2") == ["mamba2", "flash"]
    with pytest.raises(ValueError, match="unknown check 'flsh'"):
        gc.select_checks("flash,flsh")
    with pytest.raises(ValueError, match="unknown check"):
        gc.select_checks(" , ")


def test_arguments(gc, capsys):
    args = gc.parse_args(["--checks", "weight_sync,rl_step", "--rl-steps", "10"])
    assert args.selected == ["weight_sync", "rl_step"] and args.rl_steps == 10 and args.rl_warmup == 2
    assert gc.parse_args([]).rl_steps == 20 and gc.parse_args([]).one is None
    for bad, message in ((["--checks", "vllm"], "unknown check 'vllm'"), (["--rl-warmup", "0"], "--rl-warmup=0"),
                         (["--rl-steps", "2"], "--rl-warmup=2"), (["--gpu-memory-utilization", "1.2"], "(0, 1]"),
                         (["--one", "nope"], "--one")):
        with pytest.raises(SystemExit):
            gc.parse_args(bad)
        assert message in capsys.readouterr().err


FLASH_OK = {f"{v}_{k}": x for v in ("bf16", "fp32_autocast")
            for k, x in (("loss_rel", 1e-3), ("grad_rel", 8e-3), ("mixed_loss_rel", 2e-2), ("mixed_grad_rel", 0.6))}


def test_flash_verdict(gc):
    assert gc.verdict_flash(FLASH_OK) == (True, "")
    ok, why = gc.verdict_flash({**FLASH_OK, "bf16_grad_rel": 0.15})  # above the bf16 bound
    assert not ok and "bf16: flash vs sdpa" in why
    # within the bound, but no better than attention that mixes documents: the batches cannot tell them apart
    ok, why = gc.verdict_flash({**FLASH_OK, "fp32_autocast_mixed_grad_rel": 0.02})
    assert not ok and "fp32_autocast: flash errors" in why and "bf16" not in why


def test_vllm_verdicts(gc):
    good = {"vllm_reported_vs_trainer_mae": 0.01, "hf_trainer_logprob_mean": -1.20, "vllm_trainer_logprob_mean": -1.25}
    assert gc.verdict_vllm_vs_hf(good) == (True, "")
    ok, why = gc.verdict_vllm_vs_hf({**good, "vllm_reported_vs_trainer_mae": 0.3})
    assert not ok and "from the trainer's" in why
    ok, why = gc.verdict_vllm_vs_hf({**good, "vllm_trainer_logprob_mean": -1.6})
    assert not ok and "do not sample the same distribution" in why
    sync = {"after_sync_mae": 0.004, "before_sync_mae": 0.9, "synced_version": 1, "rollout_version": 1}
    assert gc.verdict_weight_sync(sync) == (True, "")
    assert not gc.verdict_weight_sync({**sync, "after_sync_mae": 0.2})[0]
    assert "did not move" in gc.verdict_weight_sync({**sync, "before_sync_mae": 0.02})[1]
    assert "version 0" in gc.verdict_weight_sync({**sync, "rollout_version": 0})[1]


def test_rl_step_and_mamba_verdicts(gc):
    steps = {"steps_measured_expected": 18, "ours_steps_measured": 18, "trl_steps_measured": 18}
    assert gc.verdict_rl_step(steps) == (True, "")
    assert gc.verdict_rl_step({**steps, "trl_steps_measured": 17}) == (False, "trl: 17 of 18 steps measured")
    assert gc.verdict_mamba2({"loss_rel": 1e-5, "grad_rel": 2e-4}) == (True, "")
    assert not gc.verdict_mamba2({"loss_rel": 1e-5, "grad_rel": 0.3})[0]


def test_run_one_judges_skips_and_failures(gc):
    args = SimpleNamespace()

    def missing(_):
        gc.require("surely_not_a_package_xyz")

    checks = {"mamba2": lambda _: {"loss_rel": 0.0, "grad_rel": 0.5}, "flash": missing,
              "weight_sync": lambda _: 1 / 0, "rl_step": lambda _: {"steps_measured_expected": 1, "ours_steps_measured": 1,
                                                                     "trl_steps_measured": 1}}
    assert gc.run_one("rl_step", args, checks).status == "pass"
    failed = gc.run_one("mamba2", args, checks)
    assert (failed.status, failed.figures["grad_rel"]) == ("fail", 0.5) and "grad 5.00e-01" in failed.note
    skipped = gc.run_one("flash", args, checks)
    assert skipped.status == "skip" and "surely_not_a_package_xyz is not installed" in skipped.note
    crashed = gc.run_one("weight_sync", args, checks)
    assert crashed.status == "fail" and crashed.note.startswith("ZeroDivisionError")


def test_the_subprocess_protocol(gc, capsys):
    # a check's process prints its Result last: here the real --one path, whose mamba2 check skips on this machine
    assert gc.main(["--one", "mamba2"]) == 0
    out = capsys.readouterr().out
    result = gc.parse_child_output("mamba2", 0, out, "")
    assert result.status == "skip" and "mamba_ssm" in result.note

    def runner(cmd, **kwargs):
        assert cmd[-2:] == ["--one", "flash"] and "--checks" in cmd and kwargs["timeout"] == 5
        line = gc.RESULT_MARK + json.dumps({"name": "flash", "status": "pass", "figures": {"x": 1.0}, "note": "",
                                            "seconds": 2.0})
        return subprocess.CompletedProcess(cmd, 0, stdout=f"loading\n{line}\n", stderr="")

    result = gc.run_in_subprocess("flash", ["--checks", "flash"], 5, runner=runner)
    assert (result.status, result.figures, result.seconds) == ("pass", {"x": 1.0}, 2.0)
    assert "loading" in capsys.readouterr().out and gc.RESULT_MARK not in capsys.readouterr().out

    def crashing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, -11, stdout="", stderr="Traceback ...\nRuntimeError: CUDA error\n\n")

    crashed = gc.run_in_subprocess("flash", [], 5, runner=crashing)
    assert crashed.status == "fail" and "status -11" in crashed.note and "RuntimeError: CUDA error" in crashed.note

    def hanging(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    assert "timed out after 5 s" in gc.run_in_subprocess("flash", [], 5, runner=hanging).note


def test_report_and_exit_status(gc):
    results = [gc.Result("flash", "pass", {"bf16_loss_rel": 0.00123, "batches": 2}, "", 3.2),
               gc.Result("mamba2", "skip", note="mamba_ssm is not installed"),
               gc.Result("rl_step", "fail", {"ours_s_per_step_median": 1.5}, "trl: 17 of 18 steps measured", 80.0)]
    report = gc.format_report(results)
    assert "PASS  flash" in report and "bf16_loss_rel = 0.00123" in report and "batches = 2" in report
    assert "SKIP  mamba2" in report and "FAIL  rl_step" in report and "trl: 17 of 18" in report
    assert report.splitlines()[-1] == "1 passed, 1 failed, 1 skipped"
    assert gc.exit_code(results) == 1 and gc.exit_code(results[:2]) == 0


def test_sequence_logprobs_match_an_unpadded_float64_forward(gc, tiny_tokenizer):
    from train.models.model_zoo import build_tiny_model

    model = build_tiny_model(tiny_tokenizer, dict(TEST_ARCH), seed=1).eval()
    sequences = [[5, 9, 13, 40, 41], [7, 8], [100, 3, 3, 3, 3, 3, 60]]
    got = gc.sequence_logprobs(model, sequences, tiny_tokenizer.pad_token_id, batch_size=2)
    exact = model.double()
    for s, lp in zip(sequences, got):
        with torch.no_grad():
            logits = exact(input_ids=torch.tensor([s])).logits[0, :-1]
        expected = torch.log_softmax(logits, -1)[torch.arange(len(s) - 1), torch.tensor(s[1:])]
        assert len(lp) == len(s) - 1 and torch.allclose(torch.tensor(lp, dtype=torch.float64), expected, atol=1e-5)
    rollout = SimpleNamespace(prompt_ids=[5, 9, 13], response_ids=[40, 41])
    model.float()
    assert gc.response_logprobs(model, [rollout], 0) == [got[0][2:]]  # the two response tokens
    assert gc.mean_abs_gap([[1.0, 2.0], [3.0]], [[1.5, 2.0], [2.0]]) == pytest.approx(0.5)
    assert gc.token_mean([[1.0, 2.0], [6.0]]) == 3.0
    with pytest.raises(ValueError):
        gc.mean_abs_gap([[1.0]], [[1.0, 2.0]])


def test_mixed_document_baseline_differs_only_where_rows_hold_several_documents(gc, tiny_tokenizer):
    from data_pipelines.packing import Document, pack
    from train.models.forward import sft_loss_sum
    from train.models.model_zoo import build_tiny_model

    assert gc.FLASH_ARCH == TEST_ARCH  # the GPU check's flash model is the flash test's
    model = build_tiny_model(tiny_tokenizer, dict(TEST_ARCH), seed=2).eval()
    docs = [Document(list(range(5, 5 + n)), [False] + [True] * (n - 1)) for n in (7, 5, 9)]
    one_per_row = pack(docs, row_tokens=9, rows_per_batch=3, pad_token_id=tiny_tokenizer.pad_token_id)[0]
    shared = pack(docs, row_tokens=30, rows_per_batch=1, pad_token_id=tiny_tokenizer.pad_token_id)[0]
    assert one_per_row.input_ids.shape[0] == 3 and shared.input_ids.shape[0] == 1
    with torch.no_grad():
        for batch, same in ((one_per_row, True), (shared, False)):
            exact, n = sft_loss_sum(model, batch, "sdpa")
            mixed, m = gc._mixed_loss_sum(model, batch)
            assert n == m and (abs(float(exact - mixed)) < 1e-5) is same
    assert gc.relative_error(torch.tensor([1.0, -2.0]), torch.tensor([1.0, -4.0])) == 0.5


def test_perturbed_weights_keep_their_names_and_change_every_tensor(gc, tiny_tokenizer):
    from train.models.model_zoo import build_tiny_model

    before = {n: p.clone() for n, p in build_tiny_model(tiny_tokenizer, dict(TEST_ARCH)).named_parameters()}
    after = dict(gc.perturbed(build_tiny_model(tiny_tokenizer, dict(TEST_ARCH)), seed=0).named_parameters())
    assert list(after) == list(before)
    assert all(not torch.equal(after[n], before[n]) for n in before)
    again = dict(gc.perturbed(build_tiny_model(tiny_tokenizer, dict(TEST_ARCH)), seed=0).named_parameters())
    assert all(torch.equal(again[n], after[n]) for n in after)


# -- dry runs of the vLLM checks on CPU: a stand-in vllm.LLM that computes with the checkpoint's HF model ------------
class HFBackedLLM:
    """``vllm.LLM`` stand-in: samples with train/models/sampling.py on the HF model of the same checkpoint (fp32, CPU)
    and reports its log-probs in vLLM V1's output structure; ``load_weights`` writes HF-named tensors into it."""

    def __init__(self, model, seed=0, **kwargs):
        from train.models.model_zoo import load_model, load_tokenizer

        self.hf, self.tokenizer, self.kwargs = load_model(model).eval(), load_tokenizer(model), kwargs
        self.calls: list[str] = []
        runner = SimpleNamespace(model=self)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner)))

    def get_tokenizer(self):
        return self.tokenizer

    def sleep(self, level=1):
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.calls.append("wake:" + ",".join(tags))

    def reset_prefix_cache(self):
        self.calls.append("reset")

    def load_weights(self, weights):
        params = dict(self.hf.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)
        self.calls.append("load")

    def generate(self, prompts, params, use_tqdm=True):
        from train.models.sampling import cut_at_eos, sample

        gc = sys.modules["bench_gpu_check"]
        params = params if isinstance(params, list) else [params] * len(prompts)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        outputs = []
        for prompt, sp in zip(prompts, params):
            ids, k = list(prompt["prompt_token_ids"]), sp.kwargs
            if k.get("prompt_logprobs") is not None:
                lps = gc.sequence_logprobs(self.hf, [ids], pad)[0]
                scored = [None] + [{t: SimpleNamespace(logprob=lp, rank=1)} for t, lp in zip(ids[1:], lps)]
                outputs.append(SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=scored, outputs=[
                    SimpleNamespace(index=0, token_ids=[eos], logprobs=None, finish_reason="stop")]))
                continue
            generator = torch.Generator().manual_seed(k["seed"] or 0)
            rows = sample(self.hf, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), k["max_tokens"], eos,
                          pad, k["temperature"], k["top_p"], generator, group_size=k["n"])
            samples = []
            for i, row in enumerate(rows.tolist()):
                response, truncated = cut_at_eos(row, eos, pad)
                lps = gc.sequence_logprobs(self.hf, [ids + response], pad)[0][len(ids) - 1:]
                samples.append(SimpleNamespace(index=i, token_ids=response, finish_reason="length" if truncated else "stop",
                                               logprobs=[{t: SimpleNamespace(logprob=lp, rank=1)} for t, lp in zip(response, lps)]))
            outputs.append(SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=None, outputs=samples))
        return outputs


@pytest.fixture
def cpu_dry_run(gc, monkeypatch):
    """The checks on CPU in fp32 against the stand-in engine; the process environment restored afterwards."""
    import types

    module = types.ModuleType("vllm")
    module.LLM = HFBackedLLM
    module.SamplingParams = lambda **kwargs: SimpleNamespace(kwargs=kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the worker's guard; nothing touches a GPU
    monkeypatch.setattr(gc, "DEVICE", torch.device("cpu"))
    monkeypatch.setattr(gc, "require", lambda *packages: None)
    for key in ("DS_ACCELERATOR", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.setenv(key, "cpu" if key == "DS_ACCELERATOR" else "0")
    return gc.parse_args(["--prompts", "2", "--group", "2", "--max-new-tokens", "6"])


def test_weight_sync_check_dry_run_on_cpu(gc, cpu_dry_run, one_thread):
    figures = gc.check_weight_sync(cpu_dry_run)
    # the stand-in computes in fp32 like the CPU trainer, but the sync casts to the engine's dtype (bf16 under
    # trainer.precision=auto): after it, only bf16 weight rounding separates them; before it, the update does
    assert figures["after_sync_mae"] < gc.VLLM_LOGPROB_MAE < 0.1 < figures["before_sync_mae"]
    assert figures["before_sync_vs_old_trainer_mae"] < 1e-5  # before the sync it is the old trainer
    assert figures["synced_version"] == figures["rollout_version"] == 1
    assert gc.verdict_weight_sync(figures) == (True, "")


def test_vllm_vs_hf_check_dry_run_on_cpu(gc, cpu_dry_run, one_thread):
    figures = gc.check_vllm_vs_hf(cpu_dry_run)
    assert figures["vllm_reported_vs_trainer_mae"] < 1e-5  # the stand-in's log-probs are the trainer's
    assert figures["hf_tokens_per_s"] > 0 and figures["vllm_tokens_per_s"] > 0
    assert 1 <= figures["vllm_response_length_mean"] <= 6 and 1 <= figures["hf_response_length_mean"] <= 6
    assert figures["hf_trainer_logprob_mean"] < 0 and figures["vllm_trainer_logprob_mean"] < 0


@pytest.mark.slow  # ~20-45 s each on the 2-core machine under load: bf16 forwards and backwards on CPU
@pytest.mark.parametrize("ignore_boundaries", [False, True])
def test_flash_check_dry_run_on_cpu_passes_with_boundaries_and_fails_without(gc, monkeypatch, one_thread,
                                                                             ignore_boundaries):
    """check_flash on CPU through tests/train/models/test_flash_varlen.py's stand-in kernel (SDPA per segment):
    its verdict passes; with a kernel that ignores the segments (documents of a row mixed) it fails."""
    from transformers import modeling_flash_attention_utils as fa_utils

    from tests.train.models.test_flash_varlen import _KERNEL_CACHE, _make_stand_in

    entry = {**fa_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2], "general_availability_check": lambda *a, **k: True,
             "supported_devices": ((lambda: True, "cpu"),)}
    monkeypatch.setitem(fa_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX, 2, entry)
    monkeypatch.setattr(fa_utils, "is_flash_attn_2_available", lambda *a, **k: True)
    calls: list = []
    module = _make_stand_in(calls, ignore_boundaries)
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setitem(sys.modules, "flash_attn.bert_padding", module.bert_padding)
    for name in _KERNEL_CACHE:
        monkeypatch.setattr(fa_utils, name, None)
    monkeypatch.setattr(gc, "DEVICE", torch.device("cpu"))
    figures = gc.check_flash(gc.parse_args([]))
    assert calls and all(kind == "varlen" for kind, *_ in calls)
    assert figures["rows"] == 2 and figures["documents"] > 2 * figures["batches"]  # several documents per row
    passed, why = gc.verdict_flash(figures)
    assert passed is not ignore_boundaries, why
