"""LoRAPrune's schedule: fine-tune the LoRA factors while masks grow to the target ratio on a cubic curve.

Masked units are zeroed in the base weights and in the LoRA factors alike, so the masked model is exactly what
the rewrite produces; removed units never come back.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from loraprune.ir.groups import ChannelGroup
from loraprune.lora.adapters import is_peft_model, lora_layers, lora_params
from loraprune.lora.training import as_batches, train_step
from loraprune.passes.checkpointing import activation_checkpointing
from loraprune.passes.criteria.lora import LoRAScorer
from loraprune.passes.criteria.scores import GroupScores
from loraprune.passes.select import SelectConfig, select_units

__all__ = ["cubic_ratio", "iterative_prune"]


class _Masker:
    """Zeroes removed units in every member tensor (base weights, biases, norms, LoRA factors) in place,
    exactly the entries `masked_copy` zeroes and the rewrite removes."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup]) -> None:
        self.state = model.state_dict(keep_vars=True)
        self.groups = groups
        self.removed: list[tuple[torch.Tensor, int, torch.Tensor]] = []

    def set(self, kept: dict[str, np.ndarray]) -> None:
        gone: dict[tuple[str, int], np.ndarray] = {}
        for g in self.groups:
            keep = np.asarray(kept.get(g.name, np.arange(g.num_units)))
            keep_kv = np.unique(g.kv_of_unit[keep]) if g.num_kv_units else None
            for table, k in ((g.members, keep), (g.kv_members, keep_kv)):
                for key, ids in table.items():
                    gone[key] = gone.get(key, np.zeros(len(ids), bool)) | ((ids >= 0) & ~np.isin(ids, k))
        self.removed = [(self.state[p], d, torch.as_tensor(np.flatnonzero(m), device=self.state[p].device))
                        for (p, d), m in gone.items() if m.any()]

    @torch.no_grad()
    def apply(self, trainable_only: bool = False) -> None:
        for tensor, dim, idx in self.removed:
            if not trainable_only or tensor.requires_grad:
                tensor.data.index_fill_(dim, idx, 0.0)


def _select_monotone(groups: list[ChannelGroup], scores: GroupScores, kept: dict[str, np.ndarray],
                     config: SelectConfig) -> dict[str, np.ndarray]:
    """`select_units` with already-removed units scored lowest, so none comes back and counts only shrink."""
    units, kv = {}, {}
    for g in groups:
        s = np.nan_to_num(np.asarray(scores.units[g.name], dtype=float), nan=0.0, posinf=0.0, neginf=0.0)
        alive = np.zeros(g.num_units, bool)
        alive[kept[g.name]] = True
        if g.kind == "hidden" and config.scope == "global":  # pooled as score / mean there: stay finite
            s = np.where(alive, np.maximum(s, 0.0) + 1e-200, 0.0)
        else:
            s = np.where(alive, s, -np.inf)
        units[g.name] = s
        if g.num_kv_units:
            k = np.nan_to_num(np.asarray(scores.kv[g.name], dtype=float), nan=0.0, posinf=0.0, neginf=0.0)
            kv[g.name] = np.where(np.isin(np.arange(g.num_kv_units), g.kv_of_unit[kept[g.name]]), k, -np.inf)
    new = select_units(groups, units, config, kv)
    for g in groups:
        if not np.isin(new[g.name], kept[g.name]).all():  # cannot happen with monotone counts; never hide it
            raise RuntimeError(f"selection revived pruned units of {g.name}")
    return new


def cubic_ratio(step: int, steps: int, ratio: float, warmup: float = 0.1, cooldown: float = 0.1) -> float:
    """ratio·(1 - (1 - p)^3), p going 0 -> 1 between the warm-up and the cool-down (step counts completed)."""
    start = int(round(warmup * steps))
    end = max(start, steps - int(round(cooldown * steps)))
    p = 1.0 if end <= start else min(max((step - start) / (end - start), 0.0), 1.0)
    return ratio * (1.0 - (1.0 - p) ** 3)


def iterative_prune(model: nn.Module, analysis, batches, *, ratio: float, config: SelectConfig | None = None,
                    steps: int, lr: float = 1e-4, update_every: int = 10, warmup: float = 0.1, cooldown: float = 0.1,
                    lam: float = 0.9, progress: bool = True, seed: int = 0, batch_size: int = 4,
                    weight_decay: float = 0.0, checkpointing: bool = False) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Fine-tune the LoRA factors of the PEFT `model` (in place) while its masks grow to `ratio`.

    AdamW on the LoRA factors only, causal-LM loss, one batch per step (cycling through `batches`). The
    target ratio follows `cubic_ratio`; every `update_every` steps (and when the schedule reaches `ratio`)
    units are reselected with `select_units` from the smoothed LoRA scores, removed units never return,
    and removed units are zeroed in the base weights and the LoRA factors (kept zero after every step).
    Once the masks reach `ratio`, the remaining steps (the cool-down) fine-tune only: no scoring, no updates.
    The final kept counts are those `select_units` gives for `ratio`; `checkpointing` as in `lora_recover`.
    Returns (kept units per group, history): one record per update with step, ratio, mean loss since the
    last update and the kept units.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if update_every < 1:
        raise ValueError(f"update_every must be >= 1, got {update_every}")
    config = dataclasses.replace(config or SelectConfig(), ratio=ratio)
    groups = analysis.groups
    if not any(g.num_units > 1 for g in groups):
        name = type(model.get_base_model() if is_peft_model(model) else model).__name__
        raise ValueError(f"nothing to prune in {name}: the dependency pass found no group of "
                         f"prunable units ({len(analysis.frozen)} frozen reports say why)")
    batches = as_batches(batches, batch_size)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers: wrap it with add_lora first")
    params = lora_params(layers)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    scorer = LoRAScorer(model, groups, lam)
    masker = _Masker(model, groups)
    kept = {g.name: np.arange(g.num_units) for g in groups}
    history: list[dict] = []
    end = max(int(round(warmup * steps)), steps - int(round(cooldown * steps)))
    last_ratio, losses = None, []

    def update(step: int, target: float) -> None:
        nonlocal kept, last_ratio, losses
        new = _select_monotone(groups, scorer.scores(), kept, dataclasses.replace(config, ratio=target))
        kept = new
        masker.set(kept)
        masker.apply()
        last_ratio = target
        history.append({"step": step, "ratio": target, "loss": float(np.mean(losses)) if losses else None,
                        "kept": {k: v.copy() for k, v in kept.items()}})
        losses = []

    was_training = model.training
    with torch.random.fork_rng(devices=[]), activation_checkpointing(model, checkpointing):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        model.train()
        bar = tqdm(range(1, steps + 1), desc="lora-prune", unit="step", disable=not progress)
        try:
            for step in bar:
                pruning = last_ratio != ratio  # once the masks reach `ratio` they are final: no scores needed
                value = train_step(model, optimizer, batches[(step - 1) % len(batches)],
                                    after_backward=scorer.update if pruning else None)
                masker.apply(trainable_only=True)
                losses.append(value)
                if pruning and (step % update_every == 0 or step == end):
                    update(step, cubic_ratio(step, steps, ratio, warmup, cooldown))
                bar.set_postfix(loss=f"{value:.3f}", ratio=f"{last_ratio or 0.0:.3f}", refresh=False)
            if last_ratio != ratio:
                update(steps, ratio)
        finally:
            bar.close()
            optimizer.zero_grad(set_to_none=True)
            model.train(was_training)
    return kept, history

