"""Verification of a rewrite: the compact model must compute what the masked dense model computes.

The rewrite invariant (design.md) is checked on every prune, not only in the tests: a wrong group would be a
silent corruption, and this turns it into a recorded, visible figure. Hidden-size pruning is not exact under
normalisation layers, so there the difference is recorded but not held to the tolerance.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["compact_logits", "compare_logits", "logits", "model_dtype", "tolerance"]

RELATIVE_TOLERANCE = 1e-4  # fp32; lower precisions get a bound from their rounding (`tolerance`)


def logits(model: nn.Module, inputs: tuple) -> torch.Tensor:
    """Float logits (or first output) of `model` on `inputs` in eval mode (the previous mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        model.train(was_training)
    if getattr(out, "logits", None) is not None:
        out = out.logits
    elif hasattr(out, "to_tuple"):  # other HF outputs (e.g. an encoder's last_hidden_state)
        out = out.to_tuple()[0]
    elif isinstance(out, tuple | list):
        out = out[0]
    return out.detach().float()


def compact_logits(model: nn.Module, inputs: tuple) -> torch.Tensor:
    """`logits` of a rewritten model. A forward that fails at the new sizes means the model's code fixes a size
    the rewrite cannot patch (a literal partition count, say): a clear error, not a stray shape message."""
    try:
        return logits(model, inputs)
    except (RuntimeError, ValueError, IndexError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RuntimeError(f"rewrite verification failed: the compact {type(model).__name__} does not run "
                           f"({first}); its code fixes a size that the rewrite could not patch") from err


def tolerance(dtype: torch.dtype) -> float:
    """The relative bound two computations of the same function may differ by in `dtype`: 1e-4 in fp32, eight
    units of rounding in fp16 / bf16 (summation order differs between the dense and the compact matmuls)."""
    return max(RELATIVE_TOLERANCE, 8 * torch.finfo(dtype).eps)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: that of its first floating-point parameter (fp32 if none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def compare_logits(reference: torch.Tensor, compact: torch.Tensor, exact: bool = True,
                   dtype: torch.dtype = torch.float32) -> dict:
    """Max absolute difference (in fp32) relative to the reference's largest magnitude; `ok` when within the
    tolerance of `dtype`, the precision both were computed in (always True for an approximate rewrite, whose
    difference is only reported)."""
    if reference.shape != compact.shape:
        raise RuntimeError(f"rewrite verification failed: logits shape {tuple(compact.shape)} != "
                           f"{tuple(reference.shape)}")
    reference, compact = reference.float(), compact.float().to(reference.device)
    diff = float((reference - compact).abs().max()) if reference.numel() else 0.0
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    relative = diff / max(scale, 1e-12)
    bound = tolerance(dtype)
    return {"max_abs_diff": diff, "relative_diff": relative, "exact": exact, "tolerance": bound,
            "ok": bool(not exact or relative <= bound)}
