"""Criteria that read only the weights (no data, no gradients): magnitude, and the random floor."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from loraprune.ir.groups import ChannelGroup
from loraprune.passes.criteria.scores import GroupScores, group_scores, index_scores, register_criterion

__all__ = ["magnitude", "random"]


def _element_scores(model: nn.Module, groups: list[ChannelGroup], element: Callable[[torch.Tensor], torch.Tensor]):
    state = model.state_dict()
    per_index = {}
    for g in groups:
        for key in list(g.members) + list(g.kv_members):
            if key not in per_index:
                per_index[key] = index_scores(element(state[key[0]].float()), key[1])
    return group_scores(groups, per_index)


@register_criterion("magnitude")
def magnitude(model: nn.Module, groups: list[ChannelGroup], **_: object) -> GroupScores:
    """L2 magnitude of a unit's weights (squared, summed over its rows/columns in every member)."""
    return _element_scores(model, groups, lambda w: w.pow(2))


@register_criterion("random")
def random(model: nn.Module, groups: list[ChannelGroup], seed: int = 0, **_: object) -> GroupScores:
    """Seeded random scores: the floor any criterion must beat."""
    rng = np.random.default_rng(seed)
    out = GroupScores()
    for g in groups:
        out.units[g.name] = rng.random(g.num_units)
        if g.num_kv_units:
            out.kv[g.name] = rng.random(g.num_kv_units)
    return out
