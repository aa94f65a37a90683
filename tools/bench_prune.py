"""Benchmark: SmolLM2-135M pruned by magnitude at several ratios; params, MACs, PyTorch CPU latency of a
1x256 forward, dense vs compact alternating in one process; Torch-Pruning's LLM pruning as a reference.

    .venv/bin/python tools/bench_prune.py --ratios 0.2 0.5 --out runs/bench_prune [--tp-limit 120]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def tp_worker(ratio: float, threads: int, runs: int) -> dict:
    """Torch-Pruning 1.6.1 with its LLM example's settings, then the same latency protocol."""
    import torch
    from measure import alternate
    from tp_reference import make_tp_pruner

    from loraprune.api import count_params
    from loraprune.models.load import load_model

    torch.set_num_threads(threads)
    model = load_model(None).model
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    before = count_params(model)
    pruner = make_tp_pruner(model, ids, ratio)
    pruner.step()
    x = torch.randint(0, model.config.vocab_size, (1, 256))
    with torch.no_grad():
        times = alternate({"tp": lambda: model(input_ids=x, use_cache=False)}, runs=runs)
    return {"params_before": before, "params_after": count_params(model), "latency": times["tp"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--out", default="runs/bench_prune")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tp-limit", type=float, default=120.0)
    parser.add_argument("--tp-worker", type=float, default=None)
    args = parser.parse_args()
    if args.tp_worker is not None:
        print(json.dumps(tp_worker(args.tp_worker, args.threads, args.runs)))
        return
    import torch
    from measure import alternate
    from tqdm import tqdm

    from loraprune import MagnitudeConfig, prune
    from loraprune.models.load import load_model

    torch.set_num_threads(args.threads)
    dense = load_model(None).model
    x = torch.randint(0, dense.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(1))
    rows = []
    for ratio in tqdm(args.ratios, desc="ratios"):
        result = prune(dense, x, MagnitudeConfig(ratio=ratio))
        compact = result.model
        with torch.no_grad():
            times = alternate({"dense": lambda: dense(input_ids=x, use_cache=False),
                               "compact": lambda m=compact: m(input_ids=x, use_cache=False)}, runs=args.runs)
        r = result.report
        speedup = times["dense"]["median_s"] / times["compact"]["median_s"]
        ideal = r["macs_before"] / r["macs_after"]
        row = {"ratio": ratio, "params_before": r["params_before"], "params_after": r["params_after"],
               "macs_before": r["macs_before"], "macs_after": r["macs_after"], "latency": times,
               "speedup": speedup, "ideal_speedup_macs": ideal, "efficiency": speedup / ideal,
               "units_removed_fraction": r["units_removed_fraction"]}
        try:
            proc = subprocess.run([sys.executable, __file__, "--tp-worker", str(ratio), "--threads",
                                   str(args.threads), "--runs", str(args.runs)],
                                  capture_output=True, text=True, timeout=args.tp_limit)
            row["torch_pruning"] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
                "status": "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
        except subprocess.TimeoutExpired:
            row["torch_pruning"] = {"status": f"> {args.tp_limit:.0f} s (did not finish)"}
        rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_prune.json").write_text(json.dumps({"threads": args.threads, "input": [1, 256], "rows": rows},
                                                     indent=1))
    lines = ["| ratio | params | MACs (1x256) | dense ms | compact ms | speedup | ideal (MACs) | efficiency | "
             "Torch-Pruning |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        d, c = row["latency"]["dense"], row["latency"]["compact"]
        tp_row = row["torch_pruning"]
        tp_text = tp_row.get("status") or (f"params {tp_row['params_after'] / 1e6:.1f}M, "
                                           f"{tp_row['latency']['tp']['median_s'] * 1e3:.0f} ms")
        lines.append(f"| {row['ratio']} | {row['params_before'] / 1e6:.1f}M -> {row['params_after'] / 1e6:.1f}M | "
                     f"{row['macs_before'] / 1e9:.2f}G -> {row['macs_after'] / 1e9:.2f}G | "
                     f"{d['median_s'] * 1e3:.0f} ({d['min_s'] * 1e3:.0f}-{d['max_s'] * 1e3:.0f}) | "
                     f"{c['median_s'] * 1e3:.0f} ({c['min_s'] * 1e3:.0f}-{c['max_s'] * 1e3:.0f}) | "
                     f"{row['speedup']:.2f} | {row['ideal_speedup_macs']:.2f} | {row['efficiency']:.2f} | {tp_text} |")
    lines.append(f"\nPyTorch eager, CPU, {args.threads} threads, input 1x256, median of {args.runs} alternating runs "
                 "(min-max); MACs counted on the traced graphs.")
    (out / "bench_prune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
