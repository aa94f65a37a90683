"""Benchmark: held-out perplexity of SmolLM2-135M pruned by lora / taylor / activation / flap / magnitude / random,
each one-shot and with the same LoRA fine-tuning budget, recovered by the next-token loss or by distillation from
the dense model; in-domain and out-of-domain perplexity; scoring memory and time of each data criterion;
Torch-Pruning's Taylor pruning as an outside reference.

    .venv/bin/python tools/bench_quality.py --ratios 0.2 0.5 --out runs/bench_quality [--parts quality scoring tp]

Protocol. Perplexity: design.md's (held-out windows of 256 tokens, the first 64, count reported). Fine-tuning
budget, identical for every criterion: `--steps` AdamW steps on LoRA factors (r=8, alpha=16, all linear layers),
`--batch` windows of `--window` tokens of the training split per step, lr `--lr`, `--seed` (LoRA factors, dropout,
criterion randomness; the data order is fixed). "lora + recovery" is LoRAPrune's schedule (masks grow on the cubic
schedule during those steps); the other criteria prune one-shot and then fine-tune the compact model with
`lora_recover` for the same steps. One-shot data criteria (lora, taylor, activation, flap) score on the first
`--calib` training batches. Recovery "next-token" is the causal-LM loss on the training split; "distill" is KL(dense
teacher || student) on the logits (`--distill-weight` of the loss, the rest next-token; `--temperature`): in the
schedule the teacher is the dense model rebuilt in memory (`DenseTeacher`), after a one-shot criterion the dense
model itself; "distill-topk" (one-shot criteria) learns from the dense model's `--topk` most likely tokens per
position, computed for every training batch before the recovery starts (`TopKTeacher`: the dense model is not needed
while the compact one trains); the teacher's memory is in the table. Fine-tuning memory: the peak RSS the recovery
stage adds over what was resident before it (its working copy of the model, LoRA factors, optimiser state,
activations; the schedule's rebuilt teacher; the top-k teacher's cache), plus, for "distill" after a one-shot
criterion, the dense teacher, resident before the stage and held through it. Out-of-domain perplexity: the same
protocol on `--ood-data` (default: the licence texts of /usr/share/common-licenses), text the fine-tuning never saw
from another source. Scoring memory and time: each criterion alone in a fresh process (`--scoring-runs` alternating
rounds), peak RSS above the RSS before scoring (VmHWM reset before it, after a one-batch warm-up call), wall time,
the peak of live tensors the scoring adds (a further, profiled call: torch's allocations, free of what glibc keeps
resident; the CPU analogue of the CUDA allocator's peak), and the bytes of parameter gradients held; each criterion
also with activation checkpointing (`+checkpointed`: every decoder layer recomputed in the backward pass, so the
activations no longer hide the gradient memory).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CRITERIA = ("lora", "taylor", "activation", "flap", "magnitude", "random")
RECOVERIES = ("next-token", "distill", "distill-topk")
PARTS = ("quality", "scoring", "tp")
CHECKPOINTED = "checkpointed"  # scoring variant: every decoder layer recomputed in the backward pass
SCORING = ("lora", "taylor", f"lora+{CHECKPOINTED}", f"taylor+{CHECKPOINTED}", "activation", "flap")


def _setup(args):
    import torch

    from loraprune.data import load_corpus, token_windows
    from loraprune.evaluate import heldout_windows
    from loraprune.models.load import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    corpus = load_corpus(args.data)
    train = token_windows(corpus.train, loaded.tokenizer, args.window, args.steps * args.batch)
    batches = list(train.split(args.batch))
    evals = heldout_windows(corpus, loaded.tokenizer, window=256, max_windows=args.eval_windows)
    example = train[:1, :16]
    return loaded, corpus, batches, evals, example


def scoring_worker(args) -> dict:
    """One criterion's scoring in this (fresh) process: seconds, peak RSS increase, gradient bytes.

    A one-batch warm-up call first, so one-time allocations (thread pools, kernel caches) are resident before
    the measured call; then `stage_memory_mb` (VmHWM reset, malloc_trim) gives the peak the scoring adds."""
    from loraprune.lora.training import GradientStats
    from loraprune.passes.criteria import CRITERIA as TABLE
    from loraprune.passes.dependency import analyze
    from loraprune.runtime.bench import stage_allocated_mb, stage_memory_mb

    loaded, _, batches, _, example = _setup(args)
    analysis = analyze(loaded.model, (example,))
    criterion, _, variant = args.scoring_worker.partition("+")
    score = TABLE[criterion]
    checkpointing = variant == CHECKPOINTED
    score(loaded.model, analysis.groups, batches=batches[:1], checkpointing=checkpointing)
    stats = GradientStats()
    start = time.perf_counter()
    peak_mb = stage_memory_mb(lambda: score(loaded.model, analysis.groups, batches=batches[: args.calib],
                                            stats=stats, checkpointing=checkpointing))
    seconds = time.perf_counter() - start
    live_mb = stage_allocated_mb(lambda: score(loaded.model, analysis.groups, batches=batches[: args.calib],
                                               checkpointing=checkpointing))
    return {"criterion": args.scoring_worker, "seconds": seconds, "peak_rss_bytes": (peak_mb or 0.0) * 2**20,
            "peak_live_bytes": live_mb * 2**20, "grad_bytes": stats.grad_bytes,
            "params_with_grad": stats.params_with_grad}


def tp_worker(args) -> dict:
    """Torch-Pruning 1.6.1 Taylor pruning (its LLM example's MetaPruner) at this ratio, then perplexity."""
    import torch
    import torch_pruning as tp
    from tp_reference import make_tp_pruner

    from loraprune.api import count_params
    from loraprune.evaluate import perplexity
    from loraprune.lora.training import causal_lm_loss

    loaded, _, batches, evals, example = _setup(args)
    model = loaded.model
    before = count_params(model)
    start = time.perf_counter()
    pruner = make_tp_pruner(model, example, args.tp_worker, importance=tp.importance.TaylorImportance())
    for batch in batches[: args.calib]:
        causal_lm_loss(model, batch).backward()
    pruner.step()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        ppl = perplexity(model, evals, progress=False)
    return {"params_before": before, "params_after": count_params(model), "seconds": seconds, "ppl": ppl.ppl}


def _worker(flag: str, value: str, args, limit: float) -> dict:
    cmd = [sys.executable, __file__, flag, value, "--threads", str(args.threads), "--steps", str(args.steps),
           "--batch", str(args.batch), "--window", str(args.window), "--calib", str(args.calib)]
    if args.model:
        cmd += ["--model", args.model]
    if args.data:
        cmd += ["--data", *args.data]
    cmd += ["--eval-windows", str(args.eval_windows)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"status": f"> {limit:.0f} s (did not finish)"}
    if proc.returncode != 0:
        return {"status": "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ood_windows(args, tokenizer):
    from loraprune.data import load_out_of_domain
    from loraprune.evaluate import heldout_windows

    ood = load_out_of_domain(args.ood_data)
    if ood is None:
        raise SystemExit("no out-of-domain text: pass --ood-data FILE (the default, /usr/share/common-licenses, is "
                         "not on this machine)")
    return ood.source, heldout_windows(ood, tokenizer, window=256, max_windows=args.eval_windows)


def _recover(compact, dense, batches, recovery: str, args, lora_kwargs: dict):
    """LoRA recovery of a one-shot model: (the recovered model, its teacher or None)."""
    from loraprune.lora.distill import Distillation, ModelTeacher, TopKTeacher
    from loraprune.lora.training import causal_lm_loss, lora_recover

    teacher = None
    if recovery == "distill":
        teacher = ModelTeacher(dense)
    elif recovery == "distill-topk":
        teacher = TopKTeacher(dense, batches, k=args.topk, temperature=args.temperature)
    loss = causal_lm_loss if teacher is None else Distillation(teacher, args.distill_weight, args.temperature).loss
    return lora_recover(compact, batches, **lora_kwargs, loss_fn=loss)[0], teacher


def _measured(fn):
    """(what `fn` returns, the peak RSS MiB it adds, its seconds)."""
    from loraprune.runtime.bench import stage_memory_mb

    returned = []
    start = time.perf_counter()
    peak_mb = stage_memory_mb(lambda: returned.append(fn()))
    return returned[0], peak_mb, time.perf_counter() - start


def done_cells(rows: list[dict], scope: str, spread: float | None) -> set[tuple[float, str, str]]:
    """The (ratio, criterion, recovery) cells `rows` already hold for this selection; rows written before rows
    recorded their scope are uniform ones."""
    return {(r["ratio"], r["criterion"], r["recovery"]) for r in rows
            if (r.get("scope", "uniform"), r.get("spread")) == (scope, spread)}


def quality(args, out: Path) -> dict:
    from tqdm.auto import tqdm

    from loraprune.api import count_params, prune
    from loraprune.config import LoRAPruneConfig, make_config
    from loraprune.evaluate import perplexity
    from loraprune.lora.distill import ModelTeacher
    from loraprune.passes.dependency import analyze

    loaded, corpus, batches, evals, example = _setup(args)
    ood_source, ood = _ood_windows(args, loaded.tokenizer)
    dense = loaded.model
    analysis = analyze(dense, (example,))
    lora_kwargs = {"steps": args.steps, "lr": args.lr, "seed": args.seed, "batch_size": args.batch, "progress": True,
                   "init": args.lora_init}
    dense_ppl = perplexity(dense, evals)
    dense_ood = perplexity(dense, ood)
    partial = out / "quality_partial.json"
    rows = json.loads(partial.read_text()) if args.resume and partial.exists() else []
    done = done_cells(rows, args.scope, args.spread)
    cells = [(r, c, k) for r in args.ratios for c in args.criteria for k in args.recoveries
             if (r, c, k) not in done and (c, k) != ("lora", "distill-topk")]  # the schedule rebuilds its teacher
    one_shots: dict[tuple[float, str], tuple] = {}  # both recoveries start from the same one-shot model
    for ratio, criterion, recovery in tqdm(cells, desc="quality"):
        if (ratio, criterion) not in one_shots:
            config = make_config(criterion, ratio=ratio, scope=args.scope, spread=args.spread, seed=args.seed,
                                 init=args.lora_init, steps=0)
            pruned = prune(dense, example, config, analysis=analysis, batches=batches[: args.calib])
            one_shots = {(ratio, criterion): (pruned, perplexity(pruned.model, evals).ppl)}
        one_shot, ppl_one_shot = one_shots[(ratio, criterion)]
        distill = args.distill_weight if recovery.startswith("distill") else 0.0
        if criterion == "lora":
            config = LoRAPruneConfig(ratio=ratio, scope=args.scope, spread=args.spread,
                                     update_every=args.update_every, cooldown=args.cooldown, lam=args.lam,
                                     count_macs=False, distill=distill, temperature=args.temperature, **lora_kwargs)
            finetune = functools.partial(prune, dense, example, config, batches=batches)
        else:
            finetune = functools.partial(_recover, one_shot.model, dense, batches, recovery, args, lora_kwargs)
        returned, peak_mb, seconds = _measured(finetune)
        if criterion == "lora":
            result = returned
            recovered, params_recovered = result.model, result.report.params_after
            teacher_bytes = result.report.teacher_bytes
        else:
            recovered, teacher = returned
            params_recovered = count_params(recovered)
            teacher_bytes = 0 if teacher is None else teacher.bytes
            if isinstance(teacher, ModelTeacher) and peak_mb is not None:
                peak_mb += teacher_bytes / 2**20  # the dense model, resident before the stage and held through it
        row = {"ratio": ratio, "criterion": criterion, "recovery": recovery, "scope": args.scope,
               "spread": args.spread,
               "params_one_shot": one_shot.report.params_after, "params_recovered": params_recovered,
               "ppl_one_shot": ppl_one_shot, "ppl_recovered": perplexity(recovered, evals).ppl,
               "ppl_ood_recovered": perplexity(recovered, ood).ppl, "teacher_bytes": teacher_bytes,
               "finetune_seconds": seconds, "finetune_peak_mb": peak_mb}
        rows.append(row)
        tqdm.write(json.dumps(row))
        partial.write_text(json.dumps(rows, indent=1))
    return {"dense_ppl": dense_ppl.ppl, "dense_ppl_ood": dense_ood.ppl, "eval_windows": dense_ppl.windows,
            "eval_window_len": dense_ppl.window_len, "ood_windows": dense_ood.windows, "ood_text": ood_source,
            "params_dense": count_params(dense), "corpus": corpus.source, "rows": rows}


def scoring(args) -> dict:
    runs: dict[str, list[dict]] = {name: [] for name in SCORING}
    for _ in range(args.scoring_runs):
        for criterion in runs:
            runs[criterion].append(_worker("--scoring-worker", criterion, args, 900))
    summary = {}
    for criterion, results in runs.items():
        ok = [r for r in results if "seconds" in r]
        if ok:
            summary[criterion] = {
                "seconds_median": statistics.median(r["seconds"] for r in ok),
                "seconds_min": min(r["seconds"] for r in ok), "seconds_max": max(r["seconds"] for r in ok),
                "peak_rss_mb_median": statistics.median(r["peak_rss_bytes"] for r in ok) / 2**20,
                "peak_live_mb_median": statistics.median(r["peak_live_bytes"] for r in ok) / 2**20,
                "grad_mb": ok[0]["grad_bytes"] / 2**20, "params_with_grad": ok[0]["params_with_grad"]}
        else:
            summary[criterion] = {"status": results[0].get("status", "failed")}
    for suffix in ("", f"+{CHECKPOINTED}"):
        lora, taylor = summary[f"lora{suffix}"], summary[f"taylor{suffix}"]
        if "seconds_median" in lora and "seconds_median" in taylor:
            summary[f"lora_over_taylor{suffix}"] = {
                "peak_rss": lora["peak_rss_mb_median"] / taylor["peak_rss_mb_median"],
                "peak_live": lora["peak_live_mb_median"] / taylor["peak_live_mb_median"],
                "seconds": lora["seconds_median"] / taylor["seconds_median"],
                "grad_bytes": lora["grad_mb"] / taylor["grad_mb"]}
    return {"runs": runs, "summary": summary}


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _markdown(results: dict, args) -> str:
    lines = [f"# Pruning quality: {results.get('model', 'SmolLM2-135M')}", ""]
    q = results.get("quality")
    if q:
        lines += [f"Held-out perplexity ({q['eval_windows']} windows x {q['eval_window_len']} tokens of "
                  f"{q['corpus']}); dense: **{q['dense_ppl']:.2f}** ({q['params_dense'] / 1e6:.1f}M params). "
                  f"Fine-tuning budget: {args.steps} steps x {args.batch}x{args.window} tokens, LoRA r=8 "
                  f"({args.lora_init} init), lr {args.lr}, seed {args.seed}; selection scope {args.scope}"
                  f"{'' if args.spread is None else f' (spread {args.spread:g})'}; lora "
                  f"schedule cool-down "
                  f"{args.cooldown:g}, score average lam {args.lam:g}; one-shot data criteria use {args.calib} "
                  f"batches; distillation: KL share {args.distill_weight:g}, temperature {args.temperature:g}, "
                  f"top-k teacher k={args.topk}. "
                  f"Out-of-domain: {q['ood_windows']} windows x 256 tokens of {q['ood_text']}; dense: "
                  f"**{q['dense_ppl_ood']:.2f}**.", "",
                  "| ratio | criterion | recovery | params | ppl one-shot | ppl recovered | out-of-domain ppl "
                  "recovered (x dense) | teacher MiB | fine-tune peak MiB | fine-tune s |",
                  "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in q["rows"]:
            lines.append(f"| {r['ratio']:g} | {r['criterion']} | {r['recovery']} | "
                         f"{r['params_recovered'] / 1e6:.1f}M | {r['ppl_one_shot']:.2f} | {r['ppl_recovered']:.2f} | "
                         f"{r['ppl_ood_recovered']:.2f} "
                         f"({r['ppl_ood_recovered'] / q['dense_ppl_ood']:.2f}x) | {r['teacher_bytes'] / 2**20:.1f} | "
                         f"{_mib(r.get('finetune_peak_mb'))} | {r['finetune_seconds']:.0f} |")
    s = results.get("scoring")
    if s:
        lines += ["", f"Scoring ({args.calib} batches of {args.batch}x{args.window}), each in a fresh process, "
                  f"{args.scoring_runs} alternating rounds, median (min-max):", "",
                  "| criterion | seconds | peak RSS above baseline MiB | peak live tensors MiB | "
                  "parameter-gradient MiB |", "|---|---:|---:|---:|---:|"]
        for name in SCORING:
            c = s["summary"][name]
            if "status" in c:
                lines.append(f"| {name} | {c['status']} | | | |")
            else:
                lines.append(f"| {name} | {c['seconds_median']:.1f} ({c['seconds_min']:.1f}-{c['seconds_max']:.1f})"
                             f" | {c['peak_rss_mb_median']:.0f} | {c['peak_live_mb_median']:.0f}"
                             f" | {c['grad_mb']:.1f} |")
        for suffix in ("", f"+{CHECKPOINTED}"):
            ratio = s["summary"].get(f"lora_over_taylor{suffix}")
            if ratio:
                lines.append(f"\nlora{suffix} / taylor{suffix}: peak RSS {ratio['peak_rss']:.2f}, peak live tensors "
                             f"{ratio['peak_live']:.2f}, time {ratio['seconds']:.2f}, gradient bytes "
                             f"{ratio['grad_bytes']:.3f}")
    tp_rows = results.get("torch_pruning")
    if tp_rows:
        lines += ["", "Torch-Pruning 1.6.1 TaylorImportance (MetaPruner, its LLM example's settings):", ""]
        for ratio, r in tp_rows.items():
            lines.append(f"- ratio {ratio}: " + (r.get("status") or f"params {r['params_after'] / 1e6:.1f}M, "
                                                  f"ppl {r['ppl']:.2f}, {r['seconds']:.0f} s"))
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    q = results["quality"]
    ratios = sorted({r["ratio"] for r in q["rows"]})
    texts = (("ppl_recovered", "dense_ppl", "in-domain"), ("ppl_ood_recovered", "dense_ppl_ood", "out-of-domain"))
    fig = Figure(figsize=(5 * len(ratios), 8), layout="constrained")
    FigureCanvasAgg(fig)
    for i, ratio in enumerate(ratios):
        rows = [r for r in q["rows"] if r["ratio"] == ratio]
        criteria = list(dict.fromkeys(r["criterion"] for r in rows))
        recoveries = list(dict.fromkeys(r["recovery"] for r in rows))
        x = np.arange(len(criteria))
        for j, (key, dense_key, text) in enumerate(texts):
            ax = fig.add_subplot(2, len(ratios), j * len(ratios) + i + 1)
            width = 0.8 / len(recoveries)
            for k, recovery in enumerate(recoveries):
                value = {r["criterion"]: r[key] for r in rows if r["recovery"] == recovery}
                ax.bar(x + (k - (len(recoveries) - 1) / 2) * width, [value.get(c, np.nan) for c in criteria], width,
                       label=f"{recovery} recovery")
            ax.axhline(q[dense_key], color="black", linestyle="--", linewidth=0.8, label="dense")
            ax.set_yscale("log")
            ax.set_xticks(x, criteria)
            ax.set_title(f"{ratio:g} of prunable units removed: {text}")
            ax.set_ylabel("perplexity after recovery (log)")
            ax.legend()
    fig.savefig(path, dpi=120)


def main() -> None:
    from loraprune.lora.adapters import LORA_INITS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--out", default="runs/bench_quality")
    parser.add_argument("--model", default=None, help=".gguf or HF folder (default SmolLM2-135M)")
    parser.add_argument("--data", nargs="*", default=None, help=".txt/.jsonl files (default pydoc topics)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    parser.add_argument("--recoveries", nargs="+", default=list(RECOVERIES), choices=RECOVERIES)
    parser.add_argument("--distill-weight", type=float, default=1.0, help="KL share of the distillation loss")
    parser.add_argument("--temperature", type=float, default=1.0, help="of the distillation loss")
    parser.add_argument("--topk", type=int, default=64, help="distill-topk: tokens kept per position")
    parser.add_argument("--ood-data", nargs="*", default=None,
                        help="out-of-domain .txt/.jsonl (default: /usr/share/common-licenses)")
    parser.add_argument("--resume", action="store_true", help="keep the rows of quality_partial.json in --out")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--calib", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=64, help="at most this many (protocol: 64)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--update-every", type=int, default=5)
    parser.add_argument("--cooldown", type=float, default=0.5, help="share of the lora steps after the last cut")
    parser.add_argument("--lam", type=float, default=0.9, help="lora schedule: moving average of the scores")
    parser.add_argument("--scope", choices=["uniform", "global"], default="uniform",
                        help="the same ratio in every layer, or one parameter budget across layers and kinds")
    parser.add_argument("--spread", type=float, default=None,
                        help="global scope: each group removes within this share of its units of the uniform cut")
    parser.add_argument("--lora-init", choices=sorted(LORA_INITS), default="pissa")
    parser.add_argument("--seed", type=int, default=0, help="LoRA factors, dropout and criterion randomness")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scoring-runs", type=int, default=3)
    parser.add_argument("--tp-limit", type=float, default=300.0)
    parser.add_argument("--scoring-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tp-worker", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 0.0 <= args.lam < 1.0:
        parser.error(f"--lam must be in [0, 1), got {args.lam!r}")
    if args.scoring_worker:
        print(json.dumps(scoring_worker(args)))
        return
    if args.tp_worker is not None:
        print(json.dumps(tp_worker(args)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "quality.json"
    results = json.loads(path.read_text()) if path.exists() else {}  # parts run separately share one file
    results["settings"] = vars(args)
    if "quality" in args.parts:
        results["quality"] = quality(args, out)
        _plot(results, out / "quality.png")
    if "scoring" in args.parts:
        results["scoring"] = scoring(args)
    if "tp" in args.parts:
        results["torch_pruning"] = {f"{r:g}": _worker("--tp-worker", str(r), args, args.tp_limit)
                                    for r in args.ratios}
    path.write_text(json.dumps(results, indent=1, default=str))
    (out / "quality.md").write_text(_markdown(results, args))
    print(_markdown(results, args))


if __name__ == "__main__":
    main()
