"""ONNX export time of a saved (compact) model: the prefill graph, then the decode graph, in one process.

Prints each graph's export seconds, node count and a digest of its op sequence, so two checkouts can be
compared on the same model (same digest: the same graph). Run nothing else meanwhile.

    .venv/bin/python tools/bench_export.py runs/smollm2_flap/model --out runs/bench_export
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import onnx
import torch

from loraprune.models.load import load_model
from loraprune.models.save import load_pretrained
from loraprune.runtime.export import export_decode, export_prefill


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a compile's model/ folder, or a Hugging Face model folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the exported graphs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not args.model.is_dir():
        parser.error(f"no model folder at {args.model}")
    torch.set_num_threads(args.threads)
    compact = (args.model / "loraprune_plan.json").exists()
    model = (load_pretrained(args.model) if compact else load_model(str(args.model)).model).eval()
    print("| graph | export s | nodes | op sequence digest |\n|---|---:|---:|---|")
    for name, export in (("prefill", export_prefill), ("decode", export_decode)):
        start = time.perf_counter()
        path = export(model, args.out / f"{name}.onnx")
        seconds = time.perf_counter() - start
        ops = [node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node]
        digest = hashlib.sha256(" ".join(ops).encode()).hexdigest()[:12]
        print(f"| {name} | {seconds:.1f} | {len(ops)} | {digest} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
