"""Distillation recovery: the pruned student learns the dense teacher's next-token distributions.

Minitron (arXiv 2407.14679) recovers width-pruned models by forward KL on the logits alone, which beat
next-token retraining at equal compute. `Distillation.loss` is a drop-in for `causal_lm_loss`: KL(teacher ||
student) at a temperature, optionally mixed with the next-token loss. The teacher is any callable from a batch
to logits; in LoRAPrune's schedule it is the dense model rebuilt from the masked one in memory
(`passes.schedule.DenseTeacher`), after a one-shot criterion it is the dense model (`ModelTeacher`) or its
top-k distributions computed ahead of fine-tuning (`TopKTeacher`), which lets the dense model go before the
compact one is trained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from loraprune.lora.training import as_batches, batch_logits, next_token_loss

__all__ = ["Distillation", "ModelTeacher", "TopK", "TopKTeacher", "distillation_loss", "topk_distillation_loss"]


@dataclass(frozen=True)
class TopK:
    """A teacher's next-token distributions kept sparse: per position, the `k` most likely tokens and their
    log-probabilities at `temperature`; the mass of every other token is one bucket."""

    indices: torch.Tensor  # [b, seq, k] int32
    log_probs: torch.Tensor  # [b, seq, k] float32
    temperature: float


Teacher = Callable[[object], torch.Tensor | TopK]


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


def topk_distillation_loss(student: torch.Tensor, teacher: TopK, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`distillation_loss` against a sparse teacher: the KL over the teacher's k tokens plus one bucket holding
    everything else, for both distributions. Exact when k is the vocabulary; zero loss and zero gradient when the
    student is the teacher, for any k (the bucket keeps the student from being pushed to put all its mass on the
    k tokens)."""
    temperature = teacher.temperature
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    indices = teacher.indices.to(student.device, torch.int64)
    log_teacher = teacher.log_probs.to(student.device, torch.float32)
    student_top = log_student.gather(-1, indices)
    rest_teacher = _rest(log_teacher)
    kl = (log_teacher.exp() * (log_teacher - student_top)).sum(-1) \
        + torch.xlogy(rest_teacher, rest_teacher) - rest_teacher * _rest(student_top).log()
    if mask is not None:
        kl = kl[mask.to(kl.device).bool()]
    return kl.mean() * temperature ** 2


def _rest(log_top: torch.Tensor) -> torch.Tensor:
    """The probability mass outside the k tokens, 1 - sum(exp(log_top)) over the last dim (by expm1, exact for
    small masses), kept above the smallest float so that its log stays finite where the bucket is empty (the
    term is then 0 either way)."""
    return (-torch.expm1(torch.logsumexp(log_top, dim=-1))).clamp(min=torch.finfo(torch.float32).tiny)


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
        if isinstance(target, TopK):
            if target.temperature != self.temperature:
                raise ValueError(f"the top-k teacher was computed at temperature {target.temperature:g}, the loss "
                                 f"is at {self.temperature:g}")
            kl = topk_distillation_loss(logits, target, mask)
        else:
            kl = distillation_loss(logits, target, mask, self.temperature)
        loss = self.weight * kl
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


class TopKTeacher:
    """The dense model's top-k next-token distributions on every training batch, computed once ahead of
    fine-tuning, so that the dense model is not needed (nor held) while the compact one trains. Kept per row of
    token ids (a row's distributions do not depend on the other rows), so any split of a batch, as data-parallel
    steps make, finds its rows. Memory: `bytes`, 8 per token per k, against the dense model's weights for
    `ModelTeacher`."""

    def __init__(self, model: nn.Module, batches: Iterable | torch.Tensor, k: int = 64, temperature: float = 1.0,
                 batch_size: int = 4, progress: bool = True) -> None:
        if k < 1:
            raise ValueError(f"top-k teacher needs k >= 1, got {k}")
        self.temperature = temperature
        self._rows: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        dense = ModelTeacher(model)
        for batch in tqdm(as_batches(batches, batch_size), desc="teacher top-k", unit="batch", disable=not progress):
            log_probs = F.log_softmax(dense(batch).float() / temperature, dim=-1)
            values, indices = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)
            for key, row_indices, row_values in zip(_row_keys(batch), indices, values, strict=True):
                self._rows[key] = (row_indices.to("cpu", torch.int32), row_values.cpu())
        self.bytes = sum(i.numel() * i.element_size() + v.numel() * v.element_size() for i, v in self._rows.values())

    def __call__(self, batch) -> TopK:
        rows = []
        for key in _row_keys(batch):
            if key not in self._rows:
                raise KeyError("the top-k teacher has no distributions for this batch: it knows only the batches "
                               "it was given")
            rows.append(self._rows[key])
        return TopK(torch.stack([i for i, _ in rows]), torch.stack([v for _, v in rows]), self.temperature)


def _row_keys(batch) -> list[bytes]:
    """One key per row of a batch: its token ids, and its attention mask where it has one."""
    ids, mask = (batch["input_ids"], batch.get("attention_mask")) if isinstance(batch, dict) else (batch, None)
    ids = ids.cpu()
    mask = None if mask is None else mask.cpu()
    return [ids[i].numpy().tobytes() + (b"" if mask is None else mask[i].numpy().tobytes()) for i in range(len(ids))]
