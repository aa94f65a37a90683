"""A folder that ONNX Runtime GenAI runs: the compact model deployed through ``onnxruntime_genai``.

The decode graph (``export_decode``) is already what GenAI's generic ``decoder`` model type drives: inputs
``input_ids``, ``attention_mask`` and ``past_key_i`` / ``past_value_i`` of shape ``[batch, kv_heads_i, past,
head_dim_i]`` with each layer's own static head count; outputs ``logits`` and ``present_*``. Positions are
computed from the mask inside the graph, so there is no ``position_ids`` input and no per-architecture position
logic for GenAI to get right. GenAI sizes its KV cache per layer from the graph's past inputs (per-layer
head counts since onnxruntime-genai PR #2214), so a model pruned unevenly across layers runs.

What GenAI cannot hold: a layer whose keys and values differ in heads or width (latent attention, as in
DeepSeek), since its cache keeps one shape per layer for both; and models that are not causal LMs with a KV
cache. Those are refused before anything is written, in one line.

The folder (``genai/``): ``model.onnx`` + ``model.onnx.data`` (external weights), ``genai_config.json`` and
the tokenizer files GenAI reads (``tokenizer.json``, ``tokenizer_config.json``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import nn

from loraprune.outputs import staged_folder
from loraprune.runtime.export import DEFAULT_OPSET, KVShape, export_decode, probe_kv_shapes

__all__ = ["CONFIG_NAME", "GenAIUnsupported", "export_genai", "genai_config", "genai_generate", "linked_genai_folder",
           "load_genai", "new_generator"]

CONFIG_NAME = "genai_config.json"
GRAPH_NAME = "model.onnx"
_PROVIDER_OPTIONS = {"cpu": [], "cuda": [{"cuda": {}}]}


class GenAIUnsupported(ValueError):
    """The model has a shape or kind that ONNX Runtime GenAI cannot represent (the message says which)."""


def _kv_shapes(model: nn.Module) -> list[KVShape]:
    name = type(model).__name__
    if not getattr(model, "can_generate", lambda: False)():
        raise GenAIUnsupported(f"{name} is not a causal language model with a KV cache; ONNX Runtime GenAI runs "
                               "only those")
    shapes = probe_kv_shapes(model)
    for i, s in enumerate(shapes):
        if (s.key_heads, s.key_dim) != (s.value_heads, s.value_dim):
            raise GenAIUnsupported(
                f"{name} layer {i} caches keys as {s.key_heads}x{s.key_dim} and values as {s.value_heads}x"
                f"{s.value_dim} (latent or asymmetric attention); ONNX Runtime GenAI's KV cache holds one shape "
                "per layer for both")
    return shapes


def _first(value: int | Sequence[int] | None) -> int | None:
    return value[0] if isinstance(value, list | tuple) else value


def _stated(name: str, *configs: object, default: int | None) -> int | None:
    """The first of `configs` that states `name` (a token id; 0 counts), else `default`."""
    return next((v for c in configs if (v := getattr(c, name, None)) is not None), default)


def genai_config(model: nn.Module, shapes: Sequence[KVShape], *, target: str = "cpu",
                 eos_token_id: int | Sequence[int] | None = None, graph: str = GRAPH_NAME,
                 threads: int | None = None) -> dict:
    """genai_config.json for the decode graph `graph` of `model`: the decoder section, token ids, search defaults.

    The head counts here are the first layer's; GenAI takes every layer's own from the graph's inputs.
    """
    session = {"log_id": "loraprune", "provider_options": _PROVIDER_OPTIONS[target]}
    if threads is not None:
        session |= {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config, generation = model.config, getattr(model, "generation_config", None)
    eos = eos_token_id if eos_token_id is not None else _stated("eos_token_id", generation, config, default=None)
    if eos is None:
        raise GenAIUnsupported(f"{type(model).__name__} states no EOS token id (config or generation config); "
                               "pass eos_token_id= (or a tokenizer that has one)")
    pad = _stated("pad_token_id", generation, config, default=_first(eos))
    bos = _stated("bos_token_id", generation, config, default=_first(eos))
    context = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": bos,
            "eos_token_id": list(eos) if isinstance(eos, list | tuple) else eos,
            "pad_token_id": pad,
            "context_length": context,
            "vocab_size": int(model.get_output_embeddings().out_features),
            "decoder": {
                "filename": graph,
                "session_options": session,
                "head_size": shapes[0].key_dim,
                "hidden_size": int(model.get_input_embeddings().embedding_dim),
                "num_attention_heads": int(getattr(config, "num_attention_heads", None) or shapes[0].key_heads),
                "num_key_value_heads": shapes[0].key_heads,
                "num_hidden_layers": len(shapes),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_%d", "past_value_names": "past_value_%d"},
                "outputs": {"logits": "logits",
                            "present_key_names": "present_key_%d", "present_value_names": "present_value_%d"},
            },
        },
        "search": {
            "do_sample": bool(getattr(generation, "do_sample", False)),
            "temperature": float(getattr(generation, "temperature", None) or 1.0),
            "top_k": int(getattr(generation, "top_k", None) or 50),
            "top_p": float(getattr(generation, "top_p", None) or 1.0),
            "max_length": context,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "repetition_penalty": 1.0,
            "past_present_share_buffer": False,  # the graph concatenates past and new keys itself
        },
    }


def export_genai(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, target: str = "cpu",
                 opset: int = DEFAULT_OPSET, fp16: bool = False, eos_token_id: int | Sequence[int] | None = None,
                 graph: str | os.PathLike | None = None) -> Path:
    """Write the GenAI folder of `model` to `out_dir`, whole or not at all (an earlier one is replaced).

    `tokenizer` (a transformers tokenizer) adds the tokenizer files, without which GenAI runs on token ids only.
    The EOS id is `eos_token_id`, else the tokenizer's, else the model's generation config or config.
    `graph` is a decode graph `export_decode` already wrote for this model, target and precision: it is
    hard-linked instead of exported a second time (the export is most of the folder's cost).
    Unsupported models raise :class:`GenAIUnsupported` before anything is written.
    """
    if target not in _PROVIDER_OPTIONS:
        raise ValueError(f"target must be one of {', '.join(_PROVIDER_OPTIONS)}, got {target!r}")
    shapes = _kv_shapes(model)
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eos_token_id
    name = GRAPH_NAME if graph is None else Path(graph).name
    config = genai_config(model, shapes, target=target, eos_token_id=eos_token_id, graph=name)
    out_dir = Path(out_dir)
    with staged_folder(out_dir, force=True, marker=CONFIG_NAME) as staged:
        if graph is None:
            export_decode(model, staged / GRAPH_NAME, opset=opset, fp16=fp16, external_data=True, target=target)
        else:
            _link_graph(Path(graph), staged)
        if tokenizer is not None:
            tokenizer.save_pretrained(staged)
        (staged / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def linked_genai_folder(model: nn.Module, graph: str | os.PathLike, out_dir: str | os.PathLike, *,
                        target: str = "cpu", threads: int | None = None) -> Path:
    """A GenAI folder around a decode graph `export_decode` already wrote: the graph (and its external data)
    hard-linked (copied across file systems), and a config with fixed threads. For the benchmark."""
    graph, out_dir = Path(graph), Path(out_dir)
    config = genai_config(model, _kv_shapes(model), target=target, graph=graph.name, threads=threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    _link_graph(graph, out_dir)
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def _link_graph(graph: Path, out_dir: Path) -> None:
    """The graph and its external data in `out_dir`, hard-linked (copied across file systems)."""
    for path in (graph, graph.with_name(graph.name + ".data")):
        if path.is_file():
            try:
                os.link(path, out_dir / path.name)
            except OSError:
                shutil.copy2(path, out_dir / path.name)


def load_genai(folder: str | os.PathLike):
    """An ``onnxruntime_genai.Model`` for `folder`, or one line saying why the folder is not one."""
    import onnxruntime_genai as og

    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}; `loraprune export DIR --genai` writes the GenAI "
                                "folder")
    try:
        return og.Model(str(folder))
    except Exception as err:  # noqa: BLE001 - GenAI raises a bare RuntimeError with ORT's pages of text
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"ONNX Runtime GenAI cannot load {folder}: {reason}") from None


def new_generator(model, batch: int, prompt_len: int, max_new_tokens: int, *, min_new_tokens: int = 0,
                  do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, seed: int = 0):
    """An ``onnxruntime_genai.Generator`` for `batch` prompts of `prompt_len` tokens, before any token is fed."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    options = {"max_length": prompt_len + max_new_tokens, "min_length": prompt_len + min_new_tokens,
               "do_sample": do_sample, "batch_size": batch}
    if do_sample:
        options |= {"temperature": temperature, "top_k": top_k, "random_seed": seed}
    params.set_search_options(**options)
    return og.Generator(model, params)


def genai_generate(model, input_ids: np.ndarray | Sequence[Sequence[int]], max_new_tokens: int, *,
                   min_new_tokens: int = 0, **sampling) -> np.ndarray:
    """Tokens ``[batch, prompt + new]`` from a GenAI model (:func:`load_genai`); stops at EOS (which GenAI leaves
    out of the sequence) unless `min_new_tokens` asks for more. `sampling`: do_sample, temperature, top_k, seed.
    Rows must share one prompt length: GenAI takes no padding mask here."""
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    generator = new_generator(model, ids.shape[0], ids.shape[1], max_new_tokens, min_new_tokens=min_new_tokens,
                              **sampling)
    generator.append_tokens(ids.astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return np.stack([np.asarray(generator.get_sequence(row), dtype=np.int64) for row in range(ids.shape[0])])
