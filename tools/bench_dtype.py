"""bf16 against fp32: the same `loraprune compile` of the default model, one dtype after the other.

Each compile runs in its own process (peak RSS is the child's own high-water mark), with the same options and
seed; the table gives wall time, peak memory and held-out perplexity of each, and the ratios bf16 / fp32.
Run nothing else meanwhile: the timings are only comparable on a quiet machine.

    .venv/bin/python tools/bench_dtype.py --out runs/bench_dtype --ratio 0.5 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DTYPES = ("fp32", "bf16")


def compile_once(dtype: str, args: argparse.Namespace, out: Path) -> dict:
    """One compile in a fresh process: wall seconds, the process's peak RSS, and figures from its report."""
    folder = out / dtype
    cmd = [sys.executable, "-m", "loraprune", "compile", "--out", str(folder), "--force", "--device", "cpu",
           "--criterion", "lora", "--dtype", dtype, "--ratio", str(args.ratio), "--steps", str(args.steps),
           "--threads", str(args.threads), "--seed", str(args.seed), "--no-bench", "--quiet"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS alone
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the {dtype} compile failed (exit {os.waitstatus_to_exitcode(status)})")
    report = json.loads((folder / "report.json").read_text())
    return {"dtype": dtype, "seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024,
            "ppl_before": report["ppl_before"],
            "ppl_after": report["ppl_after"], "ppl_after_onnx": report["ppl_after_onnx"],
            "params_after": report["params_after"], "verify": report["verify"], "onnx_parity": report["onnx_parity"],
            "timings": report["timings"]}


def write_table(rows: list[dict], args: argparse.Namespace, out: Path) -> str:
    fp32, bf16 = rows
    lines = [f"# bf16 vs fp32 compile of SmolLM2-135M on the CPU (ratio {args.ratio}, {args.steps} LoRAPrune steps, "
             f"{args.threads} threads, seed {args.seed})", "",
             "| dtype | wall s | load / prune / export / evaluate s | peak RSS MiB | held-out ppl dense | "
             "ppl compact (torch) | ppl compact (ORT) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['dtype']} | {r['seconds']:.0f} | "
              + " / ".join(f"{r['timings'].get(k, 0):.0f}" for k in ("load", "prune", "export", "evaluate"))
              + f" | {r['peak_rss_mib']:.0f} | {r['ppl_before']:.2f} | {r['ppl_after']:.2f} | "
              f"{r['ppl_after_onnx']:.2f} |"
              for r in rows]
    lines += ["", f"bf16 / fp32: time {bf16['seconds'] / fp32['seconds']:.2f}x, peak RSS "
              f"{bf16['peak_rss_mib'] / fp32['peak_rss_mib']:.2f}x, compact perplexity "
              f"{bf16['ppl_after'] / fp32['ppl_after']:.3f}x. Peak RSS is each compile process's own high-water "
              "mark (the whole job: load, prune, export, evaluation)."]
    text = "\n".join(lines) + "\n"
    (out / "bench_dtype.md").write_text(text)
    (out / "bench_dtype.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_dtype")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=DTYPES, default=None,
                        help="run this dtype again and keep the other's row from OUT/bench_dtype.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    earlier = {}
    if args.only:
        earlier = {r["dtype"]: r for r in json.loads((out / "bench_dtype.json").read_text())["rows"]}
    rows = [compile_once(dtype, args, out) if args.only in (None, dtype) else earlier[dtype] for dtype in DTYPES]
    print(write_table(rows, args, out))


if __name__ == "__main__":
    main()
