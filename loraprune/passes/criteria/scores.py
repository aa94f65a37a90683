"""What every criterion returns (a score per unit of every group), the table criteria register in, and the
scores written onto the IR.

Every criterion reduces to an element-importance tensor per parameter; `group_scores` sums it into units,
normalising each member (parameter, dim) so that a big matrix does not outvote a small one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from loraprune.ir.groups import ChannelGroup

__all__ = ["CRITERIA", "GroupScores", "annotate_scores", "group_scores", "index_scores", "register_criterion",
           "scores_from_meta"]


@dataclass
class GroupScores:
    """Scores per unit (and per KV unit for GQA attention), keyed by group name; `input_means` (FLAP's) holds
    the mean input per channel of layers whose inputs are members, for its bias compensation."""

    units: dict[str, np.ndarray] = field(default_factory=dict)
    kv: dict[str, np.ndarray] = field(default_factory=dict)
    input_means: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)


Criterion = Callable[..., GroupScores]
CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str) -> Callable[[Criterion], Criterion]:
    def wrap(fn: Criterion) -> Criterion:
        if name in CRITERIA:
            raise ValueError(f"duplicate criterion {name}")
        CRITERIA[name] = fn
        return fn

    return wrap


def index_scores(element: torch.Tensor, dim: int) -> np.ndarray:
    """Sum of an element-importance tensor over every dim but `dim`."""
    dims = [d for d in range(element.dim()) if d != dim]
    reduced = element.sum(dim=dims) if dims else element
    return reduced.detach().double().cpu().numpy()


def _units(members: dict[tuple[str, int], np.ndarray], n: int, per_index: dict[tuple[str, int], np.ndarray]):
    total = np.zeros(n)
    for key, ids in members.items():
        if key not in per_index:
            continue
        s = per_index[key]
        inside = ids >= 0
        norm = s[inside].sum()
        if norm > 0:
            total += np.bincount(ids[inside], s[inside] / norm, minlength=n)
    return total


def group_scores(groups: list[ChannelGroup], per_index: dict[tuple[str, int], np.ndarray]) -> GroupScores:
    out = GroupScores()
    for g in groups:
        out.units[g.name] = _units(g.members, g.num_units, per_index)
        if g.num_kv_units:
            out.kv[g.name] = _units(g.kv_members, g.num_kv_units, per_index)
    return out


SCORES_META = "loraprune_importance"


def annotate_scores(program, groups: list[ChannelGroup], scores: GroupScores, criterion: str) -> None:
    """Write each group's unit scores onto the IR: the placeholder node of every member parameter gets
    `meta["loraprune_importance"][dim] = {"group", "criterion", "unit_scores"}` (scores of the group's units,
    the same array for every member), so later passes and `inspect` read them from the graph."""
    node_of = {param: node for node in program.graph.nodes if node.op == "placeholder"
               for param in [program.param_of_input.get(node.name)] if param is not None}
    for g in groups:
        entry = {"group": g.name, "criterion": criterion, "unit_scores": np.asarray(scores.units[g.name])}
        for param, dim in g.members:
            node = node_of.get(param)
            if node is not None:
                node.meta.setdefault(SCORES_META, {})[dim] = entry


def scores_from_meta(program) -> dict[str, dict]:
    """Group name -> {"criterion", "unit_scores"} as `annotate_scores` left them on the graph."""
    out: dict[str, dict] = {}
    for node in program.graph.nodes:
        for entry in node.meta.get(SCORES_META, {}).values():
            out[entry["group"]] = {"criterion": entry["criterion"], "unit_scores": entry["unit_scores"]}
    return out
