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
from loraprune.passes.checkpointing import activation_checkpointing
from loraprune.passes.criteria.scores import GroupScores, group_scores, index_scores, register_criterion

__all__ = ["LoRAScorer", "estimated_gradient", "lora_criterion", "lora_element_importance"]


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
        for module, keys in self.by_module.values():
            element = lora_element_importance(module)
            for key in keys:
                cur = index_scores(element, key[1])
                prev = self.smoothed.get(key)
                self.smoothed[key] = (1 - self.lam) * cur if prev is None else self.lam * prev + (1 - self.lam) * cur
            del element
        self.steps += 1

    def scores(self) -> GroupScores:
        return group_scores(self.groups, self.smoothed)


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
    scorer = LoRAScorer(model, groups, lam)
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

