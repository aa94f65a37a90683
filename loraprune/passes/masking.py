"""Masks of LoRAPrune's schedule that can be switched off: the dense model stays in memory under the masked one.

A removed unit must be zero in every member tensor, exactly the entries `masked_copy` zeroes and the rewrite
removes. Zeroing a frozen weight in place would lose the dense model that distillation needs as its teacher, so
where a member is a whole output or input channel of a linear-like layer, the mask multiplies that layer's
output or input instead (the same function, computed with the weight kept); everything else (norm weights,
biases of other modules, fused expert tensors, the trainable LoRA factors) is zeroed in place, and the frozen
entries among those are stashed first so `off()` can put them back. The stash is small: the hooked weight
matrices are where the bytes are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from loraprune.ir.groups import ChannelGroup
from loraprune.passes.sites import Site, channel_site, param_owners

__all__ = ["Masker"]


class Masker:
    """Keeps removed units at zero in a model; `off()` gives back the dense model for a no-grad forward."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup]) -> None:
        self.model = model
        self.state = model.state_dict(keep_vars=True)
        self.groups = groups
        self.owners = param_owners(model)
        self.zeroed: list[tuple[torch.Tensor, int, torch.Tensor]] = []  # (tensor, dim, removed indices)
        self.stash: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []  # frozen: + saved values
        self.scales: dict[tuple[int, str, int], torch.Tensor] = {}  # (module id, side, axis) -> keep mask
        self.modules: dict[int, nn.Module] = {}
        self.handles: list = []
        self.active = True

    def set(self, kept: dict[str, np.ndarray]) -> None:
        """Masks for the kept units of every group (units not named stay whole); removed units never return."""
        gone: dict[tuple[str, int], np.ndarray] = {}
        for g in self.groups:
            keep = np.asarray(kept.get(g.name, np.arange(g.num_units)))
            keep_kv = np.unique(g.kv_of_unit[keep]) if g.num_kv_units else None
            for table, k in ((g.members, keep), (g.kv_members, keep_kv)):
                for key, ids in table.items():
                    gone[key] = gone.get(key, np.zeros(len(ids), bool)) | ((ids >= 0) & ~np.isin(ids, k))
        self._restore()
        self.zeroed, self.scales = [], {}
        for (name, dim), mask in gone.items():
            if not mask.any():
                continue
            tensor = self.state[name]
            idx = torch.as_tensor(np.flatnonzero(mask), device=tensor.device)
            sites = self._sites(tensor, dim)
            if tensor.requires_grad or sites is None:
                self.zeroed.append((tensor, dim, idx))
                continue
            for module, site in sites:
                key = (id(module), site.side, site.axis)
                self.modules[id(module)] = module
                scale = self.scales.get(key)
                if scale is None:
                    scale = self.scales[key] = torch.ones(tensor.shape[dim], dtype=tensor.dtype, device=tensor.device)
                scale[idx] = 0
        self.stash = [(t, d, i, t.detach().index_select(d, i).clone()) for t, d, i in self.zeroed
                      if not t.requires_grad]
        self._hook()
        self.apply()

    def _sites(self, tensor: torch.Tensor, dim: int) -> list[tuple[nn.Module, Site]] | None:
        """Every layer that uses `tensor` (tied weights have several) with the activation carrying `dim`; None if
        one of them has no such activation (then only zeroing the tensor reaches all its uses)."""
        out = []
        for module, local in self.owners.get(id(tensor), []):
            site = channel_site(module, local, dim)
            if site is None:
                return None
            out.append((module, site))
        return out or None

    def _unhook(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self) -> None:
        self._unhook()
        for (module_id, side, axis), scale in self.scales.items():
            module = self.modules[module_id]
            if side == "input":
                self.handles.append(module.register_forward_pre_hook(self._input_hook(scale, axis)))
            else:
                self.handles.append(module.register_forward_hook(self._output_hook(scale, axis)))

    def _shape(self, scale: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
        view = [1] * x.dim()
        view[axis] = -1
        return scale.to(x.dtype).view(view)

    def _input_hook(self, scale: torch.Tensor, axis: int):
        def hook(module, args):
            if not self.active:
                return None
            return (args[0] * self._shape(scale, args[0], axis), *args[1:])
        return hook

    def _output_hook(self, scale: torch.Tensor, axis: int):
        def hook(module, args, output):
            return output * self._shape(scale, output, axis) if self.active else None
        return hook

    @torch.no_grad()
    def apply(self, trainable_only: bool = False) -> None:
        """Zero the removed entries of the tensors without a hook (only the trainable ones: after a step)."""
        for tensor, dim, idx in self.zeroed:
            if not trainable_only or tensor.requires_grad:
                tensor.data.index_fill_(dim, idx, 0.0)

    @torch.no_grad()
    def _restore(self) -> None:
        for tensor, dim, idx, values in self.stash:
            tensor.data.index_copy_(dim, idx, values)

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        """The frozen tensors as they were and no hook: the dense base (trainable tensors are the caller's)."""
        self.active = False
        self._restore()
        try:
            yield
        finally:
            self.active = True
            with torch.no_grad():
                for tensor, dim, idx, _ in self.stash:
                    tensor.data.index_fill_(dim, idx, 0.0)

    @torch.no_grad()
    def finalize(self) -> None:
        """Zero every removed entry in place and drop the hooks: the plain masked model the rewrite equals."""
        self._unhook()
        for (module_id, side, _), scale in self.scales.items():
            module = self.modules[module_id]
            gone = torch.nonzero(scale == 0).flatten()
            for local, p in module.named_parameters(recurse=False):
                dim = _param_dim(module, local, side)
                if dim is not None:
                    p.data.index_fill_(dim, gone.to(p.device), 0.0)
        self.scales, self.stash = {}, []
        self.apply()

    @property
    def stash_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for *_, v in self.stash)



def _param_dim(module: nn.Module, local: str, side: str) -> int | None:
    """The dim of a hooked layer's parameter that carries its input or output channels."""
    for dim in range(getattr(module, local).dim()):
        site = channel_site(module, local, dim)
        if site is not None and site.side == side:
            return dim
    return None
