"""The device of each process, and data parallelism over the processes of one torchrun job
(`torchrun --nproc_per_node=N -m fitnets_cli ...`).

Every rank holds the whole dataset on its device and trains on its share of each global batch; gradients,
metrics and the stop signal are reduced across ranks, and only rank 0 writes files. Outside torchrun (or
with one process) every function here is a no-op.
"""

import atexit
import os

import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from fitnets_cli.config.errors import ConfigError


def world() -> int:
    """How many processes train together."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return world() > 1


def is_main() -> bool:
    """The process that prints and writes files."""
    return rank() == 0


def init() -> None:
    """Join torchrun's process group: gloo carries CPU tensors, nccl CUDA ones where there are GPUs."""
    if launched() and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(dist.destroy_process_group)


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This rank's share of a batch of indices."""
    return idx[rank()::world()] if launched() else idx


def sum_(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the ranks, in place."""
    if launched():
        dist.all_reduce(t)
    return t


def same_order(order: torch.Tensor) -> torch.Tensor:
    """Rank 0's shuffle, so that the shards of every batch partition it."""
    if launched():
        dist.broadcast(order, 0)
    return order


def reduce_gradients(params, weight: float) -> None:
    """Replace each rank's gradients by the global batch's: the sum over ranks of `weight` (this rank's share
    of the batch) times its own mean gradient. One all-reduce of all gradients flattened together."""
    if not launched():
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads]) * weight
    dist.all_reduce(flat)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def anyone(flag: bool) -> bool:
    """True on every rank when `flag` is true on any: a CPU all-reduce, so the GPU stream never waits."""
    if not launched():
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    """Wait until every rank gets here (so that files rank 0 just wrote are there for the others)."""
    if launched():
        dist.barrier()


def share(obj):
    """Rank 0's `obj` on every rank."""
    if not launched():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def pick_device(name: str) -> torch.device:
    """auto: CUDA when available, else CPU. `cuda` picks this process's GPU (see gpu_index)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        job = HydraConfig.get().job.num if HydraConfig.initialized() and \
            HydraConfig.get().mode == RunMode.MULTIRUN else None
        return torch.device("cuda", gpu_index(torch.cuda.device_count(), job))
    return torch.device("cpu" if name == "auto" else name)


def gpu_index(gpus: int, job: int | None) -> int:
    """The GPU of this process: its torchrun local rank; in a multirun, its job number modulo the GPUs,
    so the jobs of a parallel launcher (hydra/launcher=joblib) spread over them; else the first."""
    if launched():
        return int(os.environ.get("LOCAL_RANK", "0"))
    return job % gpus if job is not None else 0
