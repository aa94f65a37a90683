"""Dense-vs-compact benchmark: prefill latency and decode speed on PyTorch and ONNX Runtime, with the ideal.

Protocol (design.md, "Measurement protocol"): for every (batch, seq) of the grid and every stage, the cells
(dense, compact) x (torch, ort) run round-robin in this one process, A B A B ..., first ``warmup`` untimed
rounds, then ``runs`` timed rounds; each cell reports median, min and max. Torch threads and ORT intra-op
threads are fixed to ``threads`` and reported. The ratio dense/compact is the headline, since absolute times
on a shared machine drift; the load average before and after is recorded as a noise hint.

- prefill: one forward over ``[batch, seq]`` (torch: ``no_grad``, ``use_cache=False``; ORT: the prefill graph;
  ONNX Runtime GenAI: ``append_tokens`` of the prompt on the decode graph, which also writes the cache),
  logits for every position in all. Ideal speedup = MACs ratio, counted by ``count_macs`` on a trace of each
  model at exactly that shape (linear, matmul and attention MACs, lm_head included).
- decode: greedy generation of ``decode_tokens`` tokens after a ``[batch, seq]`` prompt (torch:
  ``generate(do_sample=False, min_new_tokens=max_new_tokens)``; ORT: ``ort_generate`` on the decode graph;
  GenAI: its own loop on the same graph). Only the KV-cache steps are timed: a clock stamps the end of every
  step (a streamer in torch, the session's run in ORT, ``generate_next_token`` in GenAI), and the time per
  step is (last stamp - stamp after the prompt step) / (tokens - 1),
  so the prompt step (a prefill) does not blur the decode figure. Ideal speedup = weight-bytes ratio of the
  bytes a step reads: every parameter once, minus lookup-only embedding tables (an input embedding that is
  not tied to the output projection is read one row per token, not whole).
- memory (``stage_mem_mb``): the peak resident memory the stage adds on top of what was resident before it.
  Linux only: ``/proc/self/clear_refs`` is written ``5`` to reset the kernel's peak-RSS mark (VmHWM) to the
  current RSS, the stage runs once, untimed, and VmHWM - VmRSS(before) is reported (glibc's ``malloc_trim``
  first, so memory freed by earlier stages does not hide this one's demand). Weights are resident before
  the stage, so they are in the model table (weight bytes, ONNX bytes), not in this figure. ORT keeps a
  growing memory arena per session, so ORT stages are measured on a fresh session's first run. On CUDA,
  torch reports its allocator's peak above its level before the stage, and ORT the device memory its fresh
  session's first run took (``cudaMemGetInfo`` before and after; its arena keeps what the run reached, so
  this is the run's peak, measured the only way ORT's Python API allows). ORT runs on the device torch's
  model is on (CUDA sessions for a CUDA model, CPU ones for a CPU model), so a row compares like with like,
  and every timed CUDA stage ends with a synchronisation.
  Where the peak mark cannot be reset the field is None: ``ru_maxrss`` never decreases, so it cannot
  isolate a stage that is not the process's largest.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from loraprune.ir.trace import trace
from loraprune.passes.macs import count_macs
from loraprune.runtime.export import export_decode, export_prefill
from loraprune.runtime.genai import linked_genai_folder, load_genai, new_generator
from loraprune.runtime.generate import ort_generate
from loraprune.runtime.session import make_session, run_with_iobinding

__all__ = ["DEFAULT_GRID", "bench_pair", "model_stats", "stage_allocated_mb", "stage_memory_mb", "write_report"]

DEFAULT_GRID = ((1, 128), (1, 512), (8, 128))
MODELS = ("dense", "compact")
BACKENDS = ("torch", "ort", "genai")
MIB = 1024 * 1024
MEMORY_METHOD = ("peak RSS above the RSS before the stage, one untimed run: /proc/self/clear_refs resets VmHWM, "
                 "then VmHWM - VmRSS(before); ORT on a fresh session; torch on CUDA: allocator peak")


# ----------------------------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
    except (OSError, KeyError):
        return False
    return True


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def stage_memory_mb(fn: Callable[[], object], cuda: bool = False) -> float | None:
    """Peak memory (MiB) that one run of ``fn`` adds over what was resident before it; see the module doc."""
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / MIB
    _malloc_trim()
    if not _reset_peak_rss():
        fn()
        return None
    before = _status_kb("VmRSS")
    fn()
    return max(_status_kb("VmHWM") - before, 0) / 1024


def stage_allocated_mb(fn: Callable[[], object]) -> float:
    """Peak bytes of live CPU tensors (MiB) that one run of ``fn`` adds: the CPU analogue of the CUDA
    allocator's peak, read from the profiler's memory events (a running sum of torch's allocations and frees).

    Peak RSS also counts what the C allocator keeps after tensors are freed: glibc raises its mmap threshold
    after a large free, so later tensors come from the heap, whose freed pages stay resident and which
    fragments by allocation order. Tensors allocated before the call count from zero: their frees are not
    reported, so the figure is never below the stage's own demand. Memory outside torch's allocator (numpy,
    oneDNN scratch) is not seen. The profiler slows ``fn``: time it in another run."""
    gc.collect()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type().name == "CPU")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / MIB


# ----------------------------------------------------------------------------------------------- model facts


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_stats(model: nn.Module) -> dict:
    """Parameters and weight bytes (each shared tensor once); ``decode_weight_bytes`` drops lookup-only tables."""
    params = list(model.parameters())  # deduplicated: a tied lm_head counts once
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    read_whole = {id(out.weight)} if out is not None and getattr(out, "weight", None) is not None else set()
    lookup = {id(m.weight): m.weight for m in model.modules()
              if isinstance(m, nn.Embedding) and id(m.weight) not in read_whole}
    lookup_bytes = sum(w.numel() * w.element_size() for w in lookup.values())
    return {"params": sum(p.numel() for p in params), "weight_bytes": weight_bytes,
            "decode_weight_bytes": weight_bytes - lookup_bytes, "dtype": str(params[0].dtype).removeprefix("torch.")}


def _onnx_bytes(path: Path) -> int:
    """Graph plus external data (``<name>.data``) when there is one."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _prompt(model: nn.Module, batch: int, seq: int) -> torch.Tensor:
    vocab = int(model.get_input_embeddings().num_embeddings)
    gen = torch.Generator().manual_seed(1000 * batch + seq)
    return torch.randint(0, vocab, (batch, seq), generator=gen)


def _pad_id(model: nn.Module) -> int:
    cfg = getattr(model, "generation_config", None)
    for value in (getattr(cfg, "pad_token_id", None), getattr(cfg, "eos_token_id", None)):
        if isinstance(value, list | tuple):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


# ----------------------------------------------------------------------------------------------- one run of each cell


def _sync(model: nn.Module) -> None:
    if _device(model).type == "cuda":
        torch.cuda.synchronize()


def _torch_prefill(model: nn.Module, ids: torch.Tensor) -> Callable[[], float]:
    ids = ids.to(_device(model))
    mask = torch.ones_like(ids)

    def run() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        _sync(model)
        return (time.perf_counter() - start) * 1e3

    return run


class _StepClock:
    """A generate() streamer that only stamps time: once for the prompt, then after every new token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def _torch_decode(model: nn.Module, ids: torch.Tensor, tokens: int) -> Callable[[], float]:
    ids = ids.to(_device(model))
    kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": tokens, "min_new_tokens": tokens,
              "do_sample": False, "pad_token_id": _pad_id(model)}

    def run() -> float:
        clock = _StepClock()
        with torch.no_grad():
            out = model.generate(ids, streamer=clock, **kwargs)
        if out.shape[1] != ids.shape[1] + tokens or len(clock.stamps) != tokens + 1:
            raise RuntimeError(f"torch generate made {out.shape[1] - ids.shape[1]} tokens, expected {tokens}")
        return (clock.stamps[-1] - clock.stamps[1]) / (tokens - 1) * 1e3  # stamps[1]: after the prompt step

    return run


def _ort_prefill(session: ort.InferenceSession, ids: torch.Tensor) -> Callable[[], float]:
    feeds = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": np.ones(tuple(ids.shape), np.int64)}

    def run() -> float:
        start = time.perf_counter()
        run_with_iobinding(session, feeds)
        return (time.perf_counter() - start) * 1e3

    return run


@contextmanager
def _clocked(session: ort.InferenceSession, stamps: list[float]) -> Iterator[None]:
    """Stamp the end of every graph run of ``session`` (an IO-binding run, which returns once it is done)."""
    run = session.run_with_iobinding

    def stamped(*args, **kwargs):
        result = run(*args, **kwargs)
        stamps.append(time.perf_counter())
        return result

    session.run_with_iobinding = stamped
    try:
        yield
    finally:
        del session.run_with_iobinding  # the instance attribute; the class method remains


def _ort_decode(session: ort.InferenceSession, ids: torch.Tensor, tokens: int) -> Callable[[], float]:
    prompt = ids.numpy().astype(np.int64)

    def run() -> float:
        stamps: list[float] = []
        with _clocked(session, stamps):
            out = ort_generate(None, session, prompt, tokens)
        if out.shape[1] != prompt.shape[1] + tokens or len(stamps) != tokens:
            raise RuntimeError(f"ort_generate made {out.shape[1] - prompt.shape[1]} tokens, expected {tokens}")
        return (stamps[-1] - stamps[0]) / (tokens - 1) * 1e3  # stamps[0]: the end of the prompt step

    return run


def _genai_prefill(model, ids: torch.Tensor) -> Callable[[], float]:
    prompt = ids.numpy().astype(np.int32)

    def run() -> float:
        generator = new_generator(model, prompt.shape[0], prompt.shape[1], 1)
        start = time.perf_counter()
        generator.append_tokens(prompt)
        return (time.perf_counter() - start) * 1e3

    return run


def _genai_decode(model, ids: torch.Tensor, tokens: int) -> Callable[[], float]:
    """The first generate_next_token only picks from the prompt's logits; each later one runs a KV-cache step."""
    prompt = ids.numpy().astype(np.int32)

    def run() -> float:
        generator = new_generator(model, prompt.shape[0], prompt.shape[1], tokens, min_new_tokens=tokens)
        generator.append_tokens(prompt)
        stamps = []
        while not generator.is_done():
            generator.generate_next_token()
            stamps.append(time.perf_counter())
        if len(stamps) != tokens:
            raise RuntimeError(f"onnxruntime-genai made {len(stamps)} tokens, expected {tokens}")
        return (stamps[-1] - stamps[0]) / (tokens - 1) * 1e3

    return run


# ----------------------------------------------------------------------------------------------- the protocol


def _alternate(cells: dict[tuple[str, str], Callable[[], float]], runs: int, warmup: int) -> dict:
    """Run every cell once per round, in a fixed order (A B A B ...); ``warmup`` rounds are discarded.

    The garbage collector is off meanwhile, as in ``timeit``, so a collection (slow with the exporter's objects
    alive) is not charged to whichever cell happens to trigger it.
    """
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in cells}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_ in range(warmup + runs):
            for key, cell in cells.items():
                ms = cell()
                if round_ >= warmup:
                    samples[key].append(ms)
    finally:
        if was_enabled:
            gc.enable()
    return samples


def _summary(samples: list[float]) -> dict:
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples),
            "runs": len(samples), "samples_ms": samples}


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _rows(stage: str, batch: int, seq: int, samples: dict, memory: dict, ideal: dict, extra: dict,
          devices: dict, decode_tokens: int) -> list[dict]:
    rows = []
    for backend in BACKENDS:
        if (backend, "dense") not in samples:
            continue
        row: dict = {"stage": stage, "backend": backend, "device": devices[backend], "batch": batch, "seq": seq}
        if stage == "decode":
            row["decode_tokens"] = decode_tokens
        for name in MODELS:
            cell = _summary(samples[(backend, name)])
            # prefill: prompt tokens per second; decode: generated tokens per second over all rows
            per_run = batch * (seq if stage == "prefill" else 1)
            cell["tokens_per_s"] = per_run / (cell["median_ms"] / 1e3)
            cell["stage_mem_mb"] = memory[(backend, name)]
            row[name] = cell
        row["speedup"] = _ratio(row["dense"]["median_ms"], row["compact"]["median_ms"])
        row["ideal_basis"] = "macs" if stage == "prefill" else "decode_weight_bytes"
        row["ideal"] = _ratio(ideal["dense"], ideal["compact"])
        row["efficiency"] = _ratio(row["speedup"], row["ideal"])
        row.update(extra)
        rows.append(row)
    return rows


def _ort_vs_torch(rows: list[dict]) -> list[dict]:
    """Torch median / ORT (or GenAI) median, per stage, shape and model (the cells ran interleaved)."""
    by_key = {(r["stage"], r["batch"], r["seq"], r["backend"]): r for r in rows}
    out = []
    for (stage, batch, seq, backend), row in by_key.items():
        other = by_key.get((stage, batch, seq, "torch"))
        if backend == "torch" or other is None:
            continue
        for name in MODELS:
            t, o = other[name]["median_ms"], row[name]["median_ms"]
            out.append({"stage": stage, "batch": batch, "seq": seq, "model": name, "backend": backend,
                        "torch_ms": t, "ort_ms": o, "ort_speedup": _ratio(t, o)})
    return out


def _validate(grid: Sequence[tuple[int, int]], decode_tokens: int, threads: int, runs: int, warmup: int,
              providers: Sequence[str]) -> None:
    if not grid or any(len(g) != 2 or min(g) < 1 for g in grid):
        raise ValueError(f"grid must be (batch, seq) pairs of positive ints, got {grid!r}")
    if decode_tokens < 2:
        raise ValueError(f"decode_tokens must be >= 2 (the prompt step is not timed), got {decode_tokens}")
    if threads < 1 or runs < 1 or warmup < 0:
        raise ValueError(f"need threads >= 1, runs >= 1, warmup >= 0; got {threads}, {runs}, {warmup}")
    if not providers or set(providers) - set(BACKENDS):
        raise ValueError(f"providers must be a non-empty subset of {BACKENDS}, got {providers!r}")


def bench_pair(dense_model: nn.Module, compact_model: nn.Module, *,
               grid: Sequence[tuple[int, int]] = DEFAULT_GRID, decode_tokens: int = 32, threads: int = 2,
               runs: int = 10, warmup: int = 3, providers: Sequence[str] = BACKENDS,
               workdir: str | os.PathLike, progress: bool = False,
               exported: dict[str, dict[str, Path]] | None = None, export_options: dict | None = None) -> dict:
    """Benchmark ``compact_model`` against ``dense_model`` (see the module doc for the protocol).

    Returns ``{"meta", "models", "rows", "ort_vs_torch"}``: one row per (stage, backend, batch, seq) with
    ``dense``/``compact`` cells (median/min/max ms, per step for decode; tokens/s; stage memory), ``speedup``
    (dense/compact median), ``ideal`` and ``efficiency`` = speedup / ideal. Both models are exported once to
    ONNX under ``workdir`` when ``"ort"`` is among ``providers``, unless ``exported`` already has their
    ``{"prefill": path, "decode": path}`` (graphs from ``export_prefill`` / ``export_decode``, keyed "dense" /
    "compact"), made with `export_options` (target, fp16) as those are. Torch's thread count is restored
    afterwards.
    """
    from tqdm.auto import tqdm

    _validate(grid, decode_tokens, threads, runs, warmup, providers)
    models = {"dense": dense_model.eval(), "compact": compact_model.eval()}
    workdir = Path(workdir)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stats = {name: model_stats(m) for name, m in models.items()}
        paths: dict[str, dict[str, Path]] = {}
        sessions: dict[str, dict[str, ort.InferenceSession]] = {}
        devices = {"torch": str(_device(dense_model))}
        genai: dict[str, object] = {}
        provider = _provider_for(_device(dense_model))
        if {"ort", "genai"} & set(providers):
            for name, m in models.items():
                paths[name] = (exported or {}).get(name) or {
                    "prefill": export_prefill(m, workdir / f"{name}_prefill.onnx", **(export_options or {})),
                    "decode": export_decode(m, workdir / f"{name}_decode.onnx", **(export_options or {}))}
                stats[name]["onnx_prefill_bytes"] = _onnx_bytes(paths[name]["prefill"])
                stats[name]["onnx_decode_bytes"] = _onnx_bytes(paths[name]["decode"])
                if "ort" in providers:
                    sessions[name] = {k: make_session(p, provider, threads=threads) for k, p in paths[name].items()}
                if "genai" in providers:
                    genai[name] = load_genai(linked_genai_folder(m, paths[name]["decode"], workdir / f"{name}_genai",
                                                                 target=provider, threads=threads))
        if "ort" in providers:
            devices["ort"] = sessions["dense"]["prefill"].get_providers()[0]
        if "genai" in providers:
            devices["genai"] = f"onnxruntime-genai ({provider})"

        rows: list[dict] = []
        steps = tqdm(total=2 * len(grid), desc="bench", disable=not progress, leave=False)
        for batch, seq in grid:
            ids = _prompt(dense_model, batch, seq)
            macs = {name: count_macs(trace(m, ids.to(_device(m))).graph) for name, m in models.items()}
            for stage in ("prefill", "decode"):
                steps.set_postfix_str(f"{stage} {batch}x{seq}")
                cells, memory = _stage_cells(stage, models, sessions, genai, paths, ids, decode_tokens, threads,
                                             providers)
                samples = _alternate(cells, runs, warmup)
                if stage == "prefill":
                    ideal, extra = macs, {"dense_macs": macs["dense"], "compact_macs": macs["compact"]}
                else:
                    ideal = {n: stats[n]["decode_weight_bytes"] for n in MODELS}
                    extra = {"dense_weight_bytes": ideal["dense"], "compact_weight_bytes": ideal["compact"]}
                rows += _rows(stage, batch, seq, samples, {k: f() for k, f in memory.items()}, ideal, extra,
                              devices, decode_tokens)
                steps.update()
        steps.close()
    finally:
        torch.set_num_threads(threads_before)
    meta = {
        "threads": threads, "runs": runs, "warmup": warmup, "decode_tokens": decode_tokens,
        "grid": [list(g) for g in grid], "providers": list(providers), "devices": devices,
        "order": "round-robin per (shape, stage): " + ", ".join(f"{b}/{n}" for b in BACKENDS if b in providers
                                                                for n in MODELS),
        "decode_timing": "per KV-cache step after the prompt step: (last stamp - stamp after prompt) / (tokens - 1)",
        "memory_method": MEMORY_METHOD if os.path.exists("/proc/self/clear_refs") else "unavailable (no clear_refs)",
        "loadavg_before": load_before, "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return {"meta": meta, "models": stats, "rows": rows, "ort_vs_torch": _ort_vs_torch(rows)}


def _stage_cells(stage: str, models: dict[str, nn.Module], sessions: dict, genai: dict, paths: dict,
                 ids: torch.Tensor, decode_tokens: int, threads: int, providers: Sequence[str]
                 ) -> tuple[dict, dict]:
    """The timed callables of one stage, keyed (backend, model), and the memory measurements to run after."""
    cells: dict[tuple[str, str], Callable[[], float]] = {}
    memory: dict[tuple[str, str], Callable[[], float | None]] = {}
    for backend in BACKENDS:
        if backend not in providers:
            continue
        for name, model in models.items():
            device = _device(model)
            if backend == "torch":
                cell = (_torch_prefill(model, ids) if stage == "prefill"
                        else _torch_decode(model, ids, decode_tokens))
                cuda = device.type == "cuda"
                memory[(backend, name)] = lambda cell=cell, cuda=cuda: stage_memory_mb(cell, cuda=cuda)
            elif backend == "genai":  # GenAI keeps its own allocator and cache: no per-stage figure
                cell = (_genai_prefill(genai[name], ids) if stage == "prefill"
                        else _genai_decode(genai[name], ids, decode_tokens))
                memory[(backend, name)] = lambda: None
            else:
                cell = (_ort_prefill(sessions[name]["prefill"], ids) if stage == "prefill"
                        else _ort_decode(sessions[name]["decode"], ids, decode_tokens))
                memory[(backend, name)] = lambda p=paths[name][stage], d=device: _fresh_ort_memory(
                    p, stage, ids, decode_tokens, threads, d)
            cells[(backend, name)] = cell
    return cells, memory


def _fresh_ort_memory(path: Path, stage: str, ids: torch.Tensor, decode_tokens: int, threads: int,
                      device: torch.device) -> float | None:
    """ORT's arena keeps what a session once used, so a warm session shows no growth: use a new one."""
    session = make_session(path, _provider_for(device), threads=threads)
    run = _ort_prefill(session, ids) if stage == "prefill" else _ort_decode(session, ids, decode_tokens)
    try:
        if device.type != "cuda":
            return stage_memory_mb(run)
        used_before = _device_used_bytes(device)
        run()
        return (_device_used_bytes(device) - used_before) / MIB
    finally:
        del session


def _device_used_bytes(device: torch.device) -> int:
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def _provider_for(device: torch.device) -> str:
    """The ORT provider for the device torch runs on."""
    return "cuda" if device.type == "cuda" else "cpu"


# ----------------------------------------------------------------------------------------------- report


def _fmt_ms(cell: dict) -> str:
    return f"{cell['median_ms']:.2f} ({cell['min_ms']:.2f}-{cell['max_ms']:.2f})"


def _fmt_mem(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _label(row: dict) -> str:
    return f"{row['stage']} {row['backend']} {row['batch']}x{row['seq']}"


def _markdown(results: dict) -> str:
    meta, models = results["meta"], results["models"]
    lines = ["# Dense vs compact benchmark", "",
             f"threads {meta['threads']}, {meta['runs']} timed runs after {meta['warmup']} warm-up, "
             f"decode {meta['decode_tokens']} tokens; devices: "
             + ", ".join(f"{k} = {v}" for k, v in meta["devices"].items())
             + f"; load average before/after: {meta.get('loadavg_before')} / {meta.get('loadavg_after')}", "",
             f"Order: {meta['order']}. Decode timing: {meta['decode_timing']}.", "",
             f"Memory (stage MiB): {meta['memory_method']}.", "",
             "| model | params | weight MiB | decode weight MiB | ONNX prefill MiB | ONNX decode MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in MODELS:
        s = models[name]
        onnx_mb = [f"{s[k] / MIB:.1f}" if k in s else "n/a" for k in ("onnx_prefill_bytes", "onnx_decode_bytes")]
        lines.append(f"| {name} | {s['params']:,} | {s['weight_bytes'] / MIB:.1f} | "
                     f"{s['decode_weight_bytes'] / MIB:.1f} | {onnx_mb[0]} | {onnx_mb[1]} |")
    lines += ["", "Times in ms (median (min-max)); decode rows are ms per KV-cache step.", "",
              "| stage | backend | batch x seq | dense ms | compact ms | dense tok/s | compact tok/s "
              "| speedup | ideal | efficiency | dense mem MiB | compact mem MiB |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        d, c = r["dense"], r["compact"]
        lines.append(f"| {r['stage']} | {r['backend']} | {r['batch']}x{r['seq']} | {_fmt_ms(d)} | {_fmt_ms(c)} | "
                     f"{d['tokens_per_s']:.1f} | {c['tokens_per_s']:.1f} | {r['speedup']:.3f} | {r['ideal']:.3f} "
                     f"({r['ideal_basis']}) | {r['efficiency']:.3f} | {_fmt_mem(d['stage_mem_mb'])} | "
                     f"{_fmt_mem(c['stage_mem_mb'])} |")
    if results.get("ort_vs_torch"):
        lines += ["", "ONNX Runtime (our loop: ort; GenAI: genai) vs PyTorch (torch median / its median, same "
                  "interleaved rounds):", "",
                  "| stage | batch x seq | model | backend | torch ms | its ms | speedup over torch |",
                  "|---|---|---|---|---:|---:|---:|"]
        for r in results["ort_vs_torch"]:
            lines.append(f"| {r['stage']} | {r['batch']}x{r['seq']} | {r['model']} | {r.get('backend', 'ort')} | "
                         f"{r['torch_ms']:.2f} | {r['ort_ms']:.2f} | {r['ort_speedup']:.3f} |")
    return "\n".join(lines) + "\n"


def _bar_plot(path: Path, labels: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.9 * len(labels) + 2), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    top = max([v for values in series.values() for v in values if math.isfinite(v)] + [1.0])
    ax.set_ylim(0, top * 1.25)  # headroom for the legend
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(loc="upper right", ncols=len(series))
    fig.savefig(path, dpi=120)


def write_report(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md``, ``speedup.png`` (measured vs ideal) and ``efficiency.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md", "speedup_png": out / "speedup.png",
             "efficiency_png": out / "efficiency.png"}
    paths["json"].write_text(json.dumps(results, indent=2, default=str) + "\n")
    paths["md"].write_text(_markdown(results))
    rows = results["rows"]
    labels = [_label(r) for r in rows]
    threads = results["meta"]["threads"]
    _bar_plot(paths["speedup_png"], labels, {"measured": [r["speedup"] for r in rows],
                                              "ideal": [r["ideal"] for r in rows]},
              "speedup (dense / compact)", f"Measured vs ideal speedup ({threads} threads)")
    _bar_plot(paths["efficiency_png"], labels, {"efficiency": [r["efficiency"] for r in rows]},
              "measured / ideal", f"Efficiency ({threads} threads)")
    return paths
