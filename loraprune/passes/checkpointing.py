"""Activation checkpointing for the gradient passes (scoring and LoRA fine-tuning), in eval mode too.

At calibration sizes the activations a backward pass keeps, not the parameter gradients, make most of the
peak memory, which hides the very saving LoRA scoring is for (no weight-sized gradients). Checkpointing
every decoder layer keeps only each layer's input and recomputes the rest during the backward pass, at
the cost of one more forward. Transformers' own switch acts only in training mode, while scoring runs in
eval mode (no dropout), so this wraps the layers' forward directly, for the duration of a `with` block.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

__all__ = ["activation_checkpointing"]


@contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Checkpoint every transformers decoder layer of `model` inside the block; yields how many were wrapped.

    The KV cache is switched off meanwhile: a layer that appends to a cache would append twice when the
    backward pass replays it. Models without transformers' layer class run unchanged (0 layers).
    """
    if not enabled:
        yield 0
        return
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and hasattr(c, "use_cache")}
    use_cache = {key: c.use_cache for key, c in configs.items()}
    try:
        for c in configs.values():
            c.use_cache = False
        for layer in layers:
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
        yield len(layers)
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)  # the instance attribute; the class's forward shows through again
        for key, c in configs.items():
            c.use_cache = use_cache[key]
