"""Distillation recovery: the pruned student learns the dense teacher's next-token distributions.

Minitron (arXiv 2407.14679) recovers width-pruned models by forward KL on the logits alone, which beat
next-token retraining at equal compute. `Distillation.loss` is a drop-in for `causal_lm_loss`: KL(teacher ||
student) at a temperature, optionally mixed with the next-token loss. The teacher is any callable from a batch
to logits; in LoRAPrune's schedule it is the dense model rebuilt from the masked one in memory
(`passes.schedule.DenseTeacher`), after a one-shot criterion it is the dense model (`ModelTeacher`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraprune.lora.training import batch_logits, next_token_loss

__all__ = ["Distillation", "ModelTeacher", "distillation_loss"]

Teacher = Callable[[object], torch.Tensor]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
                      temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of KL(softmax(teacher / T) || softmax(student / T)) · T² (the T² keeps the gradient's
    size independent of T, as in Hinton et al.). `mask` [b, seq] leaves out padded positions."""
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1)
    if mask is not None:
        keep = mask.to(kl.device).bool()
        kl = kl[keep]
    return kl.mean() * temperature ** 2


@dataclass(frozen=True)
class Distillation:
    """The recovery loss: `weight`·KL(teacher || student) + (1 - `weight`)·next-token loss."""

    teacher: Teacher
    weight: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.weight <= 1.0:
            raise ValueError(f"distillation weight must be in (0, 1], got {self.weight!r}")
        if self.temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {self.temperature!r}")

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher(batch)
        logits, ids, mask, labels = batch_logits(model, batch)
        loss = self.weight * distillation_loss(logits, target, mask, self.temperature)
        if self.weight < 1.0:
            loss = loss + (1.0 - self.weight) * next_token_loss(logits, ids, mask, labels)
        return loss


class ModelTeacher:
    """A dense model as the teacher: its logits in eval mode, without gradients (its weights are counted as
    `bytes`, the memory distillation adds after a one-shot criterion)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    @torch.no_grad()
    def __call__(self, batch) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            return batch_logits(self.model, batch)[0]
        finally:
            self.model.train(was_training)

