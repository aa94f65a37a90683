"""Channel groups: the units a pruning plan removes together, and what was frozen and why."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ChannelGroup", "FrozenDim", "GROUP_KINDS", "module_of"]

GROUP_KINDS = ("attention", "mlp", "hidden", "channel")


def module_of(names: list[str]) -> str:
    """The innermost module holding every named parameter ("" for the root)."""
    common = os.path.commonprefix([n.split(".")[:-1] for n in names]) if names else []
    return ".".join(common)


@dataclass
class ChannelGroup:
    """Coupled channels of several parameters, split into units that are kept or removed as one.

    `members` maps (state_dict name, dim) to the unit id of each index along that dim (-1 where the index
    belongs to another group or is frozen). For attention under GQA, `kv_members` holds the KV-head units
    and `kv_of_unit` the KV unit each query-head unit reads; removing a KV unit removes its query heads.
    `reduced`: some op takes a statistic over these channels (a LayerNorm over the hidden stream), so removing
    units changes it and the compact model only approximates the masked one; only hidden-stream groups can be.
    `unit_params` / `kv_unit_params`: the parameters each unit (each KV unit) takes with it, what a selection
    that spends a parameter budget across groups (`scope="global"`) weighs units by; None: `unit_size` each.
    """

    name: str
    kind: str
    num_units: int
    unit_size: int
    members: dict[tuple[str, int], np.ndarray]
    order: int = 0
    layer: int | None = None
    kv_members: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    num_kv_units: int = 0
    kv_of_unit: np.ndarray | None = None
    reduced: bool = False
    unit_params: np.ndarray | None = None
    kv_unit_params: np.ndarray | None = None

    @property
    def params(self) -> list[str]:
        return sorted({p for p, _ in self.members} | {p for p, _ in self.kv_members})

    def describe(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "units": self.num_units, "unit_size": self.unit_size,
               "members": [f"{p}[{d}]" for p, d in self.members]}
        if self.num_kv_units:
            out["kv_units"] = self.num_kv_units
            out["kv_members"] = [f"{p}[{d}]" for p, d in self.kv_members]
        return out


@dataclass(frozen=True)
class FrozenDim:
    """Why channels were frozen: the node and op with no rule (or the model boundary) and what it froze."""

    node: str
    op: str
    reason: str
    params: tuple[str, ...] = ()
