"""Fused attention in the exported graphs, decided layer by layer.

For a CPU target, from opset 23 on, torch's exporter turns each ``scaled_dot_product_attention`` call into one
standard ONNX ``Attention`` node and takes its head counts from that call's own tensor shapes; for a CUDA target
each layer becomes one ``com.microsoft::GroupQueryAttention`` node instead (``runtime.gqa``), with the layer's
own head counts as well. A non-uniformly pruned model
therefore gets the right counts in every layer without any global ``num_heads`` (the trap of pattern-matching
fusers, which read one count for the whole model).

Not every layer can be expressed by the fused op. While a Hugging Face model that uses SDPA is traced for
export, :func:`routed_attention` sends each attention layer through :func:`route`: the layer calls SDPA (one
fused node) unless a rule of ``UNFUSABLE`` names a reason it cannot, and then that layer alone runs the
model's own eager attention (plain MatMul/Softmax nodes), which computes the same thing unfused. The
decisions travel with the graph as ONNX metadata (``loraprune.attention``) so reports can say what is fused.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import onnx
import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from loraprune.runtime.gqa import GQA_OP, gqa_attention

__all__ = ["AttentionCall", "UnexpressibleAttention", "UNFUSABLE", "FUSED", "METADATA_KEY", "OP_METADATA_KEY",
           "ATTENTION_OPSET", "TARGETS", "routed_attention", "read_attention_plan", "attention_summary"]

FUSED = "fused"
METADATA_KEY = "loraprune.attention"
OP_METADATA_KEY = "loraprune.attention_op"
TARGETS = {"cpu": "Attention", "cuda": GQA_OP}  # deployment target -> the fused attention op of its graphs
_IMPLEMENTATION = "loraprune_routed"
ATTENTION_OPSET = 23  # the first opset with the standard Attention op


class UnexpressibleAttention(ValueError):
    """A layer the fused op cannot express and the model has no eager attention for."""


@dataclass(frozen=True)
class AttentionCall:
    """What one attention layer asks of the kernel during tracing: shapes ``[batch, heads, seq, dim]``."""

    layer: str
    query_heads: int
    kv_heads: int
    dropout: float
    opset: int
    kwargs: dict[str, Any]
    target: str = "cpu"
    causal: bool = True


def _opset(call: AttentionCall) -> str | None:
    if call.target == "cpu" and call.opset < ATTENTION_OPSET:
        return f"opset {call.opset} has no Attention op (needs {ATTENTION_OPSET})"
    return None


def _bidirectional(call: AttentionCall) -> str | None:
    if call.target == "cuda" and not call.causal:
        return "bidirectional attention (GroupQueryAttention is causal)"
    return None


def _dropout(call: AttentionCall) -> str | None:
    return f"attention dropout {call.dropout} (the fused op is inference-only)" if call.dropout else None


def _softcap(call: AttentionCall) -> str | None:
    return "logit soft-capping" if call.kwargs.get("softcap") is not None else None


def _sinks(call: AttentionCall) -> str | None:
    return "attention sinks" if call.kwargs.get("s_aux") is not None else None


def _grouping(call: AttentionCall) -> str | None:
    if call.kv_heads < 1 or call.query_heads % call.kv_heads:
        return f"{call.query_heads} query heads are not a multiple of {call.kv_heads} key/value heads"
    return None


# Each rule returns why the fused Attention op cannot express the call, or None.
UNFUSABLE: list[Callable[[AttentionCall], str | None]] = [_opset, _dropout, _softcap, _sinks, _grouping,
                                                         _bidirectional]


@dataclass
class _Routing:
    opset: int
    target: str
    names: dict[int, str]
    decisions: dict[str, str]


_ACTIVE: list[_Routing] = []


def route(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          attention_mask: torch.Tensor | None, dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """An attention implementation for transformers: SDPA where the fused op can express it, else eager."""
    routing = _ACTIVE[-1]
    call = AttentionCall(routing.names.get(id(module), type(module).__name__), int(query.shape[1]),
                         int(key.shape[1]), float(dropout), routing.opset, kwargs, routing.target,
                         bool(getattr(module, "is_causal", True)))
    reason = next((r for rule in UNFUSABLE if (r := rule(call)) is not None), None)
    routing.decisions[call.layer] = FUSED if reason is None else reason
    if reason is None and routing.target == "cuda":
        return gqa_attention(module, query, key, value, attention_mask, kwargs.get("scaling")), None
    if reason is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise UnexpressibleAttention(f"{call.layer}: the fused Attention op cannot express this layer ({reason}) and "
                         f"{type(module).__module__} has no eager_attention_forward to fall back to")
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        blocked = torch.finfo(query.dtype).min
        attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(~attention_mask, blocked)
    return eager(module, query, key, value, attention_mask, dropout=dropout, **kwargs)


@contextmanager
def _registered() -> Iterator[None]:
    """`route` known to transformers for the block only. Masks are built per attention implementation, and an
    unknown one gets none at all: it gets SDPA's (boolean, True = attend), which `route` turns into the additive
    float mask that eager attention adds to its scores."""
    AttentionInterface.register(_IMPLEMENTATION, route)
    AttentionMaskInterface.register(_IMPLEMENTATION, sdpa_mask)
    try:
        yield
    finally:
        if not _ACTIVE:  # an outer routing still needs it
            AttentionInterface._global_mapping.pop(_IMPLEMENTATION, None)
            AttentionMaskInterface._global_mapping.pop(_IMPLEMENTATION, None)


@contextmanager
def routed_attention(model: nn.Module, opset: int, target: str = "cpu") -> Iterator[dict[str, str]]:
    """Route the model's attention layers through :func:`route` while exporting for `target` (a key of
    `TARGETS`); yields the decisions.

    Only models that already use SDPA are routed: the fused op computes SDPA's semantics, and a model that
    asked for eager attention (or has its own) is left as it is, with no decisions recorded.
    """
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        yield {}
        return
    with _registered():
        try:
            model.set_attn_implementation(_IMPLEMENTATION)
        except (ValueError, ImportError):
            # a model class that takes no custom attention is exported as it is: at opset 23 its SDPA calls still
            # become fused nodes, only without a per-layer check and record
            yield {}
            return
        routing = _Routing(opset, target, {id(m): name for name, m in model.named_modules()}, {})
        _ACTIVE.append(routing)
        try:
            yield routing.decisions
        finally:
            model.set_attn_implementation("sdpa")
            _ACTIVE.remove(routing)


def _metadata(path: str | os.PathLike) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


def read_attention_plan(path: str | os.PathLike) -> dict[str, str]:
    """The per-layer decisions stored in an exported graph ({} for graphs that were not routed)."""
    return json.loads(_metadata(path).get(METADATA_KEY, "{}"))


def attention_summary(path: str | os.PathLike) -> dict[str, Any]:
    """For reports: the fused op of a graph's attention layers, how many use it, and why the others do not
    (they run as plain MatMul / Softmax nodes)."""
    meta = _metadata(path)
    plan = json.loads(meta.get(METADATA_KEY, "{}"))
    return {"op": meta.get(OP_METADATA_KEY, TARGETS["cpu"]), "layers": len(plan),
            "fused": sum(v == FUSED for v in plan.values()),
            "unfused": {layer: why for layer, why in sorted(plan.items()) if why != FUSED}}
