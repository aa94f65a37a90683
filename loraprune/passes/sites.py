"""Where a parameter's channel shows up as an activation: one rule per layer family.

A unit's member (parameter, dim) that is a whole output or input channel of a linear-like layer is also a channel
of that layer's output or input tensor. Masks (`passes.masking`) multiply that tensor instead of zeroing the
weight, and the forward-only criteria (`criteria.activations`) read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["Site", "channel_site", "param_owners"]


@dataclass(frozen=True)
class Site:
    """The module's "input" (its first positional argument) or "output", and the axis that holds the channels."""

    side: str
    axis: int


def _linear(module: nn.Module, local: str, dim: int) -> Site | None:
    out_dim = 1 if type(module).__name__ == "Conv1D" else 0  # HF Conv1D stores [in, out]
    if local == "bias":
        return Site("output", -1)
    return Site("output" if dim == out_dim else "input", -1)


def _embedding(module: nn.Module, local: str, dim: int) -> Site | None:
    return Site("output", -1) if local == "weight" and dim == 1 else None


def _conv(module: nn.Module, local: str, dim: int) -> Site | None:
    if module.groups != 1 or module.transposed:
        return None
    if local == "bias" or dim == 0:
        return Site("output", 1)
    return Site("input", 1) if dim == 1 else None


def channel_site(module: nn.Module, local: str, dim: int) -> Site | None:
    """The activation that carries dim `dim` of the module's parameter `local`; None where there is none that
    maps one to one (norms, whose weight is not a pure output scale in every model; fused expert tensors)."""
    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
        return _linear(module, local, dim)
    if isinstance(module, nn.Embedding):
        return _embedding(module, local, dim)
    if isinstance(module, nn.modules.conv._ConvNd):
        return _conv(module, local, dim)
    return None


def param_owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> every (module, local name) holding it: a tied weight has several."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for local, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((module, local))
    return owners
