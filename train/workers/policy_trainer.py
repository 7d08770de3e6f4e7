"""One rank of the policy trainer, shared by SFT and RL: a torch.distributed process wrapped by DeepSpeed ZeRO
(stage 0-3). SFT hands it a token cross-entropy loss (train/sft/loss.py), RL its policy objective.

A group of these (Ray actors, see train/workers/actors.py) forms one world: gloo on CPU (``DS_ACCELERATOR=cpu``),
NCCL on GPU. Each rank computes log-probs and losses on its share of packed micro-batches through the same
forward code as SFT (train/models/forward.py). The loss handed to DeepSpeed is scaled so that, after DeepSpeed's
mean over ranks and over gradient-accumulation steps, the gradient is exactly that of the sum of the micro-batch
losses of the global batch, whatever the number of ranks or micro-batches (each loss is already divided by the
global normaliser the aggregation chooses: the loss-token count for token-mean, a constant for Dr.GRPO, ...).
The lr follows train/run/lr_schedule.py, one step per RL step; its state is saved with the optimizer's.
With ``model.lora`` (passed as ``trainer_cfg["lora"]``) the model is wrapped in peft adapters before DeepSpeed:
only they train, ``full_state_dict`` hands out the merged weights, ``save_state`` also writes the adapter
(train/models/lora.py).

Rendezvous (as OpenRLHF and verl): rank 0 opens the torch.distributed store on a free port of its own node and
publishes its Ray node address and that port; the other ranks connect there. Nothing is chosen on the driver, so
the ranks may sit on any nodes of the cluster.
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
from contextlib import contextmanager
from typing import Callable

import torch

from data_pipelines.packing import PackedBatch
from train.models import lora as lora_adapters
from train.models import sequence_parallel
from train.models.compiled import compile_forward
from train.models.forward import set_logits_chunk_tokens, token_logprobs
from train.models.model_zoo import load_model
from train.models.runtime import component_dtype
from train.run.lr_schedule import restore as restore_lr_schedule
from train.run.lr_schedule import warmup_then_decay
from train.workers.frozen_params import FrozenParameters


def compute_dtype(precision: str, on_gpu: bool) -> torch.dtype:
    """The trainer's compute dtype for ``trainer.precision``: bf16 on GPU for auto and bf16 (DeepSpeed's bf16 mode),
    fp32 for fp32 and always on CPU (the CPU ranks train in fp32). The reference model runs in the same one."""
    return component_dtype("trainer", precision, "cuda" if on_gpu else "cpu")


def network_interface(address: str) -> str | None:
    """The network interface that holds ``address``, else the one whose IPv4 network contains it (a loopback alias
    such as 127.0.0.2 belongs to ``lo``); None if there is none."""
    import psutil

    interfaces = psutil.net_if_addrs()
    for name, addrs in interfaces.items():
        if any(a.address.split("%")[0] == address for a in addrs):
            return name
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    for name, addrs in interfaces.items():
        networks = [ipaddress.ip_network(f"{a.address}/{a.netmask}", strict=False)
                    for a in addrs if a.family == socket.AF_INET and a.netmask]
        if any(ip in network for network in networks):
            return name
    return None


def deepspeed_config(trainer_cfg: dict, world_size: int, micro_batches_per_rank: int, on_gpu: bool) -> dict:
    """The DeepSpeed config of a policy trainer from our trainer keys (stage, offload, optimiser, clipping)."""
    stage = int(trainer_cfg.get("zero_stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"trainer.zero_stage={stage} must be 0, 1, 2 or 3")
    zero: dict = {"stage": stage}
    if trainer_cfg.get("offload_optimizer", False):
        if stage == 0:
            raise ValueError("trainer.offload_optimizer=true needs trainer.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu"}
    offload = "offload_optimizer" in zero
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": micro_batches_per_rank,
        "train_batch_size": world_size * micro_batches_per_rank,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": float(trainer_cfg["lr"]),
                "betas": list(trainer_cfg.get("betas", (0.9, 0.95))),
                "weight_decay": float(trainer_cfg.get("weight_decay", 0.0)),
                "torch_adam": True,  # plain torch AdamW: identical numerics on every stage and device
                # one fused kernel over all parameters instead of ~6 elementwise ops per tensor (the tiny model's
                # optimizer step was ~14% of the update on CPU); torch's fused AdamW runs on CPU and GPU
                "fused": True,
            },
        },
        "gradient_clipping": float(trainer_cfg.get("max_grad_norm", 0.0)),
        "bf16": {"enabled": compute_dtype(trainer_cfg.get("precision", "auto"), on_gpu) == torch.bfloat16},
        # offload steps the torch AdamW above on the CPU copy instead of DeepSpeed's compiled CPUAdam
        **({"zero_force_ds_cpu_optimizer": False} if offload else {}),
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def enable_gradient_checkpointing(model) -> None:
    """``trainer.gradient_checkpointing``: every decoder layer's activations are recomputed in the backward instead of
    kept (Hugging Face's per-layer checkpointing, non-reentrant: exact, and it works with frozen inputs under LoRA).
    Active in training mode only, so the no-grad log-prob forwards run as before."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft: the HF model
    if not getattr(core, "supports_gradient_checkpointing", False):
        raise ValueError(f"trainer.gradient_checkpointing=true: {type(core).__name__} does not support Hugging Face "
                         "gradient checkpointing; set trainer.gradient_checkpointing=false")
    kwargs = {"use_reentrant": False}
    if hasattr(core, "activation_checkpointing_enable"):  # transformers 5's name; gradient_checkpointing_enable warns
        core.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        core.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class PolicyTrainer:
    """A DeepSpeed engine around the policy on one rank of a ``world_size`` world.

    Built in steps, so that the world meets where rank 0 is: the constructor only keeps the settings; rank 0's
    ``open_rendezvous()`` returns (address, port); then every rank's ``join(address, port)`` forms the
    torch.distributed world and builds the engine (train/workers/actors.py ``TrainerGroup`` makes these calls).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        model_path: str,
        attn_backend: str,
        trainer_cfg: dict,
        micro_batches_per_rank: int,
        seed: int = 0,
        num_threads: int | None = None,
    ):
        self.rank, self.world_size, self.attn_backend = rank, world_size, attn_backend
        self.model_path, self.trainer_cfg, self.micro_batches_per_rank = model_path, trainer_cfg, micro_batches_per_rank
        self.seed, self.num_threads = seed, num_threads
        self.store = None  # the torch.distributed TCPStore: rank 0's server, or a client of it
        self.engine = None
        self.lora, self.adapter_names = None, None  # model.lora (trainer_cfg["lora"]) once join() wraps the model
        self.frozen = None  # FrozenParameters once a ZeRO 1-3 engine has frozen parameters (apply_to_model)

    def open_rendezvous(self) -> tuple[str, int]:
        """Rank 0: start the world's store on a port of this node that the OS picks, and return (this node's Ray
        address, that port) for every rank to ``join``. The store listens from now on, so no other process can take
        the port between the choice and the rendezvous."""
        import ray
        from torch.distributed import TCPStore

        if self.rank != 0:
            raise RuntimeError(f"open_rendezvous is rank 0's; rank {self.rank} joins the address rank 0 returns")
        address = ray.util.get_node_ip_address()
        self.store = TCPStore(address, 0, self.world_size, is_master=True, wait_for_workers=False)
        return address, self.store.port

    def join(self, master_addr: str, master_port: int) -> dict:
        """Join the world at rank 0's store (``open_rendezvous``) and build the DeepSpeed engine. Returns how this rank
        connected: its node address, the store address it used, the interface gloo binds to."""
        import ray
        from torch.distributed import TCPStore

        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        node = ray.util.get_node_ip_address() if ray.is_initialized() else None
        # gloo binds each rank to the address its hostname resolves to unless told an interface; a hostname that
        # resolves to loopback (Debian's 127.0.1.1) would leave ranks on other nodes unable to connect, so bind to
        # the interface of the address Ray reaches this node by (a user's GLOO_SOCKET_IFNAME wins)
        interface = network_interface(node) if node else None
        if interface and "GLOO_SOCKET_IFNAME" not in os.environ:
            os.environ["GLOO_SOCKET_IFNAME"] = interface
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size), LOCAL_RANK="0" if not on_gpu else str(self.rank % torch.cuda.device_count()),
        )
        import deepspeed

        if not on_gpu:  # ranks share the machine's cores; more threads than cores makes every rank crawl
            torch.set_num_threads(self.num_threads or max(1, (os.cpu_count() or 1) // self.world_size))
        torch.manual_seed(self.seed)
        if self.rank == 0 and self.store is None:
            raise RuntimeError("rank 0 must open_rendezvous() before join()")
        if self.rank != 0:
            self.store = TCPStore(master_addr, master_port, self.world_size, is_master=False)
        backend = "nccl" if on_gpu else "gloo"
        torch.distributed.init_process_group(backend, store=self.store, rank=self.rank, world_size=self.world_size)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # adopts the world formed above
        self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if on_gpu else torch.device("cpu")
        model = load_model(self.model_path, self.attn_backend, torch.float32, self.device)
        trainer_cfg = self.trainer_cfg
        # model.lora: only the adapters train (DeepSpeed gets the parameters that require grad), train/models/lora.py
        self.lora = trainer_cfg.get("lora") if lora_adapters.lora_enabled(trainer_cfg.get("lora")) else None
        if self.lora is not None:
            model = lora_adapters.wrap(model, self.lora)
        self.adapter_names = {n for n, p in model.named_parameters() if p.requires_grad} if self.lora else None
        model.train()
        # trainer.sequence_parallel_size: groups of SP consecutive ranks split every row (train/models/sequence_parallel.py)
        self.sequence_parallel = sequence_parallel.enable(model, sequence_parallel.sp_size(trainer_cfg))
        # long sequences: per-layer activation recomputation, and the logits computed a chunk of tokens at a time
        # (train/models/tiled_logits.py) in every forward of this model
        if trainer_cfg.get("gradient_checkpointing", False):
            enable_gradient_checkpointing(model)
        set_logits_chunk_tokens(model, trainer_cfg.get("logits_chunk_tokens"))
        self.config = deepspeed_config(trainer_cfg, self.world_size, self.micro_batches_per_rank, on_gpu)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=self.config
        )
        if trainer_cfg.get("compile", False):  # torch.compile of the forward and the log-softmax (train/models/compiled.py)
            compile_forward(self.engine)
        # the torch optimizer under DeepSpeed's ZeRO wrapper holds the param groups whose lr the schedule sets
        self.lr_schedule = warmup_then_decay(self.engine.basic_optimizer, float(trainer_cfg["lr"]),
                                             int(trainer_cfg.get("warmup_steps", 0)), int(trainer_cfg.get("max_steps", 1)),
                                             float(trainer_cfg.get("min_lr_ratio", 1.0)))
        self.last_gradients: dict[str, torch.Tensor] | None = None
        self.version = 0  # bumped at every optimizer step; rollouts record the version that generated them
        self.skipped_since_lr_step = self.applied_since_lr_step = 0  # optimizer steps since advance_lr_schedule
        return {"rank": self.rank, "node": node, "store": (self.store.host, self.store.port),
                "gloo_interface": os.environ.get("GLOO_SOCKET_IFNAME") if backend == "gloo" else None}

    # -- forward ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def logprobs(self, batches: list[PackedBatch]) -> list[torch.Tensor]:
        """Per-token log-probs [rows, seq-1] of each batch under the current weights (no grad)."""
        self.engine.eval()
        out = [token_logprobs(self.engine, b.to(self.device), self.attn_backend)[0].cpu() for b in batches]
        self.engine.train()
        return out

    def train_step(self, batches: list[PackedBatch], loss_fn: Callable, extras: list[dict],
                   keep_gradients: bool = False) -> dict:
        """One optimizer step over this rank's micro-batches (any count, the same on every rank: DeepSpeed's
        gradient accumulation is set to it).

        ``loss_fn(logprobs, entropy, batch, extra) -> (loss, stats)`` returns the micro-batch's share of the
        global loss (shape []); it is rescaled to undo DeepSpeed's averaging, so the update equals one step on
        the whole global batch.
        A ``loss_fn`` with ``needs_entropy = False`` gets ``entropy=None`` (saves a pass over the vocabulary).
        ``keep_gradients`` keeps the full reduced gradient of the step (before clipping) for ``gradients()``.
        """
        if not batches:
            raise ValueError(f"rank {self.rank} got no micro-batches for an optimizer step")
        if len(batches) != self.engine.gradient_accumulation_steps():  # a token budget sets the count per step
            self.engine.set_train_batch_size(self.world_size * len(batches))  # DeepSpeed's gas = len(batches)
        scale = self.world_size * len(batches)
        with_entropy = getattr(loss_fn, "needs_entropy", True)  # a diagnostic the SFT loss does without
        totals: dict[str, float] = {}
        grad_norm = None
        finite_losses, skip = True, False
        for index, (batch, extra) in enumerate(zip(batches, extras)):
            # the boundary from this step's count, not DeepSpeed's micro-step counter (off once the count changed)
            self.engine.set_gradient_accumulation_boundary(index == len(batches) - 1)
            batch = batch.to(self.device)
            logprobs, entropy = token_logprobs(self.engine, batch, self.attn_backend, with_entropy=with_entropy)
            loss_sum, stats = loss_fn(logprobs, entropy, batch, {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in extra.items()})
            loss_value = float(loss_sum.detach())
            finite_losses = finite_losses and math.isfinite(loss_value)
            self.engine.backward(loss_sum * scale)
            if index == len(batches) - 1 and self.config["zero_optimization"]["stage"] == 0:
                # stage 0 keeps whole, already all-reduced gradients; DeepSpeed reports no norm there
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            if index == len(batches) - 1 and keep_gradients:
                self.last_gradients = self._full_gradients()
            if index == len(batches) - 1:
                skip = not self._all_finite(finite_losses, grad_norm)
            with self._optimizer_paused(skip):
                self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            totals["loss_sum"] = totals.get("loss_sum", 0.0) + loss_value
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        skip = skip or not self.engine.was_step_applied()  # ZeRO / bf16 optimizers skip a non-finite gradient norm
        self._record_skip(skip)
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        totals["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        totals["skipped"] = float(skip)
        return totals

    # -- non-finite steps: skipped on every rank ----------------------------------------------------------------
    def _all_finite(self, finite_losses: bool, grad_norm: float | None) -> bool:
        """Whether every rank's losses of this step, and under ZeRO-0 the reduced gradient, are finite: one flag
        all-reduced (MIN) over the world after the last backward, so every rank takes the same decision.

        ZeRO 1-3 and DeepSpeed's bf16 optimizer test the norm of the reduced gradient themselves and skip the step
        when it is not finite (their overflow path, reported by ``engine.was_step_applied()``); under ZeRO-0 in fp32
        nothing does, hence ``grad_norm`` here (the norm train_step already computes)."""
        finite = finite_losses and (grad_norm is None or math.isfinite(grad_norm))
        flag = torch.tensor([1.0 if finite else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item() == 1.0)

    @contextmanager
    def _optimizer_paused(self, paused: bool):
        """While ``paused``, the torch AdamW under DeepSpeed leaves parameters and state as they are: DeepSpeed's
        ``engine.step()`` still does its boundary bookkeeping (gradient clean-up, ZeRO partition copies, micro-step
        count), but no update happens. (Every stage calls this one optimizer's ``step``; the lr schedule wraps it
        as an attribute of the instance, which is put back.)"""
        if not paused:
            yield
            return
        optimizer = self.engine.basic_optimizer
        own = optimizer.__dict__.get("step")
        optimizer.step = lambda *args, **kwargs: None
        try:
            yield
        finally:
            if own is None:
                del optimizer.step
            else:
                optimizer.step = own

    def _record_skip(self, skipped: bool) -> None:
        """An applied optimizer step bumps the policy version; ``advance_lr_schedule`` holds the lr when every
        optimizer step since its last call was skipped."""
        if skipped:
            self.skipped_since_lr_step += 1
        else:
            self.version += 1
            self.applied_since_lr_step += 1

    def advance_lr_schedule(self) -> float:
        """End of an RL step: the lr its updates used; the schedule moves to the next step's, unless the step's
        optimizer steps were all skipped (non-finite, ``train_step``)."""
        used = self.lr_schedule.get_last_lr()[0]
        if not (self.skipped_since_lr_step and not self.applied_since_lr_step):
            self.lr_schedule.step()
        self.skipped_since_lr_step = self.applied_since_lr_step = 0
        return used

    def start_lr_schedule(self, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float,
                          decay: str = "cosine", state: dict | None = None, steps_done: int = 0) -> float:
        """Replace the lr schedule (an SFT curriculum phase brings its own, train/run/lr_schedule.py): at its
        saved ``state`` when resuming inside the phase, else ``steps_done`` steps in. Returns the lr of the next step."""
        self.lr_schedule = warmup_then_decay(self.engine.basic_optimizer, peak_lr, warmup_steps, total_steps,
                                             min_lr_ratio, decay)
        if state is not None:
            restore_lr_schedule(self.lr_schedule, state)
        else:
            for _ in range(steps_done):
                self.lr_schedule.step()
        return self.lr_schedule.get_last_lr()[0]

    def lr_schedule_state(self) -> dict:
        return self.lr_schedule.state_dict()

    def apply_to_model(self, fn: Callable):
        """``fn(module)`` on this rank's model (e.g. a curriculum phase's parameter freezing); returns its result.
        Under LoRA the base weights stay frozen whatever ``fn`` sets: freezing patterns act on the adapters only."""
        result = fn(self.engine.module)
        if self.lora is not None:
            for name, param in self.engine.module.named_parameters():
                param.requires_grad_(param.requires_grad and name in self.adapter_names)
        stage = self.config["zero_optimization"]["stage"]
        if stage > 0:  # ZeRO's flat optimizer state would move frozen parameters: hold them
            self.frozen = self.frozen or FrozenParameters(self.engine, stage)
            self.frozen.update()
        return result

    def _full_gradients(self) -> dict[str, torch.Tensor] | None:
        """The reduced gradient of every parameter on rank 0 (between the last backward and the optimizer step;
        ZeRO shards are gathered, so every rank must call this), None elsewhere."""
        from deepspeed.utils import safe_get_full_grad

        grads = {name: safe_get_full_grad(p) for name, p in self.engine.module.named_parameters() if p.requires_grad}
        return {n: g.detach().float().cpu().clone() for n, g in grads.items()} if self.rank == 0 else None

    def gradients(self) -> dict[str, torch.Tensor] | None:
        """The gradients kept by the last ``train_step(..., keep_gradients=True)`` (rank 0; None elsewhere)."""
        return self.last_gradients

    # -- weights -----------------------------------------------------------------------------------------------
    def _gather(self, params: list):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, enabled=self.config["zero_optimization"]["stage"] == 3)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """All weights on rank 0 (gathering ZeRO-3 shards; every rank must call this), None elsewhere. Under LoRA:
        the merged weights W + (alpha / r) B A under the base model's names (train/models/lora.py), so rollout
        workers, the reference and HF checkpoints take them as they take a full model's."""
        import deepspeed

        module = self.engine.module
        if self.lora is not None:
            return lora_adapters.merged_state_dict(module, self._gather, keep=self.rank == 0)
        state = {}
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], enabled=self.config["zero_optimization"]["stage"] == 3):
                if self.rank == 0:
                    state[name] = param.detach().cpu().clone()
        return state if self.rank == 0 else None

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save_state(self, path: str) -> None:
        """DeepSpeed state (sharded optimizer, step) and the lr schedule under ``path/deepspeed``; every rank calls.
        Under LoRA also the adapter in peft's format under ``path/adapter`` (written by rank 0)."""
        if self.lora is not None:
            adapter = lora_adapters.adapter_state_dict(self.engine.module, self._gather, keep=self.rank == 0)
            if self.rank == 0:
                lora_adapters.save_adapter(self.engine.module, os.path.join(path, lora_adapters.ADAPTER_DIR), adapter)
        self.engine.save_checkpoint(os.path.join(path, "deepspeed"), tag="state",
                                    client_state={"version": self.version, "lr_schedule": self.lr_schedule.state_dict()})

    def load_state(self, path: str, step: int) -> None:
        """Resume at RL step ``step``; a checkpoint from before lr schedules were saved moves the schedule there."""
        _, client = self.engine.load_checkpoint(os.path.join(path, "deepspeed"), tag="state")
        client = client or {}
        self.version = int(client.get("version", 0))
        if client.get("lr_schedule") is not None:
            restore_lr_schedule(self.lr_schedule, client["lr_schedule"])
        else:
            for _ in range(step):
                self.lr_schedule.step()
