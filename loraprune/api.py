"""The public verbs: analyze a model, prune it."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from loraprune.ir.groups import ChannelGroup
from loraprune.ir.plan import PrunePlan
from loraprune.ir.trace import trace
from loraprune.passes.dependency import Analysis, build_groups
from loraprune.passes.importance import CRITERIA, GroupScores, annotate_scores
from loraprune.passes.macs import count_macs
from loraprune.passes.rewrite import apply_plan, make_plan, masked_copy
from loraprune.passes.select import SelectConfig, select_units
from loraprune.passes.verify import compact_logits, compare_logits, logits

__all__ = ["PruneResult", "count_params", "prune"]


@dataclass
class PruneResult:
    model: nn.Module
    plan: PrunePlan
    groups: list[ChannelGroup]
    report: dict
    kept_units: dict = field(default_factory=dict)
    analysis: Analysis | None = None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune(model: nn.Module, example_inputs: tuple | torch.Tensor, ratio: float | None = None,
          criterion: str = "magnitude", config: SelectConfig | None = None, scores: GroupScores | None = None,
          analysis: Analysis | None = None, seed: int = 0, batches=None,
          checkpointing: bool = False, criterion_options: dict | None = None) -> PruneResult:
    """Prune `model` to a compact copy. The input model is never modified.

    `ratio` is the fraction of each prunable group's units removed (heads, MLP channels); `config` holds
    the other selection options. `scores` (from any criterion, e.g. LoRA-guided) overrides `criterion`.
    `batches` (token ids [b, seq] or a list of them) feed the gradient criteria ("lora", "taylor"), which
    recompute each decoder layer in their backward pass with `checkpointing` (less memory). The
    scores are written onto the analysis's graph (`annotate_scores`); the compact model is verified against
    the masked dense model on `example_inputs` (report["verify"]) and a failure raises. `criterion_options`
    go to the criterion as keywords (e.g. {"init": "pissa"} for "lora").
    """
    if config is None:
        config = SelectConfig(ratio=0.2 if ratio is None else ratio)
    elif ratio is not None and ratio != config.ratio:
        config = dataclasses.replace(config, ratio=ratio)  # validated again in __post_init__
    if scores is None and criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; known: {', '.join(sorted(CRITERIA))}")
    timings = {}
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    start = time.perf_counter()
    if analysis is None:
        analysis = build_groups(trace(model, example_inputs))
    timings["trace_and_dependency"] = time.perf_counter() - start
    start = time.perf_counter()
    if scores is None:
        scores = CRITERIA[criterion](model, analysis.groups, seed=seed, batches=batches, checkpointing=checkpointing,
                                     **(criterion_options or {}))
    annotate_scores(analysis.program, analysis.groups, scores, criterion)
    timings["importance"] = time.perf_counter() - start
    start = time.perf_counter()
    kept = select_units(analysis.groups, scores.units, config, scores.kv)
    plan = make_plan(analysis.groups, kept, analysis.param_shapes, analysis.program.aliases,
                     meta={"criterion": criterion, "select": config.to_dict()})
    compact = apply_plan(model, plan)
    timings["rewrite"] = time.perf_counter() - start
    start = time.perf_counter()
    check = compare_logits(logits(masked_copy(model, analysis.groups, kept), example_inputs),
                           compact_logits(compact, example_inputs), exact=not config.prune_hidden)
    if not check["ok"]:
        raise RuntimeError(f"rewrite verification failed: compact logits differ from the masked model's by "
                           f"{check['relative_diff']:.2e} (relative)")
    timings["verify"] = time.perf_counter() - start
    start = time.perf_counter()
    macs_before = count_macs(analysis.program.graph)
    macs_after = count_macs(trace(compact, example_inputs).graph)
    timings["count_macs"] = time.perf_counter() - start
    report = _report(model, compact, analysis, kept, config, criterion, macs_before, macs_after, timings)
    report["verify"] = check
    return PruneResult(compact, plan, analysis.groups, report, kept, analysis)


def _report(model, compact, analysis, kept, config, criterion, macs_before, macs_after, timings) -> dict:
    pruned = {}
    for g in analysis.groups:
        if len(kept[g.name]) < g.num_units:
            pruned[g.kind] = pruned.get(g.kind, 0) + 1
    units_total = sum(g.num_units for g in analysis.groups if g.kind != "hidden" or config.prune_hidden)
    units_kept = sum(len(kept[g.name]) for g in analysis.groups if g.kind != "hidden" or config.prune_hidden)
    before, after = count_params(model), count_params(compact)
    return {
        "ratio": config.ratio, "criterion": criterion, "select": config.to_dict(),
        "params_before": before, "params_after": after, "params_removed_fraction": 1 - after / before,
        "macs_before": macs_before, "macs_after": macs_after,
        "units_removed_fraction": 1 - units_kept / max(units_total, 1),
        "groups": analysis.by_kind(), "groups_pruned": pruned,
        "frozen": [{"node": f.node, "op": f.op, "reason": f.reason, "params": list(f.params)}
                   for f in analysis.frozen],
        "timings": timings,
    }

