"""Two processes against one on the same job, on the CPU, with the default model.

- The data-parallel main job: `compile` (LoRAPrune's schedule) in one process with 2 threads, then under
  `accelerate launch` in two processes with 1 thread each (the same two cores): seconds per fine-tuning step,
  peak RSS of the largest process, and the all-reduce bytes per step against the LoRA factors' size.
- Sharded weights: `prune --criterion lora --steps 0` (standard LoRA factors) in one process, then `prune --shard`
  in two: wall time and peak RSS of the largest process (each holds half the rows).

On one 2-core machine this is a correctness-and-overhead figure, not a speedup. Peak RSS is the high-water mark
of the launched process tree (`wait4`: the largest of the launcher and its workers). Run nothing else meanwhile.

    .venv/bin/python tools/bench_parallel.py --out runs/bench_parallel --steps 8 [--resume]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def job(folder: Path, resume: bool, measure) -> dict:
    """One job's row, measured (and kept in FOLDER/row.json), or with `resume` read back from an earlier run."""
    saved = folder / "row.json"
    if resume and saved.is_file():
        return json.loads(saved.read_text())
    row = measure()
    saved.write_text(json.dumps(row, indent=1) + "\n")
    return row


def run(cmd: list[str], threads: int) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of `cmd`'s process tree."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK", "MASTER_"))}
    env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed (exit {os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}")
    return seconds, usage.ru_maxrss / 1024


def model_bytes(folder: Path, r: int = 8) -> tuple[int, int]:
    """fp32 bytes of rank-r factors on every linear layer but the output head (what the all-reduce carries), and
    of the model's weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model.tie_weights()
    head = model.get_output_embeddings()
    factors = sum(4 * r * (m.in_features + m.out_features) for m in model.modules()
                  if isinstance(m, torch.nn.Linear) and m is not head)
    return factors, sum(4 * p.numel() for p in model.parameters())


def hf_folder(out: Path) -> Path:
    """The default model as a Hugging Face safetensors folder (what `--shard` reads one slice per process)."""
    folder = out / "smollm2-hf"
    if not (folder / "config.json").is_file():
        from loraprune.models.load import load_model

        loaded = load_model(None)
        loaded.model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_parallel")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=8, help="LoRAPrune steps of the compile")
    parser.add_argument("--resume", action="store_true", help="keep the rows of jobs an earlier run finished")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = hf_folder(out)
    factors, weight_bytes = model_bytes(model)
    rows = []
    compile_args = ["-m", "loraprune", "compile", str(model), "--force", "--device", "cpu", "--criterion",
                    "lora", "--ratio", str(args.ratio), "--steps", str(args.steps), "--no-bench", "--eval-windows", "2",
                    "--gen-tokens", "0", "--quiet"]
    for n, threads in ((1, 2), (2, 1)):
        folder = out / f"compile_{n}"
        head = [sys.executable] if n == 1 else LAUNCH

        def compile_row(folder=folder, head=head, n=n, threads=threads) -> dict:
            seconds, rss = run([*head, *compile_args, "--out", str(folder), "--threads", str(threads)], threads)
            report = json.loads((folder / "report.json").read_text())
            finetune = report["finetune"]
            return {"job": "compile (LoRAPrune schedule)", "processes": n, "threads_each": threads,
                    "wall_s": seconds, "peak_rss_mib": rss, "step_s": report["timings"]["prune_finetune"] / args.steps,
                    "allreduce_bytes_per_step": finetune.get("allreduce_bytes_per_step", 0)}

        rows.append(job(folder, args.resume, compile_row))
    prune_args = ["-m", "loraprune", "prune", str(model), "--force", "--device", "cpu", "--criterion", "lora",
                  "--steps", "0", "--lora-init", "standard", "--ratio", str(args.ratio)]
    for n, threads in ((1, 2), (2, 1)):
        folder = out / f"prune_{n}"
        head = [sys.executable] if n == 1 else LAUNCH

        def prune_row(folder=folder, head=head, n=n, threads=threads) -> dict:
            seconds, rss = run([*head, *prune_args, "--out", str(folder), *(["--shard"] if n == 2 else [])],
                               threads)
            report = json.loads((folder / "report.json").read_text())
            return {"job": "prune, LoRA criterion once" + (" (--shard)" if n == 2 else ""), "processes": n,
                    "threads_each": threads, "wall_s": seconds, "peak_rss_mib": rss,
                    "weights_mib": report.get("weight_bytes_per_process", weight_bytes) / 2**20}

        rows.append(job(folder, args.resume, prune_row))
    lines = [f"# Two processes against one, CPU, SmolLM2-135M (ratio {args.ratio}, {args.steps} LoRAPrune steps)",
             "", "| job | processes x threads | wall s | s per step | peak RSS MiB (largest process) | "
             "weights held per process MiB | all-reduce bytes per step |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        step = f"{r['step_s']:.2f}" if "step_s" in r else "-"
        sent = f"{r['allreduce_bytes_per_step']:,.0f}" if r.get("allreduce_bytes_per_step") else "-"
        held = r.get("weights_mib", weight_bytes / 2**20)
        lines.append(f"| {r['job']} | {r['processes']} x {r['threads_each']} | {r['wall_s']:.0f} | {step} | "
                     f"{r['peak_rss_mib']:.0f} | {held:.0f} | {sent} |")
    c1, c2, p1, p2 = rows
    lines += ["", f"LoRA factors (r=8, fp32): {factors:,} bytes; the 2-process all-reduce carries "
              f"{c2['allreduce_bytes_per_step'] / factors:.4f}x that per step (the factors' gradients and two "
              f"counters). Compile: 2 processes / 1, s per step {c2['step_s'] / c1['step_s']:.2f}x, peak RSS "
              f"{c2['peak_rss_mib'] / c1['peak_rss_mib']:.2f}x. Sharded prune / one process: wall "
              f"{p2['wall_s'] / p1['wall_s']:.2f}x, peak RSS {p2['peak_rss_mib'] / p1['peak_rss_mib']:.2f}x, "
              f"weights held per process {p2['weights_mib'] / p1['weights_mib']:.2f}x."]
    text = "\n".join(lines) + "\n"
    (out / "bench_parallel.md").write_text(text)
    summary = {"args": vars(args), "factor_bytes": factors, "weight_bytes": weight_bytes, "rows": rows}
    (out / "bench_parallel.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
