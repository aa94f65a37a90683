"""Training with LoRA: the loss, one optimiser step, and recovery fine-tuning of an already pruned model.

The same loss, optimiser and batches serve LoRAPrune's schedule (`passes.schedule`) and the recovery after a
one-shot criterion, so both get the same fine-tuning budget.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from loraprune.lora.adapters import add_lora, lora_layers, lora_params
from loraprune.passes.checkpointing import activation_checkpointing

if TYPE_CHECKING:
    from loraprune.parallel import DataParallel

__all__ = ["GradientStats", "as_batches", "batch_inputs", "batch_logits", "causal_lm_loss", "device_of",
           "gradient_bytes", "lora_recover", "next_token_loss", "output_logits", "train_step"]


def gradient_bytes(model: nn.Module) -> int:
    """Bytes held by `.grad` tensors of the model's parameters (what a scoring backward pass stores)."""
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


@dataclasses.dataclass
class GradientStats:
    """Filled by the criteria when passed as `stats=`: peak bytes of parameter gradients held after a
    backward pass, and how many parameters had a gradient. Activations and their gradients are not counted."""

    grad_bytes: int = 0
    params_with_grad: int = 0

    def record(self, model: nn.Module) -> None:
        self.grad_bytes = max(self.grad_bytes, gradient_bytes(model))
        self.params_with_grad = max(self.params_with_grad, sum(p.grad is not None for p in model.parameters()))


def as_batches(batches: Iterable | torch.Tensor, batch_size: int) -> list:
    if isinstance(batches, torch.Tensor):
        batches = batches[None] if batches.dim() == 1 else batches
        return list(batches.split(batch_size))
    if isinstance(batches, dict):
        return [batches]
    out = list(batches)
    if not out:
        raise ValueError("batches is empty")
    return out


def device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def batch_inputs(model: nn.Module, batch: torch.Tensor | dict) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                       torch.Tensor | None]:
    """(input_ids, attention_mask, labels) of a batch on the model's device: token ids [b, seq], or a dict with
    input_ids (and optionally attention_mask, labels)."""
    device = device_of(model)
    if not isinstance(batch, dict):
        return batch.to(device), None, None
    mask, labels = batch.get("attention_mask"), batch.get("labels")
    return (batch["input_ids"].to(device), None if mask is None else mask.to(device),
            None if labels is None else labels.to(device))


def output_logits(out) -> torch.Tensor:
    """The logits of a model's output (a HF output object, a tuple, or the tensor itself)."""
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    return logits


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy; -100 labels are ignored, so are padded positions."""
    if labels is None:
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    # shift the labels, not the logits: flattening sliced [b, seq, vocab] logits copies them, and the slice's
    # backward pass allocates another vocab-sized tensor (the largest activations of a small model)
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def batch_logits(model: nn.Module, batch: torch.Tensor | dict) -> tuple[torch.Tensor, torch.Tensor,
                                                                         torch.Tensor | None, torch.Tensor | None]:
    """The model's logits on a batch, with the batch's (input_ids, attention_mask, labels) on its device."""
    ids, mask, labels = batch_inputs(model, batch)
    out = model(input_ids=ids, **({} if mask is None else {"attention_mask": mask}))
    return output_logits(out), ids, mask, labels


def causal_lm_loss(model: nn.Module, batch: torch.Tensor | dict) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch (see `batch_inputs` for the forms a batch takes)."""
    return next_token_loss(*batch_logits(model, batch))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch,
               after_backward: Callable[[], None] | None = None,
               loss_fn: Callable[[nn.Module, object], torch.Tensor] = causal_lm_loss,
               parallel: DataParallel | None = None) -> float:
    """One AdamW step on `loss_fn` of `batch` (the causal-LM loss, or a `Distillation`'s); `after_backward` reads
    the gradients before the step. With `parallel`, this process takes its rows of the batch and the gradients
    are reduced over all processes first, so every process takes the same step."""
    optimizer.zero_grad(set_to_none=True)
    if parallel is not None:
        value = parallel.backward(model, batch, loss_fn, [p for g in optimizer.param_groups for p in g["params"]])
        if after_backward is not None:
            after_backward()
        optimizer.step()
        return value
    loss = loss_fn(model, batch)
    loss.backward()
    if after_backward is not None:
        after_backward()
    optimizer.step()
    return float(loss.detach())


def lora_recover(model: nn.Module, batches, *, steps: int, lr: float = 1e-4, r: int = 8, alpha: int = 16,
                 target: Sequence[str] | None = None, dropout: float = 0.05, seed: int = 0, batch_size: int = 4,
                 merge: bool = True, progress: bool = True, checkpointing: bool = False,
                 init: str = "pissa", loss_fn: Callable[[nn.Module, object], torch.Tensor] = causal_lm_loss,
                 parallel: DataParallel | None = None) -> tuple[nn.Module, list[float]]:
    """LoRA recovery fine-tuning of an (already pruned) model: the baselines' counterpart of the schedule.

    Same optimiser, loss, batches and step count as `iterative_prune`, so a one-shot criterion followed by this
    gets the same fine-tuning budget as LoRA-guided pruning. Works on a copy; returns (model, loss per step),
    the model merged into plain weights unless `merge` is False (then a PeftModel). `checkpointing`
    recomputes each decoder layer in the backward pass instead of keeping its activations; `init` is how the
    factors start (`LORA_INITS`); `loss_fn` is what each step minimises (the next-token loss, or a
    `Distillation`'s loss against the dense model); with `parallel` every step is data-parallel (`train_step`).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    work = add_lora(copy.deepcopy(model), r=r, alpha=alpha, target=target, dropout=dropout, seed=seed, init=init)
    batches = as_batches(batches, batch_size)
    params = lora_params(lora_layers(work))
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]), activation_checkpointing(work, checkpointing):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        work.train()
        bar = tqdm(range(1, steps + 1), desc="lora-recover", unit="step", disable=not progress)
        for step in bar:
            losses.append(train_step(work, optimizer, batches[(step - 1) % len(batches)],
                                     loss_fn=loss_fn, parallel=parallel))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        bar.close()
        optimizer.zero_grad(set_to_none=True)
    work.eval()
    return (work.merge_and_unload() if merge else work), losses

