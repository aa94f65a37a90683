"""ONNX export of Hugging Face causal LMs: a prefill graph and a KV-cache decode graph.

Pruned models are non-uniform: every layer may keep a different number of query heads, KV heads and
MLP channels, while the config still holds the dense numbers. So nothing here reads a head count
from the config; the per-layer KV shapes come from one probe run with ``use_cache=True``.

Both graphs are exported with ``torch.onnx.export(..., dynamo=True)`` and dynamic batch / sequence
/ past axes. The example inputs avoid sizes 0 and 1 (torch.export specialises a dim sampled at 0/1
to a constant), yet the graphs run at batch 1, one new token and past length 0: the tests check it.

Attention: at opset 23 (the default) each layer's attention is one fused ONNX ``Attention`` node with that
layer's own head counts, or, where the fused op cannot express a layer, that layer's unfused eager graph;
``runtime/attention.py`` decides per layer and stores the decisions in the file's metadata.

Complex arithmetic (Llama 4's rotary in complex numbers) is rewritten into real arithmetic before the converter
sees the program (``runtime/complex.py``): the converter has no complex tensors.

The decode graph takes ``past_key_i``/``past_value_i`` for every layer and returns
``present_key_i``/``present_value_i``; with past length 0 it is also the first (prompt) step, so a
generation loop needs only this one graph. The prefill graph (logits only, optionally presents too)
is the lean one for scoring and benchmarks.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental import _config as fx_config
from transformers import DynamicCache

from loraprune.runtime.attention import (
    ATTENTION_OPSET,
    METADATA_KEY,
    OP_METADATA_KEY,
    TARGETS,
    UnexpressibleAttention,
    routed_attention,
)
from loraprune.runtime.complex import realify_complex
from loraprune.runtime.gqa import gqa_schema, gqa_translation

__all__ = [
    "KVShape", "probe_kv_shapes", "kv_input_names", "kv_output_names", "export_prefill", "export_decode",
    "staged_output", "DEFAULT_OPSET",
]

# Opset 23 brings the standard Attention, RotaryEmbedding and RMSNormalization ops: the exporter turns every
# scaled_dot_product_attention call into one fused Attention node whose head counts come from that layer's
# own tensor shapes, so a non-uniformly pruned model needs no global head count anywhere.
DEFAULT_OPSET = ATTENTION_OPSET

# Example sizes for tracing: >= 2 so no dim is specialised, pairwise distinct so no two dims are unified.
_EX_BATCH, _EX_SEQ, _EX_PAST = 2, 3, 5


@dataclass(frozen=True)
class KVShape:
    """One layer's cache geometry: ``[batch, heads, seq, dim]`` for keys and values (they may differ)."""

    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int


def _cache_layers(cache: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer from a transformers 5 ``Cache`` or a legacy tuple of tuples."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(kv[0], kv[1]) for kv in cache]


def probe_kv_shapes(model: nn.Module) -> list[KVShape]:
    """Per-layer KV geometry, read from the cache of one tiny forward pass (never from the config)."""
    device = next(model.parameters()).device
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    layers = _cache_layers(out.past_key_values)
    if not layers:
        raise ValueError(f"{type(model).__name__} returned no KV cache with use_cache=True")
    return [KVShape(k.shape[1], k.shape[3], v.shape[1], v.shape[3]) for k, v in layers]


def kv_input_names(n_layers: int) -> list[str]:
    """Flat past names in graph order: past_key_0, past_value_0, past_key_1, ..."""
    return [f"past_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def kv_output_names(n_layers: int) -> list[str]:
    """Flat present names in graph order: present_key_0, present_value_0, ..."""
    return [f"present_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def _position_ids(attention_mask: torch.Tensor, new_len: int) -> torch.Tensor:
    """Positions of the new tokens counted over the mask: left-padded rows start at 0, as in generate."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -new_len:]


class _CausalLMGraph(nn.Module):
    """Flat-tensor face of an HF causal LM: ``(input_ids, attention_mask, *past) -> (logits, *present)``.

    ONNX graphs take and return flat tensors, while the model wants a ``DynamicCache``; this builds
    one per call from the past tensors (each layer keeps its own head count) and flattens it back.
    The cache is built without the config on purpose: config-driven layer types would read dense
    settings. Sliding-window layers are treated as full attention, exact while the total length stays
    within the window.
    """

    def __init__(self, model: nn.Module, n_layers: int, with_past: bool, with_present: bool) -> None:
        super().__init__()
        self.model = model
        self.n_layers = n_layers
        self.with_past = with_past
        self.with_present = with_present
        self.takes_positions = "position_ids" in inspect.signature(model.forward).parameters
        self.train(model.training)  # a fresh Module says training; follow the (eval) model instead

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs: dict[str, object] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                     "use_cache": self.with_present}
        if self.takes_positions:
            kwargs["position_ids"] = _position_ids(attention_mask, input_ids.shape[1])
        if self.with_past:
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)]
            kwargs["past_key_values"] = DynamicCache(pairs)
        elif self.with_present:
            kwargs["past_key_values"] = DynamicCache()
        out = self.model(**kwargs)
        if not self.with_present:
            return (out.logits,)
        flat = [t for kv in _cache_layers(out.past_key_values) for t in kv]
        return (out.logits, *flat)


@contextmanager
def _traceable(model: nn.Module, fp16: bool) -> Iterator[nn.Module]:
    """The module to trace, in eval mode: the model itself, or a copy in the graph's dtype (fp16, or fp32 for a
    model that computes in bf16 or fp16); the caller's model's mode is restored.

    A copy briefly holds the weights twice (deepcopy, then cast); it keeps the caller's weights exact, which an
    in-place cast and back would not.
    """
    target = torch.float16 if fp16 else torch.float32
    was_training = model.training
    try:
        if next(model.parameters()).dtype != target:
            traced = cast_weights(copy.deepcopy(model), target).eval()
        else:
            traced = model.eval()
        with _exportable_experts(traced):
            yield traced
    finally:
        model.train(was_training)


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Parameters and saved buffers to `dtype`, in place; buffers the model computes for itself (rotary
    `inv_freq` and the like, which are not saved) keep their precision. `Module.to(float16)` would cast
    `inv_freq` too, and the rotary angles' error would then grow with the position."""
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and name not in module._non_persistent_buffers_set:
                setattr(module, name, buffer.to(dtype))
    return model


# transformers' default MoE kernel (grouped_mm) is a custom op that torch.onnx cannot convert; the batched form
# (each token gathers its experts' weights) is plain Gather + MatMul and computes the same.
_EXPORT_EXPERTS = "batched_mm"


@contextmanager
def _exportable_experts(model: nn.Module) -> Iterator[None]:
    """Mixture-of-experts layers in their exportable form while tracing; the model's own choice comes back."""
    can_set = getattr(model, "_can_set_experts_implementation", None)
    before = getattr(getattr(model, "config", None), "_experts_implementation", None)
    if not callable(can_set) or not can_set() or before in (None, _EXPORT_EXPERTS):
        yield
        return
    model.set_experts_implementation(_EXPORT_EXPERTS)
    try:
        yield
    finally:
        model.set_experts_implementation(before)


@contextmanager
def _without_pairwise_rewrites() -> Iterator[None]:
    """The exporter's optimizer without onnxscript's SlicesSplit rule, while exporting. Its pattern has two roots
    (two Slices of one tensor), so its matcher tries every pair of Slice nodes in the graph: on SmolLM2 (4,800
    nodes) leaving it out took 26-52 s off each graph's 95-138 s export (tools/results/export_time/), with the
    same graphs, as it matched nothing there. Every other optimizer step (constant folding, the one-root
    rules, cleanup) still runs."""
    from onnxscript import rewriter

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)  # private: an onnxscript without it exports as is
    if rules is None:
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if getattr(r, "name", None) != "SlicesSplit")
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


@contextmanager
def _broadcast_kv_as_gqa() -> Iterator[None]:
    """While tracing, an SDPA call with one K/V head broadcast over several query heads (Falcon's multi-query
    attention calls it directly) is made with `enable_gqa`: the same result, and a form torch's ONNX converter
    takes (one KV group), where it refuses unequal head counts without the flag."""
    sdpa = F.scaled_dot_product_attention

    def call(query, key, value, *args, **kwargs):
        if len(args) < 5 and query.dim() == 4 and key.shape[1] == value.shape[1] == 1 < query.shape[1]:
            kwargs["enable_gqa"] = True
        return sdpa(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = call
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


@contextmanager
def staged_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a path of the same name inside a hidden staging folder beside ``path``.

    When the block succeeds, the staged files move into place with ``os.replace`` (side files such as
    external data first, the graph last, so a visible graph always has its data); whatever happens,
    the staging folder is removed, so a failure leaves nothing half-written. Keeping the final file
    name while staging matters: an external-data graph refers to its data file by name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        staged = staging / path.name
        yield staged
        # side files of the graph only (model.onnx.data), never stray exporter artifacts
        extra = sorted(p for p in staging.iterdir() if p.name.startswith(path.name) and p != staged)
        stale = path.with_name(path.name + ".data")
        if not extra and stale.exists():  # an earlier, larger export's data file would mislead
            stale.unlink()
        for p in extra:
            os.replace(p, path.parent / p.name)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _export(wrapper: nn.Module, args: tuple, dynamic_shapes: tuple, input_names: list[str],
            output_names: list[str], path: str | os.PathLike, opset: int, external_data: bool | None,
            target: str) -> Path:
    """torch.onnx.export with attention routed per layer for `target`, save (external data: forced, refused, or
    None = only past 2 GB) with the routing decisions and the attention op as metadata, check, move."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    path = Path(path)
    cuda = target == "cuda"
    with (staged_output(path) as staged, routed_attention(wrapper.model, opset, target) as decisions,
          _broadcast_kv_as_gqa(), _without_pairwise_rewrites(), gqa_schema() if cuda else nullcontext()):
        with torch.no_grad():
            try:
                program = torch.onnx.export(
                    _captured(wrapper, args, dynamic_shapes), args, dynamo=True, opset_version=opset,
                    dynamic_shapes=dynamic_shapes, input_names=input_names, output_names=output_names,
                    artifacts_dir=staged.parent, verbose=False,
                    custom_translation_table=gqa_translation() if cuda else None,
                )
            except Exception as err:  # the exporter wraps errors raised while tracing into pages of text
                cause = _cause_of_type(err, UnexpressibleAttention)
                if cause is not None:
                    raise cause from None
                if isinstance(err, torch.onnx.errors.OnnxExporterError):
                    raise RuntimeError(_export_failure(err)) from err
                raise
        if decisions:
            program.model.metadata_props[METADATA_KEY] = json.dumps(decisions, sort_keys=True)
            program.model.metadata_props[OP_METADATA_KEY] = TARGETS[target]
        program.save(staged, external_data=external_data)
        onnx.checker.check_model(str(staged))
    return path


def _captured(wrapper: nn.Module, args: tuple, dynamic_shapes: tuple) -> nn.Module | torch.export.ExportedProgram:
    """The program torch.onnx captures first (torch.export, non-strict, with its settings), its complex arithmetic
    rewritten into real arithmetic (``runtime/complex.py``: the converter has no complex tensors). When that capture
    fails, the module itself, so the exporter's other capture strategies and its error text still apply."""
    try:
        with fx_config.patch(backed_size_oblivious=True):  # as torch.onnx does: dims sampled at 0/1 stay dynamic
            program = torch.export.export(wrapper, args, dynamic_shapes=dynamic_shapes, strict=False,
                                          prefer_deferred_runtime_asserts_over_guards=True)
    except UnexpressibleAttention:
        raise
    except Exception:
        return wrapper
    if realify_complex(program.graph_module.graph):
        program.graph_module.recompile()
    return program


def _causes(err: BaseException) -> list[BaseException]:
    """`err` and its chain of causes and contexts, outermost first."""
    chain: list[BaseException] = []
    while err is not None and all(err is not e for e in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _export_failure(err: BaseException) -> str:
    """The exporter's pages of advice as one line: the node it stopped at and the innermost reason."""
    chain = _causes(err)
    node = next((m for e in chain if (m := re.search(r"translating node %(\S+) .*?target=([\w.]+)", str(e)))), None)
    reason = re.sub(r"\x1b\[[0-9;]*m", "", str(chain[-1])).strip().splitlines()
    where = f" at node {node.group(1)} ({node.group(2)})" if node else ""
    return f"ONNX export failed{where}: {reason[0] if reason else type(chain[-1]).__name__}"


def _cause_of_type(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of `kind` in the chain of causes and contexts of `err`."""
    return next((e for e in _causes(err) if isinstance(e, kind)), None)


def _dims() -> tuple[torch.export.Dim, torch.export.Dim, torch.export.Dim, torch.export.Dim]:
    """batch, new tokens, past length (0 allowed at run time) and mask length (past + new)."""
    dim = torch.export.Dim
    return dim("batch", min=1), dim("seq", min=1), dim("past", min=0), dim("total", min=1)


def _example_ids(model: nn.Module, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    vocab = int(model.get_input_embeddings().num_embeddings)
    ids = torch.arange(batch * seq, device=device).reshape(batch, seq) % vocab
    return ids, torch.ones((batch, seq), dtype=torch.long, device=device)


def graph_name(stage: str, target: str = "cpu", fp16: bool = False) -> str:
    """A graph's file name in a compiled folder's onnx/: prefill.onnx, decode_cuda.onnx, prefill_fp16.onnx, ..."""
    return f"{stage}{'_cuda' if target == 'cuda' else ''}{'_fp16' if fp16 else ''}.onnx"


def export_prefill(model: nn.Module, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, fp16: bool = False,
                   with_cache: bool = False, external_data: bool | None = None, target: str = "cpu") -> Path:
    """Export ``input_ids, attention_mask [batch, seq] -> logits [batch, seq, vocab]`` to ``path``.

    ``with_cache=True`` also returns ``present_key_i``/``present_value_i`` (the prompt's KV cache), so the
    graph can start a generation loop; the default graph skips them and is the cheaper one to time.
    ``fp16`` traces a float16 copy (the caller's model is left as it is); ``external_data`` None writes
    weights beside the graph (``<name>.data``) only past ONNX's 2 GB protobuf limit. ``target`` "cpu" fuses
    attention into the standard Attention op, "cuda" into GroupQueryAttention (``runtime.gqa``).
    """
    with _traceable(model, fp16) as traced:
        n_layers = len(probe_kv_shapes(traced)) if with_cache else 0
        wrapper = _CausalLMGraph(traced, n_layers, with_past=False, with_present=with_cache)
        batch, seq, _, _ = _dims()
        ids, mask = _example_ids(traced, _EX_BATCH, _EX_SEQ + _EX_PAST)
        outputs = ["logits"] + kv_output_names(n_layers)
        return _export(wrapper, (ids, mask), ({0: batch, 1: seq}, {0: batch, 1: seq}),
                       ["input_ids", "attention_mask"], outputs, path, opset, external_data, target)


def export_decode(model: nn.Module, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, fp16: bool = False,
                  external_data: bool | None = None, target: str = "cpu") -> Path:
    """Export the KV-cache step ``(input_ids, attention_mask, past_*) -> (logits, present_*)`` to ``path``.

    Shapes: ``input_ids [batch, seq]``, ``attention_mask [batch, past + seq]``, ``past_key_i
    [batch, heads_i, past, dim_i]`` with each layer's own head count from :func:`probe_kv_shapes`. Past
    length 0 (empty tensors) makes it the prompt step as well, so generation needs only this graph.
    ``fp16``, ``external_data`` and ``target`` as in :func:`export_prefill`; with fp16 the past/present tensors
    are fp16.
    """
    with _traceable(model, fp16) as traced:
        shapes = probe_kv_shapes(traced)
        n_layers = len(shapes)
        wrapper = _CausalLMGraph(traced, n_layers, with_past=True, with_present=True)
        batch, seq, past_len, total = _dims()
        ids, _ = _example_ids(traced, _EX_BATCH, _EX_SEQ)
        param = next(traced.parameters())
        mask = torch.ones((_EX_BATCH, _EX_PAST + _EX_SEQ), dtype=torch.long, device=param.device)
        like = {"dtype": param.dtype, "device": param.device}
        past = []
        for s in shapes:
            past.append(torch.randn(_EX_BATCH, s.key_heads, _EX_PAST, s.key_dim, **like))
            past.append(torch.randn(_EX_BATCH, s.value_heads, _EX_PAST, s.value_dim, **like))
        past_dims = tuple({0: batch, 2: past_len} for _ in past)
        return _export(wrapper, (ids, mask, *past), ({0: batch, 1: seq}, {0: batch, 1: total}, past_dims),
                       ["input_ids", "attention_mask"] + kv_input_names(n_layers),
                       ["logits"] + kv_output_names(n_layers), path, opset, external_data, target)
