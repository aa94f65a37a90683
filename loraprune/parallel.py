"""Data parallelism on HF Accelerate for every training step of the main job: this process's rows of a step, the
LoRA factor gradients reduced over all processes token-weighted, sums reduced, and who writes.

Every process runs the same steps on the same data, takes its share of each step's rows, and one all-reduce per
step gives every process the gradient of the mean loss over all processes' tokens (even when padding or -100
labels leave unequal token counts, where DDP's plain mean of per-process means would not). So every process
takes the same optimiser step and makes the same pruning decisions without a broadcast. The model stays
unwrapped (no DDP buckets that snapshot `requires_grad`), and base weights never get a `.grad`.
`loraprune.distributed` builds the data-parallel LoRA criterion on the same pieces; `local_rows` is what a process
holds of a weight sharded by rows (`loraprune.sharded`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["DataParallel", "LocalRows", "end_launch", "launched", "local_backward", "local_rows", "reduce_gradients",
           "row_spans", "shard_blocks", "shard_step", "target_tokens"]

Batch = torch.Tensor | dict
Loss = Callable[[nn.Module, Batch], torch.Tensor]


# ----------------------------------------------------------------------------------------------- sharding

def _split_rows(batch: Batch, world: int, rank: int) -> Batch | None:
    """Rank `rank`'s contiguous slice of the rows (torch.tensor_split: sizes differ by at most one);
    None when the slice is empty, so a process with no rows still joins the all-reduce with zeros."""
    if isinstance(batch, dict):
        parts = {k: torch.tensor_split(v, world)[rank] if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        return parts if parts["input_ids"].shape[0] else None
    rows = batch[None] if batch.dim() == 1 else batch
    part = torch.tensor_split(rows, world)[rank]
    return part if part.shape[0] else None


def shard_step(step: Batch | Sequence[Batch], world: int, rank: int) -> list[Batch]:
    """This process's micro-batches of one step: a tensor / dict step is split by rows, a list or tuple of
    micro-batches is dealt round-robin (micro-batch j goes to rank j % world)."""
    if isinstance(step, (list, tuple)):
        return list(step[rank::world])
    part = _split_rows(step, world, rank)
    return [] if part is None else [part]


def target_tokens(batch: Batch) -> int:
    """Number of predicted tokens `causal_lm_loss` averages over (same label rules: -100 and padding skipped),
    the weight of this micro-batch's mean loss in the step's mean loss."""
    if isinstance(batch, dict):
        labels, mask = batch.get("labels"), batch.get("attention_mask")
        if labels is not None:
            return int((labels[:, 1:] != -100).sum())
        if mask is not None:
            return int((mask[:, 1:] != 0).sum())
        ids = batch["input_ids"]
    else:
        ids = batch[None] if batch.dim() == 1 else batch
    return int(ids[:, 1:].numel())


# ----------------------------------------------------------------------------------------------- one step

def reduce_gradients(params: list[nn.Parameter], tokens: int, accelerator: Accelerator,
                      loss_sum: float = 0.0) -> tuple[float, float]:
    """Token-weighted global mean of the factor gradients, written back into `.grad` on every rank.

    Local grads hold n_local·grad(local mean loss) (zeros if this rank had no rows); one all-reduce (sum) of
    [grads..., n_local, loss_sum] on `accelerator.device` gives sum_r n_r·g_r, N and the summed token losses, and
    grad := that / N. Returns (N, the mean loss over all N tokens).
    """
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten()
                      for p in params] + [torch.tensor([float(tokens), loss_sum], device=params[0].device)])
    total = accelerator.reduce(flat.to(accelerator.device), reduction="sum").to(params[0].device)
    n = float(total[-2])
    grads = total[:-2] / max(n, 1.0)
    offset = 0
    for p in params:
        size = p.numel()
        p.grad = grads[offset:offset + size].view_as(p).to(p.dtype)
        offset += size
    return n, float(total[-1]) / max(n, 1.0)


def local_backward(model: nn.Module, micro: list[Batch], loss_fn: Loss) -> tuple[int, float]:
    """Backward of sum over this rank's micro-batches of n_mb·mean loss (= summed token losses). Returns the
    local token count and the local sum of token losses."""
    tokens, loss_sum = 0, 0.0
    for batch in micro:
        n = target_tokens(batch)
        if n == 0:
            continue
        loss = loss_fn(model, batch)
        (loss * n).backward()
        tokens += n
        loss_sum += float(loss.detach()) * n
    return tokens, loss_sum


class DataParallel:
    """The processes of one Accelerate launch, as a training step and an evaluation need them: this rank's rows
    of a step, gradients reduced over all ranks, sums reduced, and who writes."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.communicated_bytes = 0  # by `backward`'s all-reduces, for the benchmark

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def backward(self, model: nn.Module, step: Batch, loss_fn: Loss, params: list[nn.Parameter]) -> float:
        """This rank's share of `step` forward and backward, then `params`' gradients reduced to the gradient
        of the mean loss over every rank's tokens; returns that mean loss (the same on every rank)."""
        tokens, loss_sum = local_backward(model, shard_step(step, self.world, self.rank), loss_fn)
        self.communicated_bytes += 4 * (sum(p.numel() for p in params) + 2)
        return reduce_gradients(params, tokens, self.accelerator, loss_sum)[1]

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of `rows` (possibly empty)."""
        return torch.tensor_split(rows, self.world)[self.rank]

    def sum(self, value: float) -> float:
        """`value` summed over the ranks."""
        total = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(total, reduction="sum")[0])

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()


def launched(device: str = "auto", timeout_s: float = 1800.0) -> DataParallel | None:
    """The processes `accelerate launch` (or torchrun) started, or None for a single process (WORLD_SIZE unset or
    1). Every collective gives up after `timeout_s` seconds, so a rank that died never leaves the others hanging;
    CPU processes talk over gloo, GPU processes over NCCL, each on its own local GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator, InitProcessGroupKwargs

    from loraprune.device import resolve

    cpu = resolve(device).device.type == "cpu"
    return DataParallel(Accelerator(cpu=cpu, kwargs_handlers=[
        InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))]))


def end_launch(code: int) -> int:
    """Destroy this process's process groups while the interpreter is whole; returns `code`, or ends the process
    with it where a group outlives its destruction.

    Why: a gloo worker thread keeps the last work it ran, tensors included, until it runs another or its group is
    destroyed. A group still alive when the interpreter finalises (never destroyed, or destroyed while something
    holds it: FSDP2 does for the life of the process) drops those tensors then, its thread asks for the GIL, and
    the process aborts ("terminate called without an active exception"; about one exit in five of a small gloo
    program, measured). Destroying the groups joins their threads; a group something still holds is left by
    `os._exit` once the streams are flushed (call this after every output is in place)."""
    import gc
    import logging
    import sys
    import weakref

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return code
    groups = [weakref.ref(group) for group in dist.distributed_c10d._world.pg_map]
    dist.destroy_process_group()
    gc.collect()
    if any(group() is not None for group in groups):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


# ----------------------------------------------------------------------------------------------- sharded weights

@dataclass
class LocalRows:
    """What this process holds of a weight: rows [start, start + len(local)) of dim 0 of a weight sharded by rows;
    or, with `whole`, the whole weight on the one process that takes it (None on the others). `gathered`: the
    weight was sharded otherwise and had to be gathered (that one weight, at that moment)."""

    local: torch.Tensor | None
    start: int
    shape: tuple[int, ...]
    whole: bool = False
    gathered: bool = False


def row_spans(rows: int, world: int) -> list[tuple[int, int]]:
    """Each process's rows [start, stop) of a tensor sharded by rows, as torch.chunk (and FSDP2) splits them."""
    chunk = math.ceil(rows / world)
    return [(min(r * chunk, rows), min((r + 1) * chunk, rows)) for r in range(world)]


def local_rows(weight: torch.Tensor, owner: int = 0) -> LocalRows:
    """This process's rows of `weight`. A DTensor sharded by rows over all processes (a 1-D mesh, FSDP2's default
    placement) gives its local shard, split as torch.chunk splits (ceil(n / world) rows per process, FSDP2's
    split). Any other placement is gathered (`full_tensor`) and given whole to process `owner`; so is a plain
    (replicated) tensor, without the gather."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    shape = tuple(weight.shape)
    mine = not dist.is_initialized() or dist.get_rank() == owner
    if not isinstance(weight, DTensor):
        return LocalRows(weight.detach() if mine else None, 0, shape, whole=True)
    mesh = weight.device_mesh
    if mesh.ndim == 1 and mesh.size() == dist.get_world_size() and weight.placements == (Shard(0),):
        local = weight.to_local().detach()
        start, stop = row_spans(shape[0], mesh.size())[mesh.get_local_rank()]
        if local.shape[0] == stop - start:
            return LocalRows(local, start, shape)
    full = weight.full_tensor().detach()
    return LocalRows(full if mine else None, 0, shape, whole=True, gathered=True)


def shard_blocks(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 over all processes on `device`'s type: each element of every nn.ModuleList is a unit, the root the
    last. Base weights are frozen first (only LoRA factors, added later, are trained)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
