"""LoRAPrune's criterion (arXiv 2305.18403): importance from the LoRA factors and their gradients only.

Base weights W0 stay frozen; only the LoRA factors A [r, in] and B [out, r] (scale s) get gradients. The
gradient of the merged weight is estimated from one virtual SGD step of size 1 on the factors:
s·(B - dB)(A - dA) - s·BA = -s·(dB·A + B·dA - dB·dA), so G = s·(dB·A + B·dA - dB·dA), and an element's
importance is |(W0 + s·BA) ⊙ G|. No gradient of W0 is ever stored: that is the memory win over `taylor`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from loraprune.ir.groups import ChannelGroup
from loraprune.lora.adapters import add_lora, base_weight_names, factors, lora_layers, lora_params, merged_weight
from loraprune.lora.training import GradientStats, as_batches, causal_lm_loss
from loraprune.parallel import LocalRows, local_rows
from loraprune.passes.checkpointing import activation_checkpointing
from loraprune.passes.criteria.scores import GroupScores, group_scores, index_scores, register_criterion

__all__ = ["LoRAScorer", "ShardedLoRAScorer", "estimated_gradient", "is_sharded", "lora_criterion",
           "lora_element_importance"]


def estimated_gradient(module: nn.Module) -> torch.Tensor:
    """G = s·(dB·A + B·dA - dB·dA) in the base weight's layout (transposed for fan_in_fan_out / Conv1D)."""
    a, b, s = factors(module)
    da = a.grad if a.grad is not None else torch.zeros_like(a)
    db = b.grad if b.grad is not None else torch.zeros_like(b)
    a, b, da, db = (t.detach().float() for t in (a, b, da, db))
    g = db @ a  # then in place: one weight-sized tensor, however large the layer
    g.addmm_(b, da).addmm_(db, da, alpha=-1.0).mul_(s)
    return g.T if module.fan_in_fan_out else g


def lora_element_importance(module: nn.Module) -> torch.Tensor:
    """|(W0 + s·BA) ⊙ G| per element of the base weight, computed in place to keep the scoring's peak low."""
    return merged_weight(module).mul_(estimated_gradient(module)).abs_()


class LoRAScorer:
    """Per-index LoRA importances of every group member that is a LoRA base weight, smoothed over steps:
    I_t = lam·I_{t-1} + (1 - lam)·Î_t (I_0 = 0; the common factor cancels in the per-member normalisation).
    Members without LoRA (norm weights, biases, LoRA factors themselves) contribute nothing."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], lam: float = 0.9) -> None:
        if not 0.0 <= lam < 1.0:
            raise ValueError(f"lam must be in [0, 1), got {lam!r}")
        self.groups, self.lam = groups, lam
        names = base_weight_names(model)
        # member keys by LoRA layer: one weight-sized importance tensor alive at a time, not one per layer
        self.by_module: dict[int, tuple[nn.Module, list[tuple[str, int]]]] = {}
        for g in groups:
            for key in dict.fromkeys(list(g.members) + list(g.kv_members)):
                module = names.get(key[0])
                if module is not None and key not in self.by_module.setdefault(id(module), (module, []))[1]:
                    self.by_module[id(module)][1].append(key)
        if not self.by_module:
            raise ValueError("no group member is the base weight of a LoRA layer: add LoRA adapters to the "
                             "projections (add_lora) and analyse the same model")
        self.smoothed: dict[tuple[str, int], np.ndarray] = {}
        self.steps = 0

    def update(self) -> None:
        """Read the factor gradients of the last backward pass into the smoothed estimate."""
        for key, cur in self.current().items():
            prev = self.smoothed.get(key)
            self.smoothed[key] = (1 - self.lam) * cur if prev is None else self.lam * prev + (1 - self.lam) * cur
        self.steps += 1

    def current(self) -> dict[tuple[str, int], np.ndarray]:
        """This step's per-index importance of every member key."""
        out = {}
        for module, keys in self.by_module.values():
            element = lora_element_importance(module)
            for key in keys:
                out[key] = index_scores(element, key[1])
            del element
        return out

    def scores(self) -> GroupScores:
        return group_scores(self.groups, self.smoothed)


class ShardedLoRAScorer(LoRAScorer):
    """LoRAScorer's scores when the base weights are sharded by rows over processes (FSDP2), with no weight gathered.

    A row's importance |(W0 + s·BA) ⊙ G| needs only that row of W0 and the (whole, small) factors and their
    gradients, so each process scores the rows it holds: a row score is local, a column score is a sum over
    rows. Every member's score vector (zeros outside the local rows) goes into one all-reduce (sum) per step, so
    every process ends with the unsharded scores and makes the same decisions. See `parallel.local_rows` for the
    placements this holds for and the one-weight-at-a-time gather elsewhere.
    """

    def current(self) -> dict[tuple[str, int], np.ndarray]:
        import torch.distributed as dist

        keys, vectors = [], []
        for module, members in self.by_module.values():
            rows = local_rows(module.get_base_layer().weight)
            element = None if rows.local is None else _local_importance(module, rows)
            for key in members:
                dim = key[1]
                vector = torch.zeros(rows.shape[dim], dtype=torch.float64,
                                     device=module.get_base_layer().weight.device)
                if element is not None:
                    part = element.sum(dim=1 - dim).double()
                    if dim == 0:
                        vector[rows.start:rows.start + len(part)] = part
                    else:
                        vector += part
                keys.append(key)
                vectors.append(vector)
            del element
        flat = torch.cat(vectors)
        dist.all_reduce(flat)
        return {key: part.cpu().numpy() for key, part in zip(keys, flat.split([len(v) for v in vectors]), strict=True)}


def _local_importance(module: nn.Module, rows: LocalRows) -> torch.Tensor:
    """|(W0 + s·BA) ⊙ G| on the local rows of the base weight (its stored layout: transposed for fan_in_fan_out),
    from the local rows of W0 and the whole factors: the rows of BA are rows of B times A (of A^T times B^T)."""
    a, b, s = factors(module)
    da = a.grad if a.grad is not None else torch.zeros_like(a)
    db = b.grad if b.grad is not None else torch.zeros_like(b)
    a, b, da, db = (t.detach().float() for t in (a, b, da, db))
    left, right, dleft, dright = (a.T, b.T, da.T, db.T) if module.fan_in_fan_out else (b, a, db, da)
    span = slice(rows.start, rows.start + rows.local.shape[0])
    left, dleft = left[span], dleft[span]
    g = dleft @ right
    g.addmm_(left, dright).addmm_(dleft, dright, alpha=-1.0).mul_(s)
    merged = (left @ right).mul_(s).add_(rows.local.float())
    return merged.mul_(g).abs_()


def is_sharded(model: nn.Module) -> bool:
    """Are any of the model's parameters distributed tensors (sharded by FSDP2)?"""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def plain_backward(model: nn.Module, batch) -> None:
    causal_lm_loss(model, batch).backward()


@register_criterion("lora")
def lora_criterion(model: nn.Module, groups: list[ChannelGroup], *, batches=None, seed: int = 0, lam: float = 0.9,
                   batch_size: int = 4, stats: GradientStats | None = None, r: int = 8, alpha: int = 16,
                   backward: Callable[[nn.Module, object], None] | None = None, checkpointing: bool = False,
                   init: str = "standard",
                   **_: object) -> GroupScores:
    """LoRA-guided importance from the factor gradients of `batches` (no optimiser step, eval mode).

    On a model without LoRA layers, adapters (`init`, see `LORA_INITS`) are added for the scoring and removed
    again; with an init that rewrites the base weights a copy is scored, so the input model is never changed.
    Groups may be analysed on the PEFT model or the plain model. Base weights get no `.grad`.
    `backward(model, batch)` leaves the factor gradients of one step in `.grad` (default: the batch's
    causal-LM loss; `loraprune.distributed` passes a data-parallel one). `checkpointing` recomputes each
    decoder layer in the backward pass instead of keeping its activations (less memory, one more forward).
    """
    if batches is None:
        raise ValueError("criterion 'lora' needs calibration batches: pass batches=[token ids [b, seq], ...]")
    batches = as_batches(batches, batch_size)
    added = not lora_layers(model)
    copied = added and init != "standard"
    if copied and is_sharded(model):
        raise ValueError(f"LoRA init {init!r} needs each whole base weight (an SVD); sharded base weights are scored "
                         "with init='standard'")
    flags = {id(p): p.requires_grad for p in model.parameters()}  # add_lora freezes the base weights
    work = add_lora(copy.deepcopy(model) if copied else model, r=r, alpha=alpha, seed=seed, dropout=0.0,
                    init=init) if added else model
    try:
        with activation_checkpointing(work, checkpointing):
            return _score(work, groups, batches, lam, stats, seed, backward or plain_backward)
    finally:
        if added and not copied:
            work.unload()
            for p in model.parameters():
                p.requires_grad_(flags.get(id(p), p.requires_grad))


def _score(model, groups, batches, lam, stats, seed, backward) -> GroupScores:
    layers = lora_layers(model)
    params = lora_params(layers)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    scorer = (ShardedLoRAScorer if is_sharded(model) else LoRAScorer)(model, groups, lam)
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in params:
            p.requires_grad_(True)
        model.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for batch in batches:
                for p in params:
                    p.grad = None
                backward(model, batch)
                if stats is not None:
                    stats.record(model)
                scorer.update()
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
        model.train(was_training)
    return scorer.scores()

