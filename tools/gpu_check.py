"""The GPU check: the whole job on a device, in one run, with everything it measured written under --out.

1. compile (``--device --dtype --steps --target cuda``): the report's verify and ONNX Runtime parity;
2. node placement of the compact decode graph: no attention, MatMul or Gemm node on the CPU provider;
3. the fp16 graph far into the sequence: torch's fp32 greedy continuation of a prompt to --positions tokens,
   fed back through the fp16 prefill graph (top-1 agreement where fp32's top-2 margin is not a near tie, and
   the worst logit gap), and the free-running fp16 ORT loop against it (first divergent token);
4. the benchmark: dense vs compact, torch vs ORT, prefill and decode, efficiency against the ideal.

Writes ``gpu_check.json``, ``gpu_check.md`` and the bench's ``speedup.png`` under --out; the compiled folder
goes to a temporary folder (or --work). ``tools/gpu_check.sh`` runs it on the default model; the test
suite runs it with ``--device cpu`` on a tiny model, which takes the same path. Arguments it does not know go
to ``loraprune compile``. Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from loraprune.cli import main as loraprune_cli
from loraprune.models.save import load_pretrained
from loraprune.runtime.export import graph_name
from loraprune.runtime.generate import ort_generate
from loraprune.runtime.session import make_session, node_placement

HEAVY_OPS = ("Attention", "GroupQueryAttention", "MatMul", "FusedMatMul", "Gemm")
NEAR_TIE = 0.05  # fp32 top-1 minus top-2 logit below this: fp16 rounding may rightly flip the argmax


def _cli(*argv: str) -> None:
    code = loraprune_cli(list(argv))
    if code != 0:
        raise SystemExit(f"loraprune {argv[0]} exited with {code}")


def _placement(folder: Path, provider: str) -> dict:
    path = folder / "onnx" / graph_name("decode", "cuda")
    session = make_session(path, provider)
    feeds = {"input_ids": np.arange(1, 9, dtype=np.int64)[None], "attention_mask": np.ones((1, 8), np.int64)}
    feeds |= {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in session.get_inputs()
              if i.name.startswith("past_")}
    ops = node_placement(path, feeds, provider)
    on_cpu = {op: counts.get("CPUExecutionProvider", 0) for op, counts in ops.items() if op in HEAVY_OPS}
    heavy_on_cpu = provider == "cuda" and any(on_cpu.values())
    return {"graph": path.name, "ops": ops, "heavy_ops_on_cpu": on_cpu, "ok": not heavy_on_cpu}


def _long_context(folder: Path, device: str, positions: int) -> dict:
    """fp32 torch against the fp16 graphs over `positions` tokens; see the module doc."""
    provider = "cuda" if device.startswith("cuda") else "cpu"
    reference = load_pretrained(folder / "model", dtype=torch.float32, device=device).eval()
    prompt = torch.tensor([[1, 504, 3287, 314, 260, 1836, 30]]) % reference.config.vocab_size
    new = positions - prompt.shape[1]
    with torch.no_grad():
        tokens = reference.generate(prompt.to(device), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                    pad_token_id=0)
        ref_logits = reference(tokens).logits[0].float().cpu().numpy()
    tokens = tokens.cpu().numpy()
    prefill = make_session(folder / "onnx" / graph_name("prefill", "cuda", fp16=True), provider)
    fp16_logits = prefill.run(["logits"], {"input_ids": tokens, "attention_mask": np.ones_like(tokens)})[0]
    fp16_logits = fp16_logits[0].astype(np.float32)
    top2 = np.sort(ref_logits, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > NEAR_TIE
    agree = ref_logits.argmax(-1) == fp16_logits.argmax(-1)
    decode = make_session(folder / "onnx" / graph_name("decode", "cuda", fp16=True), provider)
    free_run = ort_generate(None, decode, prompt.numpy(), new)
    diverged = np.flatnonzero(free_run[0] != tokens[0])
    agreement = float(agree[clear].mean())
    return {"positions": positions, "clear_positions": int(clear.sum()), "top1_agreement": agreement,
            "max_abs_logit_gap": float(np.abs(ref_logits - fp16_logits).max()),
            "late_max_abs_logit_gap": float(np.abs(ref_logits - fp16_logits)[positions // 2:].max()),
            "free_run_first_divergence": int(diverged[0]) if diverged.size else None,
            "ok": agreement >= 0.99}


def _markdown(result: dict) -> str:
    c, p, lc = result["compile"], result["placement"], result["long_context"]
    lines = [f"# GPU check ({result['device']}, {result['dtype']}, {result['time']})", "",
             f"- compile: verify {c['verify_ok']} (bound {c['verify_tolerance']:.0e}), ORT parity {c['parity_ok']} "
             f"(relative diff {c['parity_diff']:.2e}), ppl {c['ppl_before']:.2f} -> {c['ppl_after']:.2f} "
             f"(ORT {c['ppl_after_onnx']:.2f}), {c['wall_s']:.0f} s",
             f"- placement of {p['graph']}: heavy ops on the CPU provider {p['heavy_ops_on_cpu']} "
             f"({'ok' if p['ok'] else 'FAILED'})",
             f"- fp16 over {lc['positions']} positions: top-1 agreement {lc['top1_agreement']:.4f} on "
             f"{lc['clear_positions']} clear positions, max logit gap {lc['max_abs_logit_gap']:.3f} "
             f"(second half {lc['late_max_abs_logit_gap']:.3f}), free-running fp16 loop first differs at "
             f"{lc['free_run_first_divergence']}", "", result["bench_md"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default=None, help="where the compiled folder goes (default: a temporary one)")
    parser.add_argument("--model", default=None, help="model folder or GGUF (default: SmolLM2-135M)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--steps", default="20")
    parser.add_argument("--ratio", default="0.5")
    parser.add_argument("--positions", type=int, default=2000)
    parser.add_argument("--bench-grid", nargs="+", default=["1x128", "1x512", "8x128"])
    parser.add_argument("--bench-runs", default="10")
    args, args.compile_args = parser.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        return _check(args, out, work / "compiled")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _check(args: argparse.Namespace, out: Path, folder: Path) -> int:
    model = [args.model] if args.model else []
    provider = "cuda" if args.device.startswith("cuda") else "cpu"

    start = time.perf_counter()
    _cli("compile", *model, "--criterion", "lora", "--device", args.device, "--dtype", args.dtype, "--steps",
         args.steps, "--ratio", args.ratio, "--target", "cuda", "--out", str(folder), "--force", "--no-bench",
         "--quiet", *args.compile_args)
    report = json.loads((folder / "report.json").read_text())
    compiled = {"verify_ok": report["verify"]["ok"], "verify_tolerance": report["verify"]["tolerance"],
                "parity_ok": report["onnx_parity"]["ok"], "parity_diff": report["onnx_parity"]["relative_diff"],
                "ppl_before": report["ppl_before"], "ppl_after": report["ppl_after"],
                "ppl_after_onnx": report["ppl_after_onnx"], "placement": report["placement"],
                "wall_s": time.perf_counter() - start}
    _cli("export", str(folder), "--fp16", "--target", "cuda")
    placement = _placement(folder, provider)
    long_context = _long_context(folder, args.device, args.positions)
    _cli("bench", str(folder), "--device", args.device, "--dtype", args.dtype, "--target", "cuda", "--fp16",
         "--grid", *args.bench_grid, "--runs", args.bench_runs)
    result = {"device": args.device, "dtype": args.dtype, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "compile": compiled, "placement": placement, "long_context": long_context,
              "bench": json.loads((folder / "bench" / "bench.json").read_text()),
              "bench_md": (folder / "bench" / "bench.md").read_text()}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "gpu_check.md").write_text(_markdown(result))
    shutil.copy(folder / "bench" / "speedup.png", out / "speedup.png")
    print(_markdown(result))
    checks = (compiled["verify_ok"], compiled["parity_ok"], placement["ok"], long_context["ok"])
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
