"""Benchmark: trace + dependency analysis of loraprune vs Torch-Pruning's dependency-graph build.

Each measurement runs in its own subprocess (fresh memory, a hard time limit), alternating the tools,
on SmolLM2-135M-Instruct with Torch-Pruning's LLM-example settings (input 1x64, num_heads per projection,
head pruning on); plus loraprune on a LLaMA-3-8B-shaped config on the meta device.

    .venv/bin/python tools/bench_dependency.py --out runs/bench_dependency [--repeats 3] [--limit 120]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(which: str, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from measure import measure_stage

    torch.set_num_threads(threads)
    if which == "loraprune_8b_meta":
        from transformers import LlamaConfig, LlamaForCausalLM

        from loraprune import analyze

        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192)
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        ids = torch.zeros(1, 64, dtype=torch.long, device="meta")
        analysis, seconds, peak = measure_stage(lambda: analyze(model, (ids,)))
        return {"seconds": seconds, "peak_rss_mb": peak / 2**20, "groups": analysis.by_kind()}
    from loraprune.models.load import load_model

    model = load_model(None).model
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    if which == "loraprune":
        from loraprune import analyze

        analysis, seconds, peak = measure_stage(lambda: analyze(model, (ids,)))
        return {"seconds": seconds, "peak_rss_mb": peak / 2**20, "groups": analysis.by_kind()}
    from tp_reference import make_tp_pruner

    pruner, seconds, peak = measure_stage(lambda: make_tp_pruner(model, ids, 0.5))
    groups = sum(1 for _ in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                     root_module_types=pruner.root_module_types))
    return {"seconds": seconds, "peak_rss_mb": peak / 2**20, "groups": {"all": groups}}


def run(which: str, limit: float, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", which, "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "status": f"> {limit:.0f} s (did not finish)"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"seconds": None, "status": f"failed: {tail[:200]}"}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "status": "ok"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_dependency")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=float, default=120.0, help="seconds before a run is stopped")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", default=None)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads)))
        return
    from tqdm import tqdm

    runs: dict[str, list[dict]] = {"loraprune": [], "torch_pruning": [], "loraprune_8b_meta": []}
    order = [w for _ in range(args.repeats) for w in ("loraprune", "torch_pruning", "loraprune_8b_meta")]
    for which in tqdm(order, desc="runs"):
        if which == "torch_pruning" and runs[which] and runs[which][-1]["seconds"] is None:
            continue  # it did not finish once: waiting again tells nothing new
        runs[which].append(run(which, args.limit, args.threads))
    rows = {}
    for which, results in runs.items():
        done = [r for r in results if r["seconds"] is not None]
        rows[which] = {"runs": results, "status": "ok" if done else results[-1]["status"],
                       "median_s": statistics.median(r["seconds"] for r in done) if done else None,
                       "min_s": min(r["seconds"] for r in done) if done else None,
                       "max_s": max(r["seconds"] for r in done) if done else None,
                       "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in done) if done else None}
    lp, tpr = rows["loraprune"], rows["torch_pruning"]
    ratio = (tpr["median_s"] / lp["median_s"]) if tpr["median_s"] and lp["median_s"] else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"threads": args.threads, "limit_s": args.limit, "rows": rows,
              "torch_pruning_over_loraprune_time": ratio}
    (out / "bench_dependency.json").write_text(json.dumps(result, indent=1))
    lines = ["| stage | median s (min-max) | peak RSS over baseline (MB) | status |", "|---|---|---|---|"]
    names = {"loraprune": "loraprune trace + groups, SmolLM2-135M",
             "torch_pruning": "Torch-Pruning 1.6.1 MetaPruner build, SmolLM2-135M",
             "loraprune_8b_meta": "loraprune trace + groups, LLaMA-3-8B shape on meta"}
    for which, row in rows.items():
        t = f"{row['median_s']:.2f} ({row['min_s']:.2f}-{row['max_s']:.2f})" if row["median_s"] else "-"
        mem = f"{row['peak_rss_mb']:.0f}" if row["peak_rss_mb"] is not None else "-"
        lines.append(f"| {names[which]} | {t} | {mem} | {row['status']} |")
    lines.append(f"\nthreads: {args.threads}; time ratio Torch-Pruning / loraprune: "
                 f"{f'{ratio:.2f}' if ratio else 'n/a (Torch-Pruning did not finish within the limit)'}")
    (out / "bench_dependency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
