"""First-order Taylor with full weight gradients (LLM-Pruner's |W ⊙ dL/dW|): the memory-hungry baseline."""

from __future__ import annotations

import re

import torch
from torch import nn

from loraprune.ir.groups import ChannelGroup
from loraprune.lora.adapters import base_weight_names, merged_weight
from loraprune.lora.training import GradientStats, as_batches, causal_lm_loss
from loraprune.passes.checkpointing import activation_checkpointing
from loraprune.passes.criteria.scores import GroupScores, group_scores, index_scores, register_criterion

__all__ = ["taylor_criterion"]


@register_criterion("taylor")
def taylor_criterion(model: nn.Module, groups: list[ChannelGroup], *, batches=None, seed: int = 0,
                     batch_size: int = 4, stats: GradientStats | None = None, checkpointing: bool = False,
                     **_: object) -> GroupScores:
    """First-order Taylor with full weight gradients (LLM-Pruner style): |W ⊙ dL/dW|, gradients summed over
    `batches`. Every group member parameter gets a gradient: the memory-hungry baseline. On a PEFT model the
    base weights of LoRA layers are scored with their merged value and LoRA factors are skipped.
    `checkpointing` as in `lora_criterion`."""
    if batches is None:
        raise ValueError("criterion 'taylor' needs calibration batches: pass batches=[token ids [b, seq], ...]")
    batches = as_batches(batches, batch_size)
    state = model.state_dict(keep_vars=True)
    names = sorted({p for g in groups for p, _ in list(g.members) + list(g.kv_members)
                    if not re.search(r"\.lora_[A-Za-z_]+\.", f".{p}.")})
    targets = {n: state[n] for n in names if isinstance(state.get(n), nn.Parameter)}
    merged = base_weight_names(model)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in targets.values():
            p.requires_grad_(True)
        model.eval()
        with torch.random.fork_rng(devices=[]), activation_checkpointing(model, checkpointing):
            torch.manual_seed(seed)
            for batch in batches:
                causal_lm_loss(model, batch).backward()  # gradients accumulate: the sum over batches
                if stats is not None:
                    stats.record(model)
        per_index = {}
        for g in groups:
            for key in list(g.members) + list(g.kv_members):
                p = targets.get(key[0])
                if p is None or p.grad is None or key in per_index:
                    continue
                w = merged_weight(merged[key[0]]) if key[0] in merged else p.detach().float()
                per_index[key] = index_scores((w * p.grad.float()).abs(), key[1])
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
        model.train(was_training)
    return group_scores(groups, per_index)

