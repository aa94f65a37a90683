"""Selection: from per-unit scores and a ratio to the units each group keeps."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import asdict, dataclass
from typing import Self

import numpy as np
import torch

from loraprune.ir.groups import ChannelGroup

__all__ = ["LANGUAGE_MODEL_DEFAULTS", "WHOLE_MODEL_DEFAULTS", "SelectConfig", "excluded_groups", "select_units",
           "takes_token_ids"]

# Where a SelectConfig leaves these None, the model's inputs choose. A language model (token ids in) keeps its
# residual stream and its first ~10% and last layers whole, as LoRAPrune and LLM-Pruner do: those are where
# LLM quality breaks first. Any other model (images, features in) has every group pruned, residual streams and
# end layers included, as DepGraph / Torch-Pruning do for vision models: keeping them whole there leaves most
# of the parameters in place (docs/results.md, "torchvision beside Torch-Pruning").
LANGUAGE_MODEL_DEFAULTS = {"prune_hidden": False, "exclude_first": 0.1, "exclude_last": True}
WHOLE_MODEL_DEFAULTS = {"prune_hidden": True, "exclude_first": 0.0, "exclude_last": False}


def takes_token_ids(example_inputs: tuple) -> bool:
    """Whether the model's first tensor input is integer (token ids): what tells a language model here."""
    first = next((t for t in example_inputs if isinstance(t, torch.Tensor)), None)
    return first is not None and not (first.is_floating_point() or first.is_complex())


@dataclass
class SelectConfig:
    """How many units go, and where.

    ratio: fraction of each prunable group's units removed (heads, MLP channels; hidden only if asked).
    scope: "uniform" (the same ratio in every layer) or "global" (as many parameters as uniform removes, taken
      where the standardised scores are lowest, across layers and between heads and MLP channels: FLAP's
      adaptive structure).
    spread: with scope "global", each group removes what the uniform cut removes from it, give or take spread x
      its units (OWL's bound on per-layer sparsity, arXiv 2310.05175), so no layer is cut to nothing; None: no
      bound.
    attention: "kv_groups" removes whole KV groups with their query heads; "query_heads" removes query heads
      evenly inside every KV group (KV heads stay); "auto" takes kv_groups when there are >= 4 KV groups,
      else query_heads (with 1-3 KV groups, whole-group steps are too coarse; MQA has one group).
    prune_hidden / exclude_first / exclude_last: prune the residual-stream groups; keep the first fraction of
      layers and the last layer whole. None: chosen from the model's inputs (`resolved`; LANGUAGE_MODEL_DEFAULTS
      for token ids, WHOLE_MODEL_DEFAULTS otherwise); `prune` resolves them before anything reads them.
    """

    ratio: float = 0.2
    scope: str = "uniform"
    spread: float | None = None
    attention: str = "auto"
    prune_hidden: bool | None = None
    exclude_first: float | None = None
    exclude_last: bool | None = None
    round_to: int = 1
    min_keep: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.ratio, (int, float)) and 0.0 <= self.ratio < 1.0):
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio!r}")
        if self.scope not in ("uniform", "global"):
            raise ValueError(f"scope must be 'uniform' or 'global', got {self.scope!r}")
        if self.spread is not None and not (isinstance(self.spread, (int, float)) and self.spread >= 0):
            raise ValueError(f"spread must be >= 0 or None, got {self.spread!r}")
        if self.spread is not None and self.scope != "global":
            raise ValueError("spread bounds the global scope's widths: it needs scope='global'")
        if self.attention not in ("auto", "kv_groups", "query_heads"):
            raise ValueError(f"attention must be 'auto', 'kv_groups' or 'query_heads', got {self.attention!r}")
        if self.round_to < 1 or self.min_keep < 1:
            raise ValueError("round_to and min_keep must be >= 1")
        if self.exclude_first is not None and not 0.0 <= self.exclude_first < 1.0:
            raise ValueError(f"exclude_first must be in [0, 1), got {self.exclude_first!r}")

    def resolved(self, token_ids: bool = True) -> Self:
        """A copy with every None option set: the language-model defaults for a model that takes token ids,
        the whole-model ones otherwise."""
        defaults = LANGUAGE_MODEL_DEFAULTS if token_ids else WHOLE_MODEL_DEFAULTS
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def to_dict(self) -> dict:
        return asdict(self)


def excluded_groups(groups: list[ChannelGroup], config: SelectConfig) -> set[str]:
    """The first `exclude_first` of the layers and, with `exclude_last`, the last layer stay whole."""
    config = config.resolved()
    out = set()
    for kind in ("attention", "mlp", "channel"):
        layers = [g for g in groups if g.kind == kind and g.layer is not None]
        n = len(layers)
        if n < 4:
            continue
        first = math.ceil(config.exclude_first * n) if config.exclude_first > 0 else 0
        for g in layers:
            if g.layer < first or (config.exclude_last and g.layer == n - 1):
                out.add(g.name)
    return out


def _attention_mode(group: ChannelGroup, config: SelectConfig) -> str:
    if group.num_kv_units == 0:
        return "heads"
    if config.attention == "auto":
        return "kv_groups" if group.num_kv_units >= 4 else "query_heads"
    return config.attention


def _keep_count(units: int, ratio: float, unit_size: int, config: SelectConfig) -> int:
    keep = max(config.min_keep, units - int(ratio * units + 0.5))
    while keep < units and (keep * unit_size) % config.round_to:
        keep += 1
    return min(keep, units)


def _keep_top(scores: np.ndarray, keep: int) -> np.ndarray:
    order = np.lexsort((np.arange(len(scores)), -scores))  # ties: lower index kept, deterministic
    return np.sort(order[:keep])


def _select_attention(group: ChannelGroup, scores: np.ndarray, kv_scores: np.ndarray | None, ratio: float,
                      config: SelectConfig) -> np.ndarray:
    mode = _attention_mode(group, config)
    if mode == "heads":
        return _keep_top(scores, _keep_count(group.num_units, ratio, group.unit_size, config))
    if mode == "kv_groups":
        per_kv = kv_scores if kv_scores is not None else np.bincount(group.kv_of_unit, scores)
        kept_kv = _keep_top(per_kv, _keep_count(group.num_kv_units, ratio, 1, config))
        return np.flatnonzero(np.isin(group.kv_of_unit, kept_kv))
    per_group = group.num_units // group.num_kv_units
    keep = _keep_count(per_group, ratio, group.unit_size, config)
    kept = [np.flatnonzero(group.kv_of_unit == k)[_keep_top(scores[group.kv_of_unit == k], keep)]
            for k in range(group.num_kv_units)]
    return np.sort(np.concatenate(kept))


def select_units(groups: list[ChannelGroup], scores: dict[str, np.ndarray], config: SelectConfig,
                 kv_scores: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Kept unit ids per group name. Groups that are excluded or not asked for keep everything. Options left
    None take the language-model defaults here (`prune` resolves them from the inputs before)."""
    config = config.resolved()
    kv_scores = kv_scores or {}
    skip = excluded_groups(groups, config)
    active = [g for g in groups if g.name not in skip and (g.kind != "hidden" or config.prune_hidden)
              and g.num_units > 1]
    kept = {g.name: np.arange(g.num_units) for g in groups}
    for g in active:
        if g.kind == "attention":
            kept[g.name] = _select_attention(g, scores[g.name], kv_scores.get(g.name), config.ratio, config)
        else:
            kept[g.name] = _keep_top(scores[g.name], _keep_count(g.num_units, config.ratio, g.unit_size, config))
    if config.scope == "global" and config.ratio > 0:
        kept.update(_global_kept(active, scores, kv_scores, kept, config))
    return kept


def _global_kept(active: list[ChannelGroup], scores: dict[str, np.ndarray], kv_scores: dict[str, np.ndarray],
                 uniform: dict[str, np.ndarray], config: SelectConfig) -> dict[str, np.ndarray]:
    """FLAP's adaptive structure (arXiv 2312.11983): the parameters the uniform selection removes, taken instead
    from the lowest-scored units of any layer and kind. Scores are standardised per kind over the layers (per
    group for residual streams, which need not share a scale), so heads and MLP channels compete; each group
    shrinks only in the steps its mode allows (one query head in every KV group, a whole KV group, `round_to`).
    The budget is the uniform selection's, so both scopes give models of the same size. Units scored -inf (those
    LoRAPrune's schedule already removed) always go. With `spread`, each group removes within spread x its units
    of what the uniform cut removes from it: the steps below that go first, those above it never."""
    z = _standardised(active, scores)
    gone = {g.name: np.setdiff1d(np.arange(g.num_units), uniform[g.name]) for g in active}
    budget = sum(_params(g, gone[g.name]) for g in active)
    steps, forced = [], []
    for i, g in enumerate(active):
        low, high = _removal_bounds(len(gone[g.name]), g.num_units, config.spread)
        removed = 0
        for j, (score, cost, units) in enumerate(_shrink_steps(g, z[g.name], kv_scores.get(g.name), config)):
            removed += len(units)
            if removed > high and score != -np.inf:
                break  # past the bound: none of the group's later steps may go either
            (forced if removed <= low or score == -np.inf else steps).append((score, i, j, cost, units))
    spent = sum(cost for _, _, _, cost, _ in forced)
    closed = set()
    taken: dict[int, list[np.ndarray]] = {i: [] for i in range(len(active))}
    for _, i, _, _, units in forced:
        taken[i].append(units)
    for _, i, _, cost, units in sorted(steps, key=lambda step: step[:3]):
        if i in closed:
            continue
        if spent + cost / 2 < budget:  # a step goes when it brings the total nearer the budget
            spent += cost
            taken[i].append(units)
        else:
            closed.add(i)  # a group shrinks in order: none of its later steps may go either
    return {g.name: np.setdiff1d(np.arange(g.num_units), np.concatenate([np.zeros(0, np.int64), *taken[i]]))
            for i, g in enumerate(active)}


def _removal_bounds(uniform_removed: int, units: int, spread: float | None) -> tuple[float, float]:
    """How many units a group must and may remove under the global scope: within `spread` of its units around
    what the uniform cut removes (a little slack, so a bound on a whole number of units is not lost to
    rounding)."""
    if spread is None:
        return -1.0, math.inf
    return uniform_removed - spread * units + 1e-9, uniform_removed + spread * units + 1e-9


def _standardised(active: list[ChannelGroup], scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(score - mean) / std over the finite scores of each kind (of each residual-stream group alone)."""
    pools: dict[str, list[ChannelGroup]] = {}
    for g in active:
        pools.setdefault(g.name if g.kind == "hidden" else g.kind, []).append(g)
    out = {}
    for same in pools.values():
        values = np.concatenate([np.asarray(scores[g.name], dtype=float) for g in same])
        finite = values[np.isfinite(values)]
        mean = finite.mean() if finite.size else 0.0
        std = finite.std() if finite.size and finite.std() > 0 else 1.0
        out.update({g.name: (np.asarray(scores[g.name], dtype=float) - mean) / std for g in same})
    return out


def _shrink_steps(group: ChannelGroup, z: np.ndarray, kv_scores: np.ndarray | None,
                  config: SelectConfig) -> list[tuple[float, float, np.ndarray]]:
    """The ways `group` can shrink, in the order it must: (score, parameters, units removed) per step, the step's
    score the mean of its units' (never below an earlier step's, so the global ranking takes them in order)."""
    mode = _attention_mode(group, config) if group.kind == "attention" else "heads"
    if mode == "heads":
        chunks = _chunks(_removal_order(z), group.num_units, group.unit_size, config)
    elif mode == "query_heads":
        per_group = group.num_units // group.num_kv_units
        orders = [np.flatnonzero(group.kv_of_unit == k)[_removal_order(z[group.kv_of_unit == k])]
                  for k in range(group.num_kv_units)]
        chunks = [np.concatenate(parts) for parts in
                  zip(*(_chunks(order, per_group, group.unit_size, config) for order in orders), strict=True)]
    else:
        per_kv = kv_scores if kv_scores is not None else np.bincount(group.kv_of_unit, z)
        kv_chunks = _chunks(_removal_order(np.asarray(per_kv, dtype=float)), group.num_kv_units, 1, config)
        chunks = [np.flatnonzero(np.isin(group.kv_of_unit, kv)) for kv in kv_chunks]
    steps, floor = [], -np.inf
    for units in chunks:
        floor = max(floor, float(np.mean(z[units])))
        steps.append((floor, _params(group, units), units))
    return steps


def _removal_order(scores: np.ndarray) -> np.ndarray:
    """Lowest score first; ties: the higher index first (`_keep_top` keeps the lower)."""
    return np.lexsort((-np.arange(len(scores)), scores))


def _chunks(order: np.ndarray, units: int, unit_size: int, config: SelectConfig) -> list[np.ndarray]:
    """`order` cut at every width the group may shrink to (>= min_keep units, a multiple of round_to channels)."""
    widths = [k for k in range(units - 1, config.min_keep - 1, -1) if (k * unit_size) % config.round_to == 0]
    cuts = [units - k for k in widths]
    return [order[a:b] for a, b in itertools.pairwise([0, *cuts])]


def _params(group: ChannelGroup, units: np.ndarray) -> float:
    """Parameters that go with these (query-head) units, and with KV units none of whose heads stay."""
    per_unit = group.unit_params if group.unit_params is not None else np.full(group.num_units, group.unit_size)
    total = float(per_unit[units].sum())
    if group.num_kv_units and group.kv_unit_params is not None:
        gone = np.setdiff1d(group.kv_of_unit[units], group.kv_of_unit[np.setdiff1d(np.arange(group.num_units), units)])
        total += float(group.kv_unit_params[gone].sum())
    return total
