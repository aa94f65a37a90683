"""Token generation on ONNX Runtime with the exported KV-cache graphs.

The first step feeds the whole prompt. It runs on the decode graph with empty past tensors (past
length 0), which needs no second graph, or on a prefill graph exported with ``with_cache=True``
when one is given. Every later step feeds one token per row plus the previous step's presents.
Greedy decoding reproduces ``model.generate(do_sample=False)`` token for token. Rows that emit
EOS are padded, as transformers does, and the loop stops once every row has finished.

The KV cache never leaves the session's device: each step's presents are bound, as OrtValues, as the
next step's pasts, and every step's logits go into one buffer allocated before the loop. Only the last
position's logits (``batch x vocab``) come to the host, where the next token is chosen.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from loraprune.runtime.session import as_session, device_buffer, run_with_iobinding

__all__ = ["ort_generate"]

SessionLike = ort.InferenceSession | str | os.PathLike

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def _np_type(inp: ort.NodeArg) -> type:
    if inp.type not in _NP_TYPES:  # e.g. bfloat16, which numpy cannot feed
        raise ValueError(f"graph input {inp.name} has type {inp.type}, which the numpy loop cannot feed")
    return _NP_TYPES[inp.type]


def _empty_past(session: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past tensors ``[batch, heads_i, 0, dim_i]``, shaped per layer from the graph inputs."""
    past = {}
    for inp in session.get_inputs():
        if inp.name.startswith("past_"):
            heads, dim = inp.shape[1], inp.shape[3]
            if not isinstance(heads, int) or not isinstance(dim, int):
                raise ValueError(f"decode graph input {inp.name} has no static heads/head_dim: {inp.shape}")
            past[inp.name] = np.zeros((batch, heads, 0, dim), dtype=_np_type(inp))
    return past


def _input_dtype(session: ort.InferenceSession, name: str) -> type:
    return next(_np_type(i) for i in session.get_inputs() if i.name == name)


def _named(session: ort.InferenceSession, values: list[ort.OrtValue]) -> dict[str, ort.OrtValue]:
    return {o.name: v for o, v in zip(session.get_outputs(), values, strict=True)}


def _step_logits_buffer(session: ort.InferenceSession, batch: int) -> dict[str, ort.OrtValue]:
    """The one-token step's ``logits [batch, 1, vocab]`` buffer, when the graph states vocab and its type."""
    out = next(o for o in session.get_outputs() if o.name == "logits")
    vocab = out.shape[-1]
    if not isinstance(vocab, int) or out.type not in _NP_TYPES:
        return {}
    return {"logits": device_buffer(session, (batch, 1, vocab), _NP_TYPES[out.type])}


def _next_tokens(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Greedy argmax, or a sample from softmax(logits / temperature) restricted to the top k."""
    logits = logits.astype(np.float64)
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    cdf = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1)
    draws = rng.random((logits.shape[0], 1))
    return np.minimum((cdf < draws).sum(-1), logits.shape[-1] - 1)


def ort_generate(prefill_session_or_path: SessionLike | None, decode_session_or_path: SessionLike,
                 input_ids: np.ndarray | Sequence[Sequence[int]], max_new_tokens: int, *,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, seed: int = 0,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 attention_mask: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """Generate ``max_new_tokens`` tokens per row; returns ``[batch, prompt + new]`` int64 like HF generate.

    ``prefill_session_or_path`` may be None: the decode graph then runs the prompt step at past length
    0. A prefill graph given here must carry ``present_*`` outputs (``export_prefill(with_cache=True)``),
    since the loop needs the prompt's cache. ``attention_mask`` (1 = real token) allows left-padded
    batches; positions are counted over it inside the graph. Finished rows get ``pad_token_id``
    (default: the first EOS id).
    """
    decode = as_session(decode_session_or_path, threads)
    prefill = as_session(prefill_session_or_path, threads) if prefill_session_or_path is not None else None
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    if max_new_tokens <= 0:
        return ids
    batch = ids.shape[0]
    mask_dtype = _input_dtype(decode, "attention_mask")
    mask = (np.ones(ids.shape, mask_dtype) if attention_mask is None
            else np.asarray(attention_mask, dtype=mask_dtype))
    eos = [int(eos_token_id)] if isinstance(eos_token_id, int | np.integer) else list(eos_token_id or [])
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    past_names = [i.name for i in decode.get_inputs() if i.name.startswith("past_")]

    if prefill is None:
        first, feeds = decode, {"input_ids": ids, "attention_mask": mask, **_empty_past(decode, batch)}
    else:
        present = {n.replace("past_", "present_", 1) for n in past_names}
        missing = sorted(present - {o.name for o in prefill.get_outputs()})
        if missing:
            raise ValueError(f"prefill graph lacks {len(missing)} present_* outputs (e.g. {missing[0]}): "
                             "export it with export_prefill(..., with_cache=True), "
                             "or pass None to start on the decode graph")
        first, feeds = prefill, {"input_ids": ids, "attention_mask": mask}
    outs = _named(first, run_with_iobinding(first, feeds))

    rng = np.random.default_rng(seed)
    finished = np.zeros(batch, dtype=bool)
    new_tokens: list[np.ndarray] = []
    step_logits = _step_logits_buffer(decode, batch)
    for step in range(max_new_tokens):
        token = _next_tokens(outs["logits"].numpy()[:, -1, :], do_sample, temperature, top_k, rng)
        token = np.where(finished, pad, token).astype(np.int64)
        if eos:
            finished |= np.isin(token, eos)
        new_tokens.append(token)
        if finished.all() or step == max_new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((batch, 1), mask_dtype)], axis=1)
        feeds = {"input_ids": token[:, None], "attention_mask": mask}
        feeds.update({n: outs[n.replace("past_", "present_", 1)] for n in past_names})
        outs = _named(decode, run_with_iobinding(decode, feeds, buffers=step_logits))
    return np.concatenate([ids, np.stack(new_tokens, axis=1)], axis=1)
