"""Multi-process data parallelism with ``torch.distributed`` (launched by torchrun).

``torchrun --nproc_per_node K -m certonnx finetune ...`` gives the same result as one process
with the same global batch: every rank takes its shard of each global batch (same shuffled
order everywhere, from the shared seed), scales its mean loss by ``n_rank / n_global`` and the
gradients are summed with all-reduce, so the update is the gradient of the global-batch mean.
Only rank 0 writes checkpoints, logs and exports. Backend: nccl on CUDA, gloo on CPU.

Exact equivalence holds for per-sample losses; batch-level statistics (BatchNorm in training
mode, the Shi et al. regularisers) are computed per shard, as in every data-parallel trainer.
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun; returns ``(rank, world_size)``."""
    world = env_world_size()
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def shard(idx: torch.Tensor, rank_: int, world: int) -> torch.Tensor:
    """This rank's contiguous part of a global batch of indices (may be empty for tiny batches)."""
    return idx.tensor_split(world)[rank_]


def broadcast_module(module: torch.nn.Module) -> None:
    """Start every rank from rank 0's weights and buffers."""
    if not active():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over ranks (each rank's loss is already scaled by its share of the batch)."""
    if not active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    off = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[off:off + n].view_as(p).clone()
        off += n


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if active():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier() -> None:
    if active():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group while the interpreter is fully alive.

    ``destroy_process_group`` drops the Python references, but gloo's C++ work objects can
    still hold tensors; if they are freed during interpreter finalization they take the GIL
    from a dying interpreter and the process aborts ("terminate called without an active
    exception", seen on a loaded 2-core machine on rank 1 after the run had finished). A
    collection right after the destroy frees them here instead.
    """
    if active():
        dist.destroy_process_group()
        gc.collect()
