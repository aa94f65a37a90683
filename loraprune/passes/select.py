"""Selection: from per-unit scores and a ratio to the units each group keeps."""

from __future__ import annotations

import dataclasses
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
    scope: "uniform" (the same ratio in every layer) or "global" (lowest scores across layers go first).
    attention: "kv_groups" removes whole KV groups with their query heads; "query_heads" removes query heads
      evenly inside every KV group (KV heads stay); "auto" takes kv_groups when there are >= 4 KV groups,
      else query_heads (with 1-3 KV groups, whole-group steps are too coarse; MQA has one group).
    prune_hidden / exclude_first / exclude_last: prune the residual-stream groups; keep the first fraction of
      layers and the last layer whole. None: chosen from the model's inputs (`resolved`; LANGUAGE_MODEL_DEFAULTS
      for token ids, WHOLE_MODEL_DEFAULTS otherwise); `prune` resolves them before anything reads them.
    """

    ratio: float = 0.2
    scope: str = "uniform"
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
    ratios = {g.name: config.ratio for g in active}
    if config.scope == "global" and config.ratio > 0:
        ratios = _global_ratios(active, scores, config)
    for g in active:
        if g.kind == "attention":
            kept[g.name] = _select_attention(g, scores[g.name], kv_scores.get(g.name), ratios[g.name], config)
        else:
            kept[g.name] = _keep_top(scores[g.name], _keep_count(g.num_units, ratios[g.name], g.unit_size, config))
    return kept


def _global_ratios(active: list[ChannelGroup], scores: dict[str, np.ndarray], config: SelectConfig):
    """Per-group ratios from one ranking per kind: the same total removed, placed where scores are lowest."""
    ratios = {}
    for kind in {g.kind for g in active}:
        same = [g for g in active if g.kind == kind]
        pooled = np.concatenate([scores[g.name] / (np.mean(scores[g.name]) + 1e-12) for g in same]) \
            if kind == "hidden" else np.concatenate([scores[g.name] for g in same])
        owner = np.concatenate([np.full(g.num_units, i) for i, g in enumerate(same)])
        n_remove = int(config.ratio * len(pooled) + 0.5)
        order = np.lexsort((np.arange(len(pooled)), pooled))[:n_remove]
        removed = np.bincount(owner[order], minlength=len(same))
        for i, g in enumerate(same):
            ratios[g.name] = min(removed[i] / g.num_units, (g.num_units - config.min_keep) / g.num_units)
    return ratios
