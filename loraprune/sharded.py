"""Pruning a model whose weights do not fit one device: sharded by rows over the processes of a launch, scored where
they lie, and written by the processes that hold them.

Sharding is torch's FSDP2 (`fully_shard`, what Accelerate's FSDP2 plugin drives; the plugin itself needs GPUs, so
it is called directly here, on the process group Accelerate set up): every repeated block (each element of the
model's `nn.ModuleList`s) is one unit, the root another, and every parameter is split by rows (dim 0) over the
processes. The model is built on the `meta` device and each process reads only its rows of every tensor from the
safetensors files (`get_slice`), so no process ever loads the whole model. Forward and backward gather one
block's weights at a time, as FSDP does; nothing else gathers a weight.

LoRA factors are added after sharding and stay whole on every process (r·(in + out) per layer, small): their
gradients are all-reduced token-weighted, as in every data-parallel step (`loraprune.parallel`). The scores need
no gather (`ShardedLoRAScorer`): a row's |(W0 + s·BA) ⊙ G| needs only that row of W0 and the factors, a column
score is a sum over rows, and one all-reduce of the score vectors per step gives every process the unsharded
scores. This holds for any 2-D weight sharded by rows over all processes (FSDP2's default placement), in either
layout (nn.Linear, and Conv1D whose dim 0 is the input). For any other placement (a 2-D mesh, a custom
`shard_placement_fn`) that one weight is gathered for its score and dropped, one layer at a time.

The rewrite: every process slices the rows it holds by the plan; each compact tensor is assembled on one process
(tensors dealt to processes by size) and written by it into one file of a sharded safetensors checkpoint with an
index (`model.safetensors.index.json`), which `load_pretrained` and transformers read. The output folder must be
on a file system every process sees; it appears whole or not at all.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from loraprune.ir.plan import PrunePlan
from loraprune.parallel import DataParallel, local_rows, row_spans, shard_blocks

if TYPE_CHECKING:
    from loraprune.config import LoRAPruneConfig

__all__ = ["ShardedResult", "load_sharded", "meta_model", "prune_sharded", "save_sharded"]


def load_sharded(folder: str | os.PathLike, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """The Hugging Face model in `folder` (config.json and safetensors, one file or an index), sharded over the
    processes of the launch: built on `meta`, sharded, then each process reads only its rows of every tensor."""
    from safetensors import safe_open
    from transformers import AutoConfig

    folder = Path(folder)
    files = _weight_files(folder)
    model = meta_model(AutoConfig.from_pretrained(folder), dtype)
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # real: made by the model's constructor
    shard_blocks(model, device)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
        names: dict[int, list[str]] = {}  # tied names share one parameter
        params = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
            params[id(p)] = p
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                stored = set(f.keys())
                for key, p in list(params.items()):
                    name = next((n for n in names[key] if n in stored), None)
                    if name is None:
                        continue
                    rows = local_rows(p)
                    if rows.whole:
                        raise RuntimeError(f"internal error: {name} is not sharded by rows")
                    rows.local.copy_(f.get_slice(name)[rows.start:rows.start + rows.local.shape[0]])
                    del params[key]
        if params:
            raise ValueError(f"{folder} has no tensor for {names[next(iter(params))][0]}")
    return model.eval()


def meta_model(config: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """The architecture of the HF `config` with its parameters on `meta` (buffers real) and tied names tied, as
    from_pretrained leaves them."""
    from loraprune.models.save import _skeleton

    architecture = (getattr(config, "architectures", None) or [None])[0]
    kind = dtype or getattr(config, "dtype", None) or torch.float32
    model = _skeleton(config.to_dict(), {"architecture": architecture, "dtype": str(kind).removeprefix("torch.")})
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _weight_files(folder: Path) -> list[Path]:
    from loraprune.models.save import INDEX_FILE

    index = folder / INDEX_FILE
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {folder}: --shard reads a Hugging Face folder "
                                "(config.json and *.safetensors) one slice per process")
    return files


# ----------------------------------------------------------------------------------------------- the rewrite

def _owners(sizes: list[int], world: int) -> list[int]:
    """Deal tensors to processes, largest first to the least loaded (the same on every process)."""
    load, owner = [0] * world, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owner[i] = min(range(world), key=lambda r: (load[r], r))
        load[owner[i]] += sizes[i]
    return owner


def _kept_rows(kept: list[int] | None, n: int, start: int, stop: int) -> tuple[list[int], list[int]]:
    """(positions in the compact tensor, local row ids) of the kept rows a process holding rows [start, stop) has."""
    rows = range(n) if kept is None else kept
    pairs = [(j, k - start) for j, k in enumerate(rows) if start <= k < stop]
    return [j for j, _ in pairs], [i for _, i in pairs]


def _compact_piece(tensor: torch.Tensor, kept: dict[int, list[int]], rows: list[int]) -> torch.Tensor:
    """The local rows `rows` of `tensor`, its other dims cut to their kept indices."""
    out = tensor[rows]
    for dim, idx in kept.items():
        if dim != 0:
            out = out.index_select(dim, torch.as_tensor(idx, device=out.device))
    return out


def _unique_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Persistent tensors in state-dict order, each shared (tied) tensor once, under its first name."""
    seen, out = set(), []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor is None or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out.append((name, tensor))
    return out


def save_sharded(model: nn.Module, plan: PrunePlan, out_dir: str | os.PathLike, parallel: DataParallel, *,
                 dense_config: Any, tokenizer: Any = None, force: bool = False) -> Path | None:
    """Write the compact model of `plan` from a row-sharded `model`, no process holding the whole of it. Call on
    every process; the first one stages and moves the folder (returned there, None elsewhere)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from loraprune.models.save import INDEX_FILE, PLAN_FILE, FolderMetadata, compact_skeleton
    from loraprune.outputs import check_target, staged_folder

    state = _unique_state(model)
    dtype = next(t.dtype for _, t in state if t.is_floating_point())
    dtype_name = str(dtype).removeprefix("torch.")
    shapes = [plan.compact_shape(n) if n in plan.shapes else list(t.shape) for n, t in state]
    owner = _owners([math.prod(s) for s in shapes], parallel.world)
    holders = sorted(set(owner))
    files = {r: f"model-{i + 1:05d}-of-{len(holders):05d}.safetensors" for i, r in enumerate(holders)}

    def write(folder: Path) -> dict[str, str]:
        mine = {}
        for (name, tensor), shape, r in zip(state, shapes, owner, strict=True):
            kept = plan.kept.get(name, {})
            compact = _assemble(tensor, kept, shape, r, parallel)
            if compact is not None:
                mine[name] = compact.cpu().contiguous()
        if mine:
            save_file(mine, str(folder / files[parallel.rank]), metadata={"format": "pt"})
        return {name: files[r] for (name, _), r in zip(state, owner, strict=True)}

    if not parallel.is_main:
        folder = [None]
        dist.broadcast_object_list(folder, src=0)
        if folder[0] is not None:
            write(Path(folder[0]))
            parallel.wait()  # every file written
        parallel.wait()  # the folder in place (or the first process failed)
        return None
    try:  # everything that can refuse, before the others are told where to write
        check_target(Path(out_dir), force, PLAN_FILE)
        skeleton = compact_skeleton(dense_config, plan, dtype_name)
        metadata = FolderMetadata.of(skeleton, plan, dense_config, dtype_name)
    except BaseException:
        dist.broadcast_object_list([None], src=0)  # the others skip writing, and wait
        parallel.wait()
        raise
    with staged_folder(Path(out_dir), force, PLAN_FILE) as tmp:
        dist.broadcast_object_list([str(tmp)], src=0)
        weight_map = write(tmp)
        parallel.wait()  # every file written
        total = sum(math.prod(s) for s in shapes) * dtype.itemsize
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=1) + "\n")
        metadata.write(tmp, skeleton, tokenizer)
    parallel.wait()
    return Path(out_dir)


def _assemble(tensor: torch.Tensor, kept: dict[int, list[int]], shape: list[int], owner: int,
              parallel: DataParallel) -> torch.Tensor | None:
    """The compact `tensor` on process `owner` (None elsewhere), from every process's kept local rows: one
    gather of pieces padded to the same row count."""
    import torch.distributed as dist

    rows = local_rows(tensor, owner)
    if rows.whole:  # replicated, or gathered for want of a row split: the owner cuts it
        if rows.local is None:
            return None
        return _compact_piece(rows.local, kept, list(kept.get(0, range(rows.shape[0])))) if rows.shape else (
            rows.local.clone())
    n = rows.shape[0]
    placed = [_kept_rows(kept.get(0), n, a, b) for a, b in row_spans(n, parallel.world)]
    mine = _compact_piece(rows.local, kept, placed[parallel.rank][1])
    most = max(len(p) for p, _ in placed)
    padded = mine.new_zeros((most, *mine.shape[1:]))
    padded[:len(mine)] = mine
    pieces = [torch.empty_like(padded) for _ in range(parallel.world)] if parallel.rank == owner else None
    dist.gather(padded, pieces, dst=owner)
    if parallel.rank != owner:
        return None
    out = mine.new_empty(shape)
    for (positions, _), piece in zip(placed, pieces, strict=True):
        out[positions] = piece[:len(positions)]
    return out


# ----------------------------------------------------------------------------------------------- the job

@dataclass
class ShardedResult:
    """The plan every process computed, and what it removed."""

    plan: PrunePlan
    params_before: int
    params_after: int
    weight_bytes: int  # the dense model's
    weight_bytes_per_process: int  # the most any process held (its shard)
    kept: dict[str, np.ndarray] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"params_before": self.params_before, "params_after": self.params_after,
                "params_removed_fraction": 1 - self.params_after / max(self.params_before, 1),
                "weight_bytes": self.weight_bytes, "weight_bytes_per_process": self.weight_bytes_per_process}


def prune_sharded(folder: str | os.PathLike, config: LoRAPruneConfig, batches: list, out_dir: str | os.PathLike,
                  parallel: DataParallel, *, tokenizer: Any = None, dtype: torch.dtype | None = None,
                  force: bool = False) -> ShardedResult:
    """LoRAPrune's criterion scored once over `batches` (each step's rows split over the processes) on the model
    in `folder` sharded by rows, then selected, rewritten and saved to `out_dir` without any process holding the
    whole model. The groups come from tracing the model on `meta`."""
    import torch.distributed as dist
    from transformers import AutoConfig

    from loraprune.distributed import accelerated_lora_scores
    from loraprune.passes.dependency import analyze
    from loraprune.passes.rewrite import make_plan
    from loraprune.passes.select import select_units

    if config.batch_size < parallel.world:
        raise ValueError(f"each step's rows are split over the {parallel.world} processes, and every process must "
                         f"take part in every sharded forward: --batch-size must be at least {parallel.world}")
    if config.init != "standard":
        raise ValueError(f"LoRA init {config.init!r} needs each whole base weight (an SVD); sharded weights are "
                         "scored with init='standard'")
    if config.steps:
        raise ValueError("--shard scores once (--steps 0): LoRAPrune's fine-tuning schedule does not run on sharded "
                         "weights; fine-tune the compact model afterwards")
    config = config.resolved(token_ids=True)  # a causal LM's folder: the language-model defaults
    dense_config = AutoConfig.from_pretrained(folder)
    meta = meta_model(dense_config).to("meta")
    example = batches[0][:1, :8].to("meta")
    analysis = analyze(meta, example)
    model = load_sharded(folder, parallel.accelerator.device, dtype)
    held = torch.tensor([sum(p.to_local().numel() * p.element_size() for p in model.parameters())],
                        dtype=torch.float64, device=parallel.accelerator.device)
    dist.all_reduce(held, op=dist.ReduceOp.MAX)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    scores = accelerated_lora_scores(model, analysis.groups, batches, accelerator=parallel.accelerator,
                                     lam=config.lam, seed=config.seed, r=config.r, alpha=config.alpha,
                                     batch_size=config.batch_size)
    kept = select_units(analysis.groups, scores.units, config.selection(), scores.kv)
    plan = make_plan(analysis.groups, kept, analysis.param_shapes, analysis.program.aliases,
                     meta={"criterion": "lora", "select": config.selection().to_dict(), "config": config.to_dict(),
                           "sharded": parallel.world})
    save_sharded(model, plan, out_dir, parallel, dense_config=dense_config, tokenizer=tokenizer, force=force)
    before = sum(p.numel() for p in meta.parameters())
    after = sum(math.prod(plan.compact_shape(n)) if n in plan.kept else p.numel() for n, p in meta.named_parameters())
    return ShardedResult(plan, before, after, weight_bytes, int(held[0]), kept)
