"""LoRAPrune's schedule: fine-tune the LoRA factors while masks grow to the target ratio on a cubic curve.

Masked units are zeroed in the base weights and in the LoRA factors alike, so the masked model is exactly what
the rewrite produces; removed units never come back.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from loraprune.ir.groups import ChannelGroup
from loraprune.lora.adapters import is_peft_model, lora_layers, lora_params
from loraprune.lora.distill import Distillation
from loraprune.lora.training import as_batches, batch_logits, causal_lm_loss, train_step
from loraprune.passes.checkpointing import activation_checkpointing
from loraprune.passes.criteria.lora import LoRAScorer
from loraprune.passes.criteria.scores import GroupScores
from loraprune.passes.masking import Masker
from loraprune.passes.select import SelectConfig, select_units

if TYPE_CHECKING:
    from loraprune.parallel import DataParallel

__all__ = ["DenseTeacher", "cubic_ratio", "iterative_prune"]


class DenseTeacher:
    """The dense model, rebuilt in place from the masked PEFT model the schedule trains: masks off
    (`Masker.off`) and every LoRA factor swapped for its value at the start (standard init: B = 0, no adapter;
    PiSSA: the top-r part the residual base lacks), in eval mode, without gradients. No second model: the extra
    memory is a copy of the initial factors (r x (in + out) per layer) and the masker's stash (`bytes`)."""

    def __init__(self, model: nn.Module, masker: Masker) -> None:
        self.model, self.masker = model, masker
        self.params = lora_params(lora_layers(model))
        self.initial = [p.detach().clone() for p in self.params]

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.initial) + self.masker.stash_bytes

    @torch.no_grad()
    def __call__(self, batch) -> torch.Tensor:
        trained = [p.data for p in self.params]
        was_training = self.model.training
        try:
            for p, initial in zip(self.params, self.initial, strict=True):
                p.data = initial
            self.model.eval()
            with self.masker.off():
                return batch_logits(self.model, batch)[0]
        finally:
            for p, value in zip(self.params, trained, strict=True):
                p.data = value
            self.model.train(was_training)


def _select_monotone(groups: list[ChannelGroup], scores: GroupScores, kept: dict[str, np.ndarray],
                     config: SelectConfig) -> dict[str, np.ndarray]:
    """`select_units` with already-removed units scored lowest, so none comes back and counts only shrink."""
    units, kv = {}, {}
    for g in groups:
        s = np.nan_to_num(np.asarray(scores.units[g.name], dtype=float), nan=0.0, posinf=0.0, neginf=0.0)
        alive = np.zeros(g.num_units, bool)
        alive[kept[g.name]] = True
        units[g.name] = np.where(alive, s, -np.inf)
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
                    weight_decay: float = 0.0, checkpointing: bool = False, distill: float = 0.0,
                    temperature: float = 1.0, parallel: DataParallel | None = None,
                    ) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Fine-tune the LoRA factors of the PEFT `model` (in place) while its masks grow to `ratio`.

    AdamW on the LoRA factors only, causal-LM loss, one batch per step (cycling through `batches`). The
    target ratio follows `cubic_ratio`; every `update_every` steps (and when the schedule reaches `ratio`)
    units are reselected with `select_units` from the smoothed LoRA scores, removed units never return,
    and removed units are masked (`Masker`: zero in the LoRA factors after every step, and in the base weights
    by hooks or in place; at the end all in place, so the model is the masked model the rewrite equals).
    Once the masks reach `ratio`, the remaining steps (the cool-down) fine-tune only: no scoring, no updates.
    The final kept counts are those `select_units` gives for `ratio`; `checkpointing` as in `lora_recover`.
    `distill` > 0 recovers by distillation from the dense model (`DenseTeacher`: one more no-grad forward per
    step, no second model), that share of the loss being KL(teacher || student) at `temperature`. With
    `parallel` each step is data-parallel (`train_step`): every process sees the same reduced gradients, so all
    make the same mask decisions.
    Returns (kept units per group, history): one record per update with step, ratio, mean loss since the
    last update, the kept units and the teacher's memory (0 without distillation).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if update_every < 1:
        raise ValueError(f"update_every must be >= 1, got {update_every}")
    config = dataclasses.replace(config or SelectConfig(), ratio=ratio)
    groups = analysis.groups
    name = type(model.get_base_model() if is_peft_model(model) else model).__name__
    nothing = analysis.nothing_to_prune(name, config.prune_hidden)
    if nothing:
        raise ValueError(nothing)
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
    masker = Masker(model, groups)
    loss_fn, teacher = causal_lm_loss, None
    if distill > 0:
        teacher = DenseTeacher(model, masker)
        loss_fn = Distillation(teacher, weight=distill, temperature=temperature).loss
    kept = {g.name: np.arange(g.num_units) for g in groups}
    history: list[dict] = []
    end = max(int(round(warmup * steps)), steps - int(round(cooldown * steps)))
    last_ratio, losses = None, []

    def update(step: int, target: float) -> None:
        nonlocal kept, last_ratio, losses
        new = _select_monotone(groups, scorer.scores(), kept, dataclasses.replace(config, ratio=target))
        kept = new
        masker.set(kept)
        last_ratio = target
        history.append({"step": step, "ratio": target, "loss": float(np.mean(losses)) if losses else None,
                        "kept": {k: v.copy() for k, v in kept.items()},
                        "teacher_bytes": 0 if teacher is None else teacher.bytes})
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
                                   after_backward=scorer.update if pruning else None, loss_fn=loss_fn,
                                   parallel=parallel)
                masker.apply(trainable_only=True)
                losses.append(value)
                if pruning and (step % update_every == 0 or step == end):
                    update(step, cubic_ratio(step, steps, ratio, warmup, cooldown))
                bar.set_postfix(loss=f"{value:.3f}", ratio=f"{last_ratio or 0.0:.3f}", refresh=False)
            if last_ratio != ratio:
                update(steps, ratio)
        finally:
            masker.finalize()  # the plain masked model from here on: removed entries zero, no hooks
            bar.close()
            optimizer.zero_grad(set_to_none=True)
            model.train(was_training)
    return kept, history

