"""Attention as ONNX Runtime's `com.microsoft::GroupQueryAttention` contrib op: the form for CUDA graphs.

ONNX Runtime's CUDA kernels for the standard opset-23 `Attention` op came late (before them, attention was
placed on the CPU in onnxruntime-gpu); GroupQueryAttention is the op ONNX Runtime GenAI runs on CUDA, with
flash and memory-efficient kernels. Each layer's node carries its own `num_heads` / `kv_num_heads`, read from
the layer's tensors while tracing, so a model pruned unevenly across layers exports as it is.

While exporting, an attention layer calls the torch op `loraprune::group_query_attention` (defined on first
use, with a reference implementation that computes GroupQueryAttention's semantics); the exporter translates
it into the contrib op, whose schema is known to ONNX only inside `gqa_schema()`. Hugging Face's cache has
already appended the new keys when attention runs, so the layer hands the op the past and the new part apart;
the op's own present outputs are not used. The model's mask (causal plus padding, left-padded rows included)
goes in as the additive `attention_bias`, so every row sees exactly the keys it sees in PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

import onnx
import torch
import torch.nn.functional as F
from onnx.defs import OpSchema

__all__ = ["GQA_OP", "gqa_attention", "gqa_schema", "gqa_translation"]

GQA_OP = "GroupQueryAttention"
_DOMAIN = "com.microsoft"


@cache
def _torch_op() -> Callable[..., torch.Tensor]:
    """`torch.ops.loraprune.group_query_attention`, defined the first time a CUDA graph is exported."""

    @torch.library.custom_op("loraprune::group_query_attention", mutates_args=())
    def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                              past_value: torch.Tensor, bias: torch.Tensor, num_heads: int, kv_num_heads: int,
                              scale: float) -> torch.Tensor:
        """query [b, s, heads·d], key / value [b, s, kv_heads·d], past [b, kv_heads, p, d], bias [b, 1, s, p+s]
        (additive) -> [b, s, heads·d]: causal attention of the new tokens over past and new keys."""
        b, s, _ = query.shape
        d = query.shape[-1] // num_heads
        q = query.view(b, s, num_heads, d).transpose(1, 2)
        k = torch.cat([past_key, key.view(b, s, kv_num_heads, d).transpose(1, 2)], dim=2)
        v = torch.cat([past_value, value.view(b, s, kv_num_heads, d).transpose(1, 2)], dim=2)
        causal = torch.ones(s, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - s)
        mask = bias.masked_fill(~causal, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(b, s, num_heads * d)

    @group_query_attention.register_fake
    def _(query, key, value, past_key, past_value, bias, num_heads, kv_num_heads, scale):
        return torch.empty_like(query)

    return torch.ops.loraprune.group_query_attention.default


def gqa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None) -> torch.Tensor:
    """HF attention-interface shapes in and out: query [b, heads, s, d], key / value [b, kv_heads, p+s, d] (the
    cache already extended), a boolean mask [b, 1, s, p+s] (True = attend) or None -> [b, s, heads, d]."""
    b, heads, s, d = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    if attention_mask is None:
        bias = query.new_zeros(b, 1, s, total)
    else:
        bias = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask.bool(), torch.finfo(query.dtype).min).expand(b, 1, s, total)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)

    def packed(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(b, s, -1)

    out = _torch_op()(packed(query), packed(key[:, :, total - s:]), packed(value[:, :, total - s:]),
                      key[:, :, : total - s], value[:, :, : total - s], bias, heads, kv_heads, float(scale))
    return out.view(b, s, heads, d)


def gqa_translation() -> dict:
    """The exporter's translation of the torch op into the contrib op (use inside `gqa_schema()`)."""
    import onnxscript
    from onnxscript import opset18 as op

    msft = onnxscript.values.Opset(_DOMAIN, 1)

    def group_query_attention(query, key, value, past_key, past_value, bias, num_heads: int, kv_num_heads: int,
                              scale: float):
        total = op.Shape(bias, start=3, end=4)
        batch = op.Shape(query, start=0, end=1)
        last = op.Expand(op.Sub(total, op.Constant(value_ints=[1])), batch)  # every key counted: the bias masks
        seqlens, total = op.Cast(last, to=onnx.TensorProto.INT32), op.Cast(total, to=onnx.TensorProto.INT32)
        out, _, _ = msft.GroupQueryAttention(query, key, value, past_key, past_value, seqlens, total, None, None,
                                             None, bias, num_heads=num_heads, kv_num_heads=kv_num_heads,
                                             scale=scale, _num_outputs=3)
        return out

    return {_torch_op(): group_query_attention}


def _param(name: str, kind: str, optional: bool = False) -> OpSchema.FormalParameter:
    option = OpSchema.FormalParameterOption.Optional if optional else OpSchema.FormalParameterOption.Single
    return OpSchema.FormalParameter(name, kind, param_option=option)


@contextmanager
def gqa_schema() -> Iterator[None]:
    """GroupQueryAttention's schema (the inputs and attributes used here) known to ONNX for the block only:
    the exporter checks every node it writes against a schema, and the contrib ops ship none with onnx."""
    inputs = [_param("query", "T"), *(_param(n, "T", True) for n in ("key", "value", "past_key", "past_value")),
              _param("seqlens_k", "M"), _param("total_sequence_length", "M"),
              *(_param(n, "T", True) for n in ("cos_cache", "sin_cache")),
              _param("position_ids", "tensor(int64)", True), _param("attention_bias", "T", True)]
    attributes = [OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                  OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, ""),
                  OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "")]
    schema = OpSchema(GQA_OP, _DOMAIN, 1, inputs=inputs,
                      outputs=[_param("output", "T"), _param("present_key", "T"), _param("present_value", "T")],
                      type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                                        ("M", ["tensor(int32)"], "")],
                      attributes=attributes)
    known = onnx.defs.has(GQA_OP, _DOMAIN)
    if not known:
        onnx.defs.register_schema(schema)
    try:
        yield
    finally:
        if not known:
            onnx.defs.deregister_schema(GQA_OP, 1, _DOMAIN)
