"""PrunePlan: which indices of which parameter dims survive, saved as JSON so it can be re-applied."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PlanError", "PrunePlan"]


class PlanError(ValueError):
    """A plan that does not fit the model it is applied to."""


@dataclass
class PrunePlan:
    """Kept indices per dense parameter name and dim, plus the per-module head counts the rewrite sets.

    `attention` maps an attention module name to its new {"heads", "kv_heads", "head_dim"}; `shapes` holds
    the dense shapes, so applying the plan to a different architecture fails loudly instead of silently.
    """

    kept: dict[str, dict[int, list[int]]]
    shapes: dict[str, list[int]]
    attention: dict[str, dict[str, int]] = field(default_factory=dict)
    group_of: dict[str, list[str]] = field(default_factory=dict)
    sizes: dict[str, dict] = field(default_factory=dict)  # group -> {"kind", "units", "kept", "unit_size"}
    meta: dict = field(default_factory=dict)

    def compact_shape(self, name: str) -> list[int]:
        shape = list(self.shapes[name])
        for dim, idx in self.kept.get(name, {}).items():
            shape[int(dim)] = len(idx)
        return shape

    def to_dict(self) -> dict:
        return {"version": 1, "kept": {p: {str(d): list(map(int, i)) for d, i in dims.items()}
                                       for p, dims in self.kept.items()},
                "shapes": self.shapes, "attention": self.attention, "group_of": self.group_of, "sizes": self.sizes,
                "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict) -> PrunePlan:
        if data.get("version") != 1 or "kept" not in data or "shapes" not in data:
            raise PlanError("not a loraprune plan (missing version/kept/shapes)")
        kept = {p: {int(d): list(i) for d, i in dims.items()} for p, dims in data["kept"].items()}
        return cls(kept, {p: list(s) for p, s in data["shapes"].items()}, data.get("attention", {}),
                   data.get("group_of", {}), data.get("sizes", {}), data.get("meta", {}))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PrunePlan:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise PlanError(f"cannot read plan {path}: {err}") from err
        return cls.from_dict(data)
