"""Forward-only criteria: scores from the activations of calibration batches, read by forward hooks, no backward.

- `activation` (Minitron, arXiv 2407.14679): a channel's activation size, aggregated as the paper found best for
  width: the mean over the sequence and the L2 norm over the batch (of |x|, so signs do not cancel). Heads sum
  their channels of the attention output (o_proj's input), MLP channels are the intermediate activation
  (down_proj's input), residual channels the normalised input of the projections.
- `flap` (FLAP, arXiv 2312.11983): a channel's fluctuation, the variance of its activation over all calibration
  tokens, times the squared norm of the weights along that channel. With FLAP's bias compensation
  (`bias_shifts`): a removed input channel's mean contribution moves into the layer's bias, where it has one.

A unit is read where its channels enter the linear-like layers that consume them (`passes.sites`: o_proj's and
down_proj's input, the projections' input for residual channels); KV units at their key / value projections'
output. Members elsewhere (producer rows, norm weights, biases) add nothing. Runs under `torch.no_grad()`: no
gradient exists.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from loraprune.ir.groups import ChannelGroup
from loraprune.lora.training import GradientStats, as_batches, batch_logits
from loraprune.passes.criteria.scores import GroupScores, group_scores, index_scores, register_criterion
from loraprune.passes.sites import channel_site, param_owners

__all__ = ["ActivationStats", "activation_criterion", "bias_shifts", "flap_criterion"]


class ActivationStats:
    """Per-channel sums over calibration batches at every site a group member maps to: Σ_batch (mean_seq |x|)²,
    Σ x, Σ x² and the token count: the only state the criteria keep (four vectors per site)."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup]) -> None:
        state = model.state_dict(keep_vars=True)
        owners = param_owners(model)
        self.where: dict[tuple[str, int], list[tuple[int, str, int]]] = {}
        self.modules: dict[int, nn.Module] = {}
        # a unit is read where its channels enter the layers that consume them; KV units, which attention reads
        # inside one op, where their key / value projections produce them
        wanted = [(key, "input") for g in groups for key in g.members] + \
                 [(key, "output") for g in groups for key in g.kv_members]
        for (name, dim), side in dict.fromkeys(wanted):
            tensor = state.get(name)
            for module, local in owners.get(id(tensor), []) if tensor is not None else []:
                site = channel_site(module, local, dim)
                if site is not None and site.side == side:
                    self.modules[id(module)] = module
                    self.where.setdefault((name, dim), []).append((id(module), site.side, site.axis))
        self.sums: dict[tuple[int, str, int], dict[str, torch.Tensor]] = {}

    def _record(self, key: tuple[int, str, int], x: torch.Tensor) -> None:
        axis = key[2] % x.dim()
        x = x.detach().float().movedim(axis, -1)
        per_sample = x.abs().flatten(1, -2).mean(1) if x.dim() > 2 else x.abs()  # [batch, channels]
        flat = x.reshape(-1, x.shape[-1])
        sums = self.sums.setdefault(key, {"l2": torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device),
                                          "sum": torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device),
                                          "sq": torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device),
                                          "n": torch.zeros((), dtype=torch.float64, device=x.device)})
        sums["l2"] += per_sample.pow(2).sum(0).double()
        sums["sum"] += flat.sum(0).double()
        sums["sq"] += flat.pow(2).sum(0).double()
        sums["n"] += flat.shape[0]

    @torch.no_grad()
    def collect(self, model: nn.Module, batches) -> None:
        keys = {key for sites in self.where.values() for key in sites}
        handles = []
        for key in keys:
            module = self.modules[key[0]]
            if key[1] == "input":
                handles.append(module.register_forward_pre_hook(
                    lambda _m, args, key=key: self._record(key, args[0])))
            else:
                handles.append(module.register_forward_hook(
                    lambda _m, _args, out, key=key: self._record(key, out)))
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                _forward(model, batch)
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)

    def mean(self, key: tuple[int, str, int]) -> torch.Tensor:
        s = self.sums[key]
        return s["sum"] / s["n"]

    def variance(self, key: tuple[int, str, int]) -> torch.Tensor:
        return (self.sums[key]["sq"] / self.sums[key]["n"] - self.mean(key).pow(2)).clamp_(min=0.0)

    def per_index(self, model: nn.Module,
                  score: Callable[[tuple[int, str, int], torch.Tensor, int], torch.Tensor]) -> dict:
        """(member) -> per-index score, summed over the member's sites; `score(site key, weight, dim)`."""
        state = model.state_dict()
        out = {}
        for (name, dim), keys in self.where.items():
            total = sum(score(key, state[name], dim) for key in keys if key in self.sums)
            if isinstance(total, torch.Tensor):
                out[(name, dim)] = total.double().cpu().numpy()
        return out


def _forward(model: nn.Module, batch) -> None:
    """A language model (it has a `config`) takes token ids as input_ids; any other module its batch as is."""
    if hasattr(model, "config") or isinstance(batch, dict):
        batch_logits(model, batch)
    else:
        model(*(t.to(next(model.parameters()).device) for t in (batch if isinstance(batch, tuple) else (batch,))))


def _stats(model: nn.Module, groups: list[ChannelGroup], batches, batch_size: int, name: str,
           stats: GradientStats | None) -> ActivationStats:
    if batches is None:
        raise ValueError(f"criterion {name!r} needs calibration batches: pass batches=[token ids [b, seq], ...]")
    collected = ActivationStats(model, groups)
    collected.collect(model, as_batches(batches, batch_size))
    if stats is not None:
        stats.record(model)  # nothing: no parameter gets a gradient
    return collected


@register_criterion("activation")
def activation_criterion(model: nn.Module, groups: list[ChannelGroup], *, batches=None, batch_size: int = 4,
                         stats: GradientStats | None = None, **_: object) -> GroupScores:
    """Minitron's activation criterion (module docstring): forward passes over `batches` only."""
    collected = _stats(model, groups, batches, batch_size, "activation", stats)
    return group_scores(groups, collected.per_index(model, lambda key, w, dim: collected.sums[key]["l2"].sqrt()))


@register_criterion("flap")
def flap_criterion(model: nn.Module, groups: list[ChannelGroup], *, batches=None, batch_size: int = 4,
                   stats: GradientStats | None = None, **_: object) -> GroupScores:
    """FLAP's fluctuation criterion (module docstring); the channel means go with the scores for `bias_shifts`."""
    collected = _stats(model, groups, batches, batch_size, "flap", stats)

    def fluctuation(key, weight, dim):
        return collected.variance(key) * torch.as_tensor(index_scores(weight.float().pow(2), dim),
                                                         device=collected.sums[key]["n"].device)

    scores = group_scores(groups, collected.per_index(model, fluctuation))
    scores.input_means = {member: collected.mean(key).cpu().numpy() for member, keys in collected.where.items()
                          for key in keys if key[1] == "input" and key in collected.sums}
    return scores


def bias_shifts(model: nn.Module, groups: list[ChannelGroup], kept: dict[str, np.ndarray],
                input_means: dict[tuple[str, int], np.ndarray]) -> dict[str, torch.Tensor]:
    """FLAP's bias compensation: for each linear layer (2-D weight, with a bias) that loses input channels,
    W[:, removed] · mean(x[removed]) added to its bias keeps the removed channels' average contribution.
    Returns bias name -> the shift; layers without a bias get none (nothing to put it in)."""
    state = model.state_dict()
    removed: dict[tuple[str, int], np.ndarray] = {}
    for g in groups:
        keep = np.asarray(kept[g.name])
        for key, ids in g.members.items():
            gone = (ids >= 0) & ~np.isin(ids, keep)
            if key in input_means and gone.any():
                removed[key] = removed.get(key, np.zeros(len(ids), bool)) | gone
    out = {}
    for (name, dim), gone in removed.items():
        bias_name = name.rsplit(".", 1)[0] + ".bias"
        weight, bias = state[name], state.get(bias_name)
        if bias is None or weight.dim() != 2:
            continue
        idx = torch.as_tensor(np.flatnonzero(gone), device=weight.device)
        mean = torch.as_tensor(input_means[(name, dim)], device=weight.device, dtype=torch.float32)[idx]
        out[bias_name] = torch.tensordot(weight.float().index_select(dim, idx), mean, dims=([dim], [0])).to(bias.dtype)
    return out
