"""ONNX Runtime sessions: provider choice, fixed threads, a device-resident run, and where nodes ran.

A plain ``session.run`` copies every output back to the host, which on CUDA is most of a KV-cache step's
memory traffic. ``run_with_iobinding`` keeps outputs as ``OrtValue``s on the session's device, so they can be
fed straight back in, and can write them into buffers the caller allocated once. The same binding path runs
on the CPU (where ORT's device is host memory), so the tests exercise the code a GPU takes.

A session asked for CUDA either runs on CUDA or is an error: the provider that actually started is
checked, and ORT's Python-level retry on the CPU after a failed run is turned off.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

__all__ = ["make_session", "session_device", "run_with_iobinding", "as_session", "node_placement",
           "device_buffer"]

_PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def _check_onnx_file(path: Path) -> None:
    """Fail early with one clear line instead of ORT's multi-line protobuf error."""
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model file at {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - any parse failure means "not an ONNX model"
        raise ValueError(f"not an ONNX model: {path} ({type(err).__name__}: {err})") from None
    # Arbitrary bytes can parse as an (empty) protobuf message; a real model has a version and outputs.
    if proto.ir_version == 0 or not proto.graph.output:
        raise ValueError(f"not an ONNX model: {path} (no IR version or graph outputs)")


def _providers(provider: str) -> list[str]:
    available = ort.get_available_providers()
    if provider == "auto":
        provider = "cuda" if _PROVIDERS["cuda"] in available else "cpu"
    if provider not in _PROVIDERS:
        raise ValueError(f"provider must be 'auto', 'cuda' or 'cpu', got {provider!r}")
    if _PROVIDERS[provider] not in available:
        raise ValueError(f"{_PROVIDERS[provider]} is not in this onnxruntime build (has {available}); for CUDA "
                         "install the gpu extra (onnxruntime-gpu) instead of the cpu one")
    return [_PROVIDERS[provider]] if provider == "cpu" else [_PROVIDERS[provider], _PROVIDERS["cpu"]]


def make_session(path: str | os.PathLike, provider: str = "auto", threads: int | None = None, *,
                 profile_dir: str | os.PathLike | None = None) -> ort.InferenceSession:
    """An InferenceSession with all graph optimizations; CUDA when this ORT build has it (``auto``), else CPU.

    ``threads`` fixes intra-op threads (and one inter-op thread) so timings are comparable across runs.
    ``profile_dir`` turns on ORT's profiler, writing there (see :func:`node_placement`).
    """
    path = Path(path)
    _check_onnx_file(path)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(profile_dir) / "ort_profile")
    providers = _providers(provider)
    session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    if session.get_providers()[0] != providers[0]:  # a CUDA provider whose libraries fail to load drops out quietly
        raise RuntimeError(f"{providers[0]} was asked for and did not start for {path.name} (the session runs on "
                           f"{session.get_providers()}); check the CUDA and cuDNN libraries onnxruntime-gpu needs")
    session.disable_fallback()  # a failed run raises instead of being retried on the CPU
    return session


def as_session(session_or_path: ort.InferenceSession | str | os.PathLike, threads: int | None = None
               ) -> ort.InferenceSession:
    """Accept either an open session or a path, so callers can reuse sessions across calls."""
    if isinstance(session_or_path, ort.InferenceSession):
        return session_or_path
    return make_session(session_or_path, threads=threads)


def session_device(session: ort.InferenceSession) -> str:
    """``'cuda'`` when the session's first provider is CUDA, else ``'cpu'``."""
    return "cuda" if session.get_providers()[0] == _PROVIDERS["cuda"] else "cpu"


def device_buffer(session: ort.InferenceSession, shape: Sequence[int], dtype: type, device_id: int = 0
                  ) -> ort.OrtValue:
    """An uninitialised tensor on the session's device, to bind as an output run after run."""
    return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, session_device(session), device_id)


def run_with_iobinding(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray | ort.OrtValue],
                       output_names: Sequence[str] | None = None, device: str | None = None,
                       device_id: int = 0, buffers: Mapping[str, ort.OrtValue] | None = None
                       ) -> list[ort.OrtValue]:
    """Run with IO binding; outputs stay on ``device`` as OrtValues (call ``.numpy()`` to copy to host).

    OrtValue inputs (e.g. the previous step's presents) are bound where they are, without a copy; numpy
    inputs are copied to the device once. An output named in ``buffers`` is written into that preallocated
    OrtValue (its shape must be the output's); the others are allocated by ORT on the device.
    """
    device = device or session_device(session)
    buffers = buffers or {}
    binding = session.io_binding()
    for name, value in feeds.items():
        if isinstance(value, ort.OrtValue):
            binding.bind_ortvalue_input(name, value)
        else:
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name in output_names or [o.name for o in session.get_outputs()]:
        if name in buffers:
            binding.bind_ortvalue_output(name, buffers[name])
        else:
            binding.bind_output(name, device, device_id)
    session.run_with_iobinding(binding)
    return binding.get_outputs()


def node_placement(path: str | os.PathLike, feeds: Mapping[str, np.ndarray], provider: str = "auto",
                   threads: int | None = None) -> dict[str, dict[str, int]]:
    """Which execution provider ran each op type in one profiled run: ``{op_type: {provider: nodes}}``.

    Read from ORT's profiler (its node events carry ``op_name`` and ``provider``), so it reports what ran,
    not what the partitioner intended; a node that ran several times in the run is counted once.
    """
    with tempfile.TemporaryDirectory() as tmp:
        session = make_session(path, provider, threads, profile_dir=tmp)
        run_with_iobinding(session, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    seen: dict[str, tuple[str, str]] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args and "op_name" in args:
            seen[event["name"].removesuffix("_kernel_time")] = (args["op_name"], args["provider"])
    counts: dict[str, Counter] = {}
    for op_type, provider_name in seen.values():
        counts.setdefault(op_type, Counter())[provider_name] += 1
    return {op: dict(c) for op, c in sorted(counts.items())}
