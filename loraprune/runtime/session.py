"""ONNX Runtime sessions: provider choice, fixed threads, and a device-resident run for CUDA.

On CUDA a plain ``session.run`` copies every output back to the host, which for a KV cache is most
of the step's memory traffic; ``run_with_iobinding`` keeps outputs as device ``OrtValue``s so they can
be fed straight back in. On CPU there is nothing to save, so plain ``session.run`` is used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

__all__ = ["make_session", "session_device", "run_with_iobinding", "run_session", "as_session"]

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


def make_session(path: str | os.PathLike, provider: str = "auto",
                 threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession with all graph optimizations; CUDA when this ORT build has it (``auto``), else CPU.

    ``threads`` fixes intra-op threads (and one inter-op thread) so timings are comparable across runs.
    """
    path = Path(path)
    _check_onnx_file(path)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers = _providers(provider)
    session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    if session.get_providers()[0] != providers[0]:  # a CUDA provider whose libraries fail to load drops out quietly
        raise RuntimeError(f"{providers[0]} was asked for and did not start for {path.name} (the session runs on "
                           f"{session.get_providers()}); check the CUDA and cuDNN libraries onnxruntime-gpu needs")
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


def run_with_iobinding(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray | ort.OrtValue],
                       output_names: Sequence[str] | None = None, device: str | None = None,
                       device_id: int = 0) -> list[ort.OrtValue]:
    """Run with IO binding; outputs stay on ``device`` as OrtValues (call ``.numpy()`` to copy to host).

    OrtValue inputs (e.g. the previous step's presents) are bound where they are, without a copy;
    numpy inputs are copied to the device once.
    """
    device = device or session_device(session)
    binding = session.io_binding()
    for name, value in feeds.items():
        if isinstance(value, ort.OrtValue):
            binding.bind_ortvalue_input(name, value)
        else:
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name in output_names or [o.name for o in session.get_outputs()]:
        binding.bind_output(name, device, device_id)
    session.run_with_iobinding(binding)
    return binding.get_outputs()


def run_session(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray | ort.OrtValue]
                ) -> list[np.ndarray | ort.OrtValue]:
    """IO binding on CUDA (outputs stay on the device), plain ``session.run`` on CPU (numpy outputs)."""
    if session_device(session) == "cuda":
        return run_with_iobinding(session, feeds)
    return session.run(None, {k: (v.numpy() if isinstance(v, ort.OrtValue) else v) for k, v in feeds.items()})
