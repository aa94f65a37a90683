"""ONNX Runtime's transformer optimizer, applied only where it keeps the graph's numbers.

``onnxruntime.transformers.optimizer`` fuses attention, (skip-)layer-norm, RMSNorm and GELU by
matching patterns, and its attention fusion assumes one head count for the whole model. A pruned
model has a different one in every layer, so a fusion may silently assume the wrong one. Every
optimized graph is therefore run against the original on random inputs, and the original is kept
when outputs differ or when the optimizer raises. The result says which graph to use and why.

The generic fusions live in the ``bert`` optimizer (``gpt2`` adds a GPT-2 attention pattern that
dynamo-exported graphs do not match, and it fails on some of them). On graphs from
``torch.onnx.export(dynamo=True)`` the norm and GELU fusions apply; attention usually does not.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from loraprune.runtime.export import staged_output
from loraprune.runtime.session import make_session

__all__ = ["OptimizeResult", "optimize_for_ort", "random_feeds"]

_TWO_GB = 2**31
# Sizes for the parity run; "total" is the attention-mask length of a decode graph (past + seq).
_DIM_SIZES = {"batch": 2, "seq": 4, "past": 3}
_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


@dataclass(frozen=True)
class OptimizeResult:
    """Which graph to use (``path``), whether it is the optimized one, and the evidence for it."""

    path: Path
    optimized: bool
    reason: str
    max_abs_diff: float | None = None
    fused_ops: dict[str, int] = field(default_factory=dict)


def random_feeds(session: ort.InferenceSession, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for any graph of ours: ids below the vocab size, all-ones masks, normal floats."""
    rng = np.random.default_rng(seed)
    logits = next((o for o in session.get_outputs() if o.name == "logits"), None)
    vocab = logits.shape[-1] if logits is not None and isinstance(logits.shape[-1], int) else 2
    sizes = {**_DIM_SIZES, "total": _DIM_SIZES["past"] + _DIM_SIZES["seq"]}
    feeds = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) else sizes.get(d, 2) for d in inp.shape]
        if inp.type in _INT_TYPES:
            ints = rng.integers(0, vocab, shape) if inp.name == "input_ids" else np.ones(shape)
            feeds[inp.name] = ints.astype(_INT_TYPES[inp.type])
        elif inp.type in _FLOAT_TYPES:
            feeds[inp.name] = rng.standard_normal(shape).astype(_FLOAT_TYPES[inp.type])
        else:
            raise ValueError(f"no random feed for input {inp.name} of type {inp.type}")
    return feeds


def _op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def optimize_for_ort(path: str | os.PathLike, out_path: str | os.PathLike | None = None, *,
                     model_type: str = "bert", use_gpu: bool = False, provider: str = "cpu",
                     rtol: float = 1e-3, atol: float = 1e-4, threads: int | None = 1,
                     seed: int = 0) -> OptimizeResult:
    """Fuse with ORT's transformer optimizer into ``out_path`` (default ``<stem>.opt.onnx``) if parity holds.

    Parity: every output of the optimized graph must be ``allclose(rtol, atol)`` to the original's
    on the same random inputs, run on ``provider``. Otherwise nothing is written and the original
    ``path`` comes back with the reason.
    """
    from onnxruntime.transformers.optimizer import optimize_model  # heavy import, only when used

    path = Path(path)
    out_path = Path(out_path) if out_path is not None else path.with_name(f"{path.stem}.opt.onnx")
    base = make_session(path, provider=provider, threads=threads)
    try:
        # num_heads=0 / hidden_size=0: let each fusion read shapes from the graph, never one global count.
        opt = optimize_model(str(path), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                             use_gpu=use_gpu)
    except Exception as err:  # noqa: BLE001 - any optimizer failure means "keep the original"
        return OptimizeResult(path, False, f"optimizer raised {type(err).__name__}: {err}")
    before, after = _op_counts(onnx.load(str(path), load_external_data=False)), _op_counts(opt.model)
    fused = {op: n for op, n in (after - before).items()}
    if not fused:
        return OptimizeResult(path, False, "optimizer found nothing to fuse")

    try:
        with staged_output(out_path) as staged:  # leaving by _Rejected writes nothing
            opt.save_model_to_file(str(staged), use_external_data_format=opt.model.ByteSize() >= _TWO_GB)
            diff = _check_parity(base, staged, provider, threads, rtol, atol, seed)
    except _Rejected as rej:
        return OptimizeResult(path, False, rej.reason, rej.diff, fused)
    return OptimizeResult(out_path, True, f"parity holds (max abs diff {diff:.2e})", diff, fused)


class _Rejected(Exception):
    """The optimized graph failed a check; carries the reason for OptimizeResult."""

    def __init__(self, reason: str, diff: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.diff = reason, diff


def _check_parity(base: ort.InferenceSession, candidate_path: Path, provider: str, threads: int | None,
                  rtol: float, atol: float, seed: int) -> float:
    """Max abs difference over all outputs on one random feed; raises _Rejected when not allclose."""
    try:
        candidate = make_session(candidate_path, provider=provider, threads=threads)
    except Exception as err:  # noqa: BLE001 - e.g. a fused op without a kernel on this provider
        raise _Rejected(f"optimized graph does not load: {type(err).__name__}: {err}") from None
    feeds = random_feeds(base, seed)
    ref, got = base.run(None, feeds), candidate.run(None, feeds)
    for name, a, b in zip([o.name for o in base.get_outputs()], ref, got, strict=True):
        if a.shape != b.shape:
            raise _Rejected(f"parity fails: output {name} has shape {b.shape}, expected {a.shape}")
    pairs = list(zip(ref, got, strict=True))
    diff = max(float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) for a, b in pairs)
    if not all(np.allclose(b, a, rtol=rtol, atol=atol) for a, b in pairs):
        raise _Rejected(f"parity fails: max abs diff {diff:.2e} (rtol={rtol}, atol={atol})", diff)
    return diff
