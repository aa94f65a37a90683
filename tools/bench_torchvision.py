"""Benchmark: every torchvision classification model pruned by loraprune and by Torch-Pruning, in one run.

Torch-Pruning's test suite prunes the torchvision classification models; this tries the same list as a new user
would, with random weights: `loraprune.prune(model, (x,), MagnitudeConfig(ratio=0.3))` and Torch-Pruning 1.6.1's
MetaPruner with L2 magnitude at the same ratio (the classifier left whole, as in its own torchvision test). x is
1x3x128x128, 1x3x224x224 for the vision transformers (their patch grids and windows are fixed at 224).

"Verified" means, for loraprune, that the compact model equals the masked dense model (`prune` checks it and stops
otherwise), except where a pruned residual stream feeds a norm over its channels (ConvNeXt's, the transformers'
LayerNorms): no masked model equals the compact one there, the difference is reported and the cell says "approx.";
for Torch-Pruning, which has no such check, that the pruned model runs and returns the dense model's output shape.
The table gives each model's status and parameters removed, then the models verified by each tool and the median
fraction of parameters removed over the models where both succeed. Files are rewritten after
every model, so an interrupted run keeps what it measured.

Needs torchvision, which does not import beside the project's torch 2.13.0 CPU wheel here: a venv of its own
with torch and torchvision of one release (on these machines `pip install torch==2.14.1 torchvision==0.29.1`),
the package's dependencies, torch-pruning==1.6.1 with --no-deps, and this package with --no-deps -e.

    VENV/bin/python tools/bench_torchvision.py --out runs/bench_torchvision [--only resnet18 ...] [--limit N]
        [--threads N] [--memory-gb 16] [--resume]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import re
import statistics
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch import nn

RATIO = 0.3
NUM_CLASSES = 1000


def model_names() -> list[str]:
    """The classification models, in torchvision's order (detection, segmentation, video... live in submodules)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def input_size(name: str) -> int:
    """Vision transformers fix their patch grid (ViT) or window partition (MaxViT, Swin) at 224; the rest take 128."""
    return 224 if name.startswith(("vit_", "swin", "maxvit")) else 128


def build(name: str) -> nn.Module:
    """Random weights, seeded; GoogLeNet and Inception without their training-only auxiliary heads."""
    import torchvision

    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def first_line(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def run_loraprune(model: nn.Module, x: torch.Tensor) -> dict:
    from loraprune import MagnitudeConfig, prune

    result = prune(model, (x,), MagnitudeConfig(ratio=RATIO))  # raises unless the compact model verified
    with torch.no_grad():
        shape_ok = result.model(x).shape == model(x).shape
    report = result.report
    return {"verified": bool(report.verify["ok"]) and shape_ok, "exact": report.verify["exact"],
            "relative_diff": report.verify["relative_diff"], "params_before": report.params_before,
            "params_after": report.params_after, "frozen_ops": sorted(Counter(f["op"] for f in report.frozen))}


def run_torch_pruning(model: nn.Module, x: torch.Tensor) -> dict:
    """MetaPruner, L2 magnitude, the 1000-way classifier (a Linear, or a conv in SqueezeNet) ignored; ViT's heads
    through `num_heads` (its MultiheadAttention support) and its static `hidden_dim` updated after pruning, as
    Torch-Pruning's own test does."""
    import torch_pruning as tp
    from torchvision.models.vision_transformer import VisionTransformer

    with torch.no_grad():
        expected = model(x).shape
    before = count_params(model)
    ignored = [m for m in model.modules() if (isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES)
               or (isinstance(m, nn.Conv2d) and m.out_channels == NUM_CLASSES)]  # SqueezeNet's classifier is a conv
    num_heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    pruner = tp.pruner.MetaPruner(model, example_inputs=x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=RATIO, ignored_layers=ignored, num_heads=num_heads,
                                  round_to=None)
    pruner.step()
    if isinstance(model, VisionTransformer):
        model.hidden_dim = model.conv_proj.out_channels
    with torch.no_grad():
        shape_ok = model(x).shape == expected
    return {"verified": shape_ok, "params_before": before, "params_after": count_params(model)}


TOOLS = {"loraprune": run_loraprune, "torch_pruning": run_torch_pruning}


def cap_memory(gigabytes: float) -> None:
    """A model that would take the whole machine fails its row instead (an allocation error): the address
    space is capped at what the process holds now plus `gigabytes`."""
    import resource

    with open("/proc/self/statm") as f:
        held = int(f.read().split()[0]) * resource.getpagesize()
    limit = held + int(gigabytes * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_tool(name: str, tool: str, gigabytes: float, threads: int | None, results) -> None:
    """One tool on one model, in a process of its own, so that memory a tool holds on to (or a failed
    allocation leaves) never reaches the next model; its address space capped (`cap_memory`)."""
    if threads:
        torch.set_num_threads(threads)
    cap_memory(gigabytes)
    try:
        dense = build(name)
    except Exception as err:  # a model torchvision cannot build here: reported as such
        results.put({"build_error": first_line(err)})
        return
    size = input_size(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    try:
        out = TOOLS[tool](dense, x)
        out["removed"] = 1 - out["params_after"] / out["params_before"]
    except Exception as err:
        where = traceback.extract_tb(err.__traceback__)[-1].name
        out = {"verified": False, "error": first_line(err), "where": where}
    out["seconds"] = round(time.perf_counter() - start, 2)
    results.put(out)


def measure(name: str, gigabytes: float, threads: int | None) -> dict:
    """Both tools on one model, each in a fresh process; a failure (a dead process included) is a row."""
    row: dict = {"model": name, "input": input_size(name)}
    context = multiprocessing.get_context("spawn")
    for tool in TOOLS:
        results = context.Queue()
        child = context.Process(target=run_tool, args=(name, tool, gigabytes, threads, results))
        child.start()
        child.join()
        try:
            out = results.get(timeout=10)
        except queue.Empty:
            out = {"verified": False, "error": f"the process died (exit code {child.exitcode})"}
        if "build_error" in out:
            return row | out
        row[tool] = out
    return row


def summary(rows: list[dict]) -> dict:
    measured = [r for r in rows if "build_error" not in r]
    both = [r for r in measured if all(r[t]["verified"] for t in TOOLS)]
    medians = {t: statistics.median(r[t]["removed"] for r in both) if both else None for t in TOOLS}
    frozen = Counter(op for r in measured for op in r["loraprune"].get("frozen_ops", []))
    return {"models": len(measured), "verified": {t: sum(r[t]["verified"] for r in measured) for t in TOOLS},
            "loraprune_verified_exactly": sum(r["loraprune"]["verified"] and r["loraprune"]["exact"] for r in measured),
            "both_verified": len(both), "median_removed_where_both": medians,
            "loraprune_frozen_ops_models": dict(frozen.most_common())}


def _cell(out: dict) -> str:
    if out.get("verified"):
        return f"{out['removed']:.1%}" + ("" if out.get("exact", True) else " (approx.)")
    if "error" in out:
        return f"failed: {out['error']}".replace("|", "/")
    return "ran, wrong output shape"


def markdown(rows: list[dict], s: dict, command: str) -> str:
    med = s["median_removed_where_both"]
    lines = [f"torchvision classification models, random weights, magnitude at ratio {RATIO}; command: `{command}`", "",
             f"- models: {s['models']}; verified: loraprune {s['verified']['loraprune']} "
             f"({s['loraprune_verified_exactly']} exactly), Torch-Pruning {s['verified']['torch_pruning']}",
             f"- median parameters removed where both verified ({s['both_verified']} models): loraprune "
             + (f"{med['loraprune']:.1%}, Torch-Pruning {med['torch_pruning']:.1%}" if s["both_verified"] else "-"),
             "- loraprune's frozen reports, by op (models): "
             + (", ".join(f"{op} {n}" for op, n in s["loraprune_frozen_ops_models"].items()) or "none"), "",
             "| model | input | loraprune | Torch-Pruning |", "|---|---:|---|---|"]
    for r in rows:
        if "build_error" in r:
            lines.append(f"| {r['model']} | {r['input']} | not built: {r['build_error']} | |")
        else:
            lines.append(f"| {r['model']} | {r['input']} | {_cell(r['loraprune'])} | {_cell(r['torch_pruning'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_torchvision")
    parser.add_argument("--only", nargs="*", default=None, help="model names (torchvision.models.list_models)")
    parser.add_argument("--limit", type=int, default=None, help="the first N models of the list")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--memory-gb", type=float, default=16.0,
                        help="address space either tool may add to this process; past it, that tool's row fails")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out, run the rest")
    args = parser.parse_args()
    names = model_names()
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"not torchvision classification models: {', '.join(unknown)}")
        names = [n for n in names if n in args.only]
    names = names[:args.limit] if args.limit else names
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["tools/bench_torchvision.py", "--out", args.out] + (["--only", *args.only] if args.only else [])
                       + (["--limit", str(args.limit)] if args.limit else []) + ["--memory-gb", f"{args.memory_gb:g}"])
    from importlib.metadata import version  # torch_pruning.__version__ still says 1.6.0 in its 1.6.1 wheel

    versions = {"torch": torch.__version__, "torchvision": version("torchvision"),
                "torch_pruning": version("torch-pruning"), "threads": args.threads or torch.get_num_threads()}
    saved = out / "bench_torchvision.json"
    rows: list[dict] = json.loads(saved.read_text())["rows"] if args.resume and saved.is_file() else []
    done = {r["model"] for r in rows}
    for i, name in enumerate(names, 1):
        if name in done:
            continue
        rows.append(measure(name, args.memory_gb, args.threads))
        s = summary(rows)
        (out / "bench_torchvision.json").write_text(json.dumps({"versions": versions, "ratio": RATIO, "summary": s,
                                                                "rows": rows}, indent=2))
        (out / "bench_torchvision.md").write_text(markdown(rows, s, command))
        r = rows[-1]
        status = r.get("build_error") or " | ".join(f"{t} {_cell(r[t])}" for t in TOOLS)
        print(f"[{i}/{len(names)}] {name}: {status}", flush=True)
    print(markdown(rows, summary(rows), command))


if __name__ == "__main__":
    main()
