"""Torch-Pruning 1.6.1 configured as in its LLM example: the outside reference both benchmarks compare with."""

from __future__ import annotations

import torch
from torch import nn


def make_tp_pruner(model: nn.Module, example_ids: torch.Tensor, ratio: float, importance=None):
    """MetaPruner with L2 group magnitude (or the given importance, e.g. `tp.importance.TaylorImportance()`),
    head pruning on, head_dim kept, LM head ignored, round_to 4. Building it is where Torch-Pruning traces
    the model and forms its dependency graph."""
    import torch_pruning as tp

    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = model.config.num_attention_heads
            num_heads[m.k_proj] = model.config.num_key_value_heads
            num_heads[m.v_proj] = model.config.num_key_value_heads
    return tp.pruner.MetaPruner(
        model, example_inputs=example_ids,
        importance=importance or tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False, output_transform=lambda x: x.logits, pruning_ratio=ratio,
        ignored_layers=[model.lm_head], num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=ratio, round_to=4)
