"""Weight sync by broadcast (``rollout.weight_sync``): trainer rank 0 sends every parameter to the rollout workers
over a process group of their own, instead of the driver's object-store round trip (train/workers/actors.py
``RolloutPool.sync``).

As OpenRLHF's ``_broadcast_to_vllm``: a separate group of 1 + W members (trainer rank 0 is member 0, rollout
worker j member j + 1), formed at a store that rank 0 opens on its own node; after each update every trainer rank
walks the parameters in order (gathering each one under ZeRO-3, which all ranks must join), rank 0 broadcasts it,
each worker receives it into a buffer of the announced shape and dtype and then installs them all with
``load_weights``. The group is built from the backend class on its own store (``ProcessGroupNCCL`` /
``ProcessGroupGloo``), so it is independent of the trainer ranks' default torch.distributed world and of any world
a worker may hold: the "stateless" group of vLLM's RLHF example.

``nccl`` sends GPU tensors GPU to GPU; every member needs a GPU of its own (NCCL refuses a group with two members on
one GPU), hence ``cluster.placement=disaggregated``. ``gloo`` is the same protocol over TCP on CPU tensors: the tests
run it, and it is the proof of this code on a machine without GPUs.
"""

from __future__ import annotations

from datetime import timedelta

import torch

from train.run.config_checks import WEIGHT_SYNC_MODES as MODES  # noqa: F401 - rollout.weight_sync's values

TIMEOUT = timedelta(minutes=30)


def sync_method(setting: str, on_gpu: bool, placement: str, backend: str = "hf") -> str:
    """``rollout.weight_sync`` resolved: ``auto`` is nccl for hf rollout workers on GPUs with disaggregated placement
    (each worker on a GPU of its own), else the object store (vLLM engines load through their own API)."""
    if setting == "auto":
        return "nccl" if on_gpu and placement == "disaggregated" and backend == "hf" else "object_store"
    return setting


def open_store(host: str):
    """Member 0: a store on a port of ``host`` that the OS picks (listening from now on); returns (store, port)."""
    from torch.distributed import TCPStore

    store = TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    return store, store.port


class BroadcastGroup:
    """One member of the weight group: ``rank`` 0 sends, the others receive."""

    def __init__(self, backend: str, address: str, port: int, rank: int, size: int, store=None, node: str | None = None):
        from torch.distributed import PrefixStore, TCPStore

        if backend not in ("nccl", "gloo"):
            raise ValueError(f"weight broadcast backend {backend!r} must be nccl or gloo")
        self.backend, self.rank, self.size = backend, rank, size
        self.store = store if store is not None else TCPStore(address, port, is_master=False, timeout=TIMEOUT)
        prefixed = PrefixStore("weight_sync", self.store)
        if backend == "gloo":
            from torch.distributed import ProcessGroupGloo

            options = ProcessGroupGloo._Options()
            options._timeout = TIMEOUT
            # bind to this member's node address (Ray's), as the trainer world does, not to the hostname's interface
            options._devices = [ProcessGroupGloo.create_device(hostname=node or address)]
            self.group = ProcessGroupGloo(prefixed, rank, size, options)
            self.device = torch.device("cpu")
        else:
            from torch.distributed import ProcessGroupNCCL

            self.device = torch.device("cuda", torch.cuda.current_device())
            self.group = ProcessGroupNCCL(prefixed, rank, size)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place from member 0 to every member; ``tensor`` must be on this member's device."""
        self.group.broadcast(tensor, 0).wait()
        return tensor

    def send_all(self, named_tensors) -> int:
        """Member 0: broadcast each (name, tensor) in order; returns the number of bytes sent."""
        sent = 0
        for _, tensor in named_tensors:
            self.broadcast(tensor.detach().to(self.device).contiguous())
            sent += tensor.numel() * tensor.element_size()
        return sent

    def receive_all(self, specs: list[tuple[str, tuple, str]]) -> dict[str, torch.Tensor]:
        """Members > 0: receive the tensors ``specs`` announce (name, shape, dtype name), in their order."""
        out = {}
        for name, shape, dtype in specs:
            out[name] = self.broadcast(torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=self.device))
        return out


# -- the trainer side: run in every PolicyTrainer actor (``actor.__ray_call__.remote(fn, ...)``) --------------------
def _full_parameters(trainer):
    """(name, full tensor) of the trainer's model in order, gathering each ZeRO-3 shard (every rank must iterate)."""
    import deepspeed

    stage3 = trainer.config["zero_optimization"]["stage"] == 3
    for name, param in trainer.engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=stage3):
            yield name, param.data


def trainer_specs(trainer) -> list[tuple[str, tuple, str]]:
    """Rank 0: (name, full shape, dtype name) of every parameter, in the order they are sent."""
    return [(name, tuple(getattr(p, "ds_shape", p.shape)), str(p.dtype).removeprefix("torch."))
            for name, p in trainer.engine.module.named_parameters()]


def trainer_open(trainer) -> tuple[str, int]:
    """Rank 0: open the group's store on this node; returns (this node's Ray address, the port)."""
    import ray

    address = ray.util.get_node_ip_address()
    trainer._weight_store, port = open_store(address)
    return address, port


def trainer_join(trainer, backend: str, address: str, port: int, size: int) -> None:
    """Rank 0 becomes member 0 of the group (blocks until every worker joins); other ranks hold none."""
    trainer._weight_group = None
    if trainer.rank == 0:
        trainer._weight_group = BroadcastGroup(backend, address, port, 0, size, store=trainer._weight_store, node=address)


def trainer_send(trainer) -> int:
    """Every rank: walk the parameters (ZeRO-3 gathers need all ranks); rank 0 broadcasts each one."""
    group = getattr(trainer, "_weight_group", None)
    sent = 0
    for name, tensor in _full_parameters(trainer):
        if group is not None:
            sent += group.send_all([(name, tensor)])
    return sent
