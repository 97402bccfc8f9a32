"""torchrun support: process-group setup, model wrapping (FSDP2 on GPU, DDP elsewhere), small collectives.

Run any algorithm on N processes with ``torchrun --nproc_per_node N -m fastalign.cli train <algo> ...``. Each
process takes its slice of every global batch (batching.Sampler), losses are normalized by global counts
(loop.TrainLoop), so N processes compute what one process computes on the same global batch.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fastalign.train.models import HeadForward, unwrap

# how long a collective may wait for the other processes (a rank building the tiny model, saving a checkpoint)
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Initialize the process group when launched by torchrun (``WORLD_SIZE`` > 1): NCCL on CUDA, gloo on CPU.
    ``device``: auto | cpu | cuda | cuda:N."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                timeout=PROCESS_GROUP_TIMEOUT)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _layer_classes(model: nn.Module) -> set[str]:
    return set(getattr(unwrap(model), "_no_split_modules", None) or [])


def wrap(model: nn.Module, info: DistInfo, strategy: str = "auto") -> nn.Module:
    """Wrap for data-parallel training; a single process gets the model back unchanged.

    strategy: auto (FSDP2 on CUDA, DDP on CPU) | fsdp | ddp. Under FSDP2 every transformer block (the model's
    ``_no_split_modules``) is sharded, then the root, which keeps embeddings and the LM head together so a
    tied head stays tied. The wrapped module's forward is :class:`HeadForward`'s ``(ids, mask, fn)``.
    """
    if not info.enabled:
        return model
    if strategy == "auto":
        strategy = "fsdp" if info.device.type == "cuda" else "ddp"
    root = HeadForward(model)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(root, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        classes = _layer_classes(model)
        for module in model.modules():
            if type(module).__name__ in classes:
                fully_shard(module)
        fully_shard(root)
        return root
    raise ValueError(f"strategy must be auto, fsdp or ddp; got {strategy!r}")


def is_fsdp(model: nn.Module) -> bool:
    return type(model).__name__.startswith("FSDP")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (a no-op copy for one process). Runs on the gloo/NCCL device of the data."""
    out = values.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def sum_over_processes(values: list[float], device: torch.device | None = None) -> list[float]:
    """Each value summed over processes, in one float64 all-reduce on ``device`` (the values back for one process)."""
    return all_reduce_sum(torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)).tolist()


def mean_over_processes(stats: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average metrics over processes (each holds an equal share of the batch), so a logged value is the global
    batch's; one small all-reduce."""
    if not info.enabled:
        return stats
    sums = sum_over_processes(list(stats.values()), info.device)
    return {k: v / info.world_size for k, v in zip(stats, sums)}


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj
