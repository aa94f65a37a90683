"""The public verb: `prune(model, example_inputs, config) -> PruneResult`.

The config's type picks the method (torchao's `quantize_(model, config)` pattern): one-shot criteria score the
dense model once and rewrite it; LoRAPrune fine-tunes LoRA factors while its masks grow, then rewrites the base
weights and the factors alike. Either way the compact model is verified against the masked dense model before
it is returned, and the input model is never modified.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from loraprune.config import LoRAPruneConfig, MagnitudeConfig, PruneConfig
from loraprune.ir.groups import ChannelGroup
from loraprune.ir.plan import PrunePlan
from loraprune.ir.trace import trace
from loraprune.lora.adapters import add_lora, is_peft_model, plain_base, plain_groups, plain_name, plain_plan
from loraprune.lora.training import GradientStats, device_of
from loraprune.passes.criteria import CRITERIA, GroupScores, annotate_scores
from loraprune.passes.criteria.activations import bias_shifts
from loraprune.passes.dependency import Analysis, analyze, build_groups
from loraprune.passes.macs import count_macs
from loraprune.passes.rewrite import apply_plan, make_plan, masked_copy
from loraprune.passes.schedule import iterative_prune
from loraprune.passes.select import select_units, takes_token_ids
from loraprune.passes.verify import compact_logits, compare_logits, logits, model_dtype

if TYPE_CHECKING:
    from loraprune.parallel import DataParallel

__all__ = ["PruneReport", "PruneResult", "count_params", "prune"]


@dataclass
class PruneReport:
    """What a prune did, in figures. `to_dict()` gives the JSON form written beside saved models.

    `verify` is the rewrite check (compact logits against the masked dense model's); `history` holds one record
    per mask update of LoRAPrune's schedule (empty for one-shot criteria); `lora_params` counts adapter
    parameters left in an unmerged result.
    """

    criterion: str
    config: dict[str, Any]
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    units_removed_fraction: float
    groups: dict[str, int]
    groups_pruned: dict[str, int]
    frozen: list[dict[str, Any]]
    verify: dict[str, Any]
    timings: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    lora_params: int = 0
    merged: bool = True
    biases_compensated: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the prune changed from its config, and why
    teacher_bytes: int = 0

    @property
    def params_removed_fraction(self) -> float:
        return 1 - self.params_after / self.params_before

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"params_removed_fraction": self.params_removed_fraction}


@dataclass
class PruneResult:
    """The compact model (same call signature as the input), its plan, the groups it was cut by, the kept
    unit ids per group, the analysis it was made from, the report, and the dense model's config (with the plan
    it rebuilds the compact model's shapes: `save_pretrained(result, out)` needs nothing else)."""

    model: nn.Module
    plan: PrunePlan
    groups: list[ChannelGroup]
    report: PruneReport
    kept_units: dict[str, np.ndarray] = field(default_factory=dict)
    analysis: Analysis | None = None
    dense_config: Any = None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


Batches = torch.Tensor | list[torch.Tensor] | None


def prune(model: nn.Module, example_inputs: tuple | torch.Tensor, config: PruneConfig | None = None, *,
          batches: Batches = None, analysis: Analysis | None = None, scores: GroupScores | None = None,
          stats: GradientStats | None = None, parallel: DataParallel | None = None) -> PruneResult:
    """Prune `model` to a compact copy by the method `config` names (default `MagnitudeConfig()`).

    `example_inputs` are traced for the dependency pass and used to verify the rewrite. `batches` (token ids
    [b, seq], or a list of them) are the calibration data of gradient criteria and the fine-tuning data of
    LoRAPrune. One-shot methods accept a ready `analysis` of `model` and ready `scores` (which then replace the
    criterion's); `stats` records the gradient memory a gradient criterion needed. With `parallel` (the
    processes of an Accelerate launch, `loraprune.parallel.launched()`) LoRAPrune's steps are data-parallel.
    """
    config = MagnitudeConfig() if config is None else config
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a PruneConfig (MagnitudeConfig, TaylorConfig, LoRAPruneConfig, ...), "
                        f"got {type(config).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    device = device_of(model)  # traced and verified where the model lives
    example_inputs = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in example_inputs)
    token_ids = takes_token_ids(example_inputs)
    hidden_by_default = config.prune_hidden is None and not token_ids
    config = config.resolved(token_ids)  # the defaults a language model or another model takes
    if isinstance(config, LoRAPruneConfig) and config.steps > 0:
        if analysis is not None or scores is not None:
            raise ValueError("LoRAPrune analyses and scores the adapter-wrapped model itself: pass no analysis "
                             "or scores")
        result = _lora_prune(model, example_inputs, config, batches, parallel)
    else:
        result = _one_shot(model, example_inputs, config, batches, analysis, scores, stats, hidden_by_default)
    base = model.get_base_model() if is_peft_model(model) else model
    result.dense_config = copy.deepcopy(getattr(base, "config", None))
    return result


def _timed(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    value = fn()
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
    return value


def _one_shot(model: nn.Module, example_inputs: tuple, config: PruneConfig, batches: Batches,
              analysis: Analysis | None, scores: GroupScores | None, stats: GradientStats | None,
              hidden_by_default: bool = False) -> PruneResult:
    """Score once, select, rewrite, verify against the masked dense model. A hidden stream pruned by default
    (not asked for) that breaks the compact model is kept whole instead, and the report says so."""
    timings: dict[str, float] = {}
    if analysis is None:
        analysis = _timed(timings, "trace_and_dependency", lambda: build_groups(trace(model, example_inputs)))
    if scores is None:
        if config.needs_data and batches is None:
            raise ValueError(f"criterion {config.criterion!r} needs calibration batches: pass batches=[token ids "
                             "[b, seq], ...]")
        options = config.criterion_options() | ({"stats": stats} if stats is not None else {})
        scores = _timed(timings, "importance",
                        lambda: CRITERIA[config.criterion](model, analysis.groups, batches=batches, **options))
    annotate_scores(analysis.program, analysis.groups, scores, config.criterion)
    notes = []
    try:
        compact, plan, kept, shifts, check = _cut(model, example_inputs, config, analysis, scores, timings)
    except HiddenStreamBreaks as err:
        if not hidden_by_default:
            raise
        config = dataclasses.replace(config, prune_hidden=False)
        notes.append(f"hidden stream kept whole: the compact model did not run with it pruned ({err.cause})")
        compact, plan, kept, shifts, check = _cut(model, example_inputs, config, analysis, scores, timings)
    macs = _timed(timings, "count_macs", lambda: _macs(model, compact, example_inputs, config))
    report = _report(config, analysis, analysis.groups, kept, count_params(model), count_params(compact), macs, check,
                     timings)
    report.biases_compensated = sorted(shifts)
    report.notes = notes
    return PruneResult(compact, plan, analysis.groups, report, kept, analysis)


def _cut(model: nn.Module, example_inputs: tuple, config: PruneConfig, analysis: Analysis, scores: GroupScores,
         timings: dict[str, float]) -> tuple[nn.Module, PrunePlan, dict[str, np.ndarray], dict, dict]:
    """Select by the scores, rewrite a copy, verify it against the masked dense model."""
    start = time.perf_counter()
    kept = select_units(analysis.groups, scores.units, config.selection(), scores.kv)
    plan = make_plan(analysis.groups, kept, analysis.param_shapes, analysis.program.aliases,
                     meta={"criterion": config.criterion, "select": config.selection().to_dict(),
                           "config": config.to_dict()})
    shifts = bias_shifts(model, analysis.groups, kept, scores.input_means) if scores.input_means else {}
    compact = _shift_biases(apply_plan(model, plan), shifts)
    timings["rewrite"] = timings.get("rewrite", 0.0) + time.perf_counter() - start
    masked = _shift_biases(masked_copy(model, analysis.groups, kept), shifts)
    check = _timed(timings, "verify", lambda: _verify(logits(masked, example_inputs), compact, example_inputs,
                                                      analysis.groups, kept))
    return compact, plan, kept, shifts, check


@torch.no_grad()
def _shift_biases(model: nn.Module, shifts: dict[str, torch.Tensor]) -> nn.Module:
    """Add FLAP's compensation to the named biases (of a copy: the dense model is never changed)."""
    state = model.state_dict(keep_vars=True)
    for name, shift in shifts.items():
        state[name].add_(shift.to(state[name].device))
    return model


def _lora_prune(model: nn.Module, example_inputs: tuple, config: LoRAPruneConfig, batches: Batches,
                parallel: DataParallel | None = None) -> PruneResult:
    """add_lora (an existing PeftModel is used as is) -> analyze the PEFT model -> iterative_prune -> make_plan +
    apply_plan (masked channels removed from the base weights and the LoRA factors alike) -> merge (with
    `config.merge`; plan, groups and kept units then use the plain model's names, so the plan re-applies to the
    original checkpoint). Unmerged, with PiSSA factors, the compact base is the residual the adapter completes."""
    if batches is None:
        raise ValueError("LoRAPrune fine-tunes while it prunes: pass batches=[token ids [b, seq], ...]")
    timings: dict[str, float] = {}
    macs_before = _timed(timings, "count_macs", lambda: count_macs(trace(plain_base(model), example_inputs).graph)) \
        if config.count_macs else None
    start = time.perf_counter()
    peft_model = add_lora(copy.deepcopy(model), r=config.r, alpha=config.alpha, target=config.target,
                          dropout=config.dropout, seed=config.seed, init=config.init)
    lora_names = {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    params_before = sum(p.numel() for n, p in peft_model.named_parameters() if n not in lora_names)
    analysis = analyze(peft_model, example_inputs)
    timings["trace_and_dependency"] = time.perf_counter() - start
    kept, history = _timed(timings, "lora_finetune_and_prune", lambda: iterative_prune(
        peft_model, analysis, batches, ratio=config.ratio, config=config.selection(), steps=config.steps, lr=config.lr,
        update_every=config.update_every, warmup=config.warmup, cooldown=config.cooldown, lam=config.lam,
        progress=config.progress, seed=config.seed, batch_size=config.batch_size, weight_decay=config.weight_decay,
        checkpointing=config.checkpointing, distill=config.distill, temperature=config.temperature,
        parallel=parallel))
    start = time.perf_counter()
    plan = make_plan(analysis.groups, kept, analysis.param_shapes, analysis.program.aliases,
                     meta={"criterion": config.criterion, "select": config.selection().to_dict(),
                           "config": config.to_dict()})
    reference = logits(peft_model, example_inputs)  # the masked model, which the compact one must equal
    compact = apply_plan(peft_model, plan, inplace=True)
    groups = analysis.groups
    if config.merge:
        compact = compact.merge_and_unload()
        plan, groups = plain_plan(plan), plain_groups(groups)
        kept = {plain_name(k): v for k, v in kept.items()}
    timings["rewrite"] = time.perf_counter() - start
    check = _timed(timings, "verify", lambda: _verify(reference, compact, example_inputs, groups, kept))
    params_after = sum(p.numel() for n, p in compact.named_parameters() if "lora_" not in n)
    macs = None
    if config.count_macs:
        after = _timed(timings, "count_macs", lambda: count_macs(trace(plain_base(compact), example_inputs).graph))
        macs = (macs_before, after)
    report = _report(config, analysis, groups, kept, params_before, params_after, macs, check, timings)
    report.history = [{k: v for k, v in h.items() if k != "kept"} | {
        "units_kept": int(sum(len(u) for u in h["kept"].values()))} for h in history]
    report.lora_params = count_params(compact) - params_after
    report.merged = config.merge
    report.teacher_bytes = max((h["teacher_bytes"] for h in history), default=0)
    return PruneResult(compact, plan, groups, report, kept, analysis)


class HiddenStreamBreaks(RuntimeError):
    """The compact model does not run with its hidden stream pruned: its code reads the hidden width off one
    tensor and reshapes another by it (MaxViT's and Swin's attention), which a traced graph cannot show."""

    def __init__(self, err: RuntimeError) -> None:
        self.cause = str(err.__cause__ or err).splitlines()[0]  # the model's own error, under compact_logits' line
        super().__init__(f"{err}; the hidden stream was pruned: prune_hidden=False keeps it whole")


def _verify(reference: torch.Tensor, compact: nn.Module, example_inputs: tuple, groups: list[ChannelGroup],
            kept: dict[str, np.ndarray]) -> dict:
    """The rewrite invariant, checked on every prune: a failure stops it. The compact model must equal the
    masked one, unless a pruned group feeds a statistic over its channels (a LayerNorm over the hidden stream:
    its mean and variance change when channels go, zeroed or removed); then the difference is only reported."""
    pruned = [g for g in groups if len(kept[g.name]) < g.num_units]
    try:
        compact_out = compact_logits(compact, example_inputs)
    except RuntimeError as err:
        if any(g.kind == "hidden" for g in pruned):  # code may read the hidden width off another tensor
            raise HiddenStreamBreaks(err) from err
        raise
    check = compare_logits(reference, compact_out, exact=not any(g.reduced for g in pruned),
                           dtype=model_dtype(compact))
    if not check["ok"]:
        raise RuntimeError(f"rewrite verification failed: compact logits differ from the masked model's by "
                           f"{check['relative_diff']:.2e} (relative; the {model_dtype(compact)} bound is "
                           f"{check['tolerance']:.0e})")
    return check


def _macs(model: nn.Module, compact: nn.Module, example_inputs: tuple,
          config: PruneConfig) -> tuple[int, int] | None:
    if not config.count_macs:
        return None
    return count_macs(trace(model, example_inputs).graph), count_macs(trace(compact, example_inputs).graph)


def _report(config: PruneConfig, analysis: Analysis, groups: list[ChannelGroup], kept: dict[str, np.ndarray],
            params_before: int, params_after: int, macs: tuple[int, int] | None, check: dict,
            timings: dict[str, float]) -> PruneReport:
    counted = [g for g in groups if g.kind != "hidden" or config.prune_hidden]
    units_total = sum(g.num_units for g in counted)
    units_kept = sum(len(kept[g.name]) for g in counted)
    pruned: dict[str, int] = {}
    for g in groups:
        if len(kept[g.name]) < g.num_units:
            pruned[g.kind] = pruned.get(g.kind, 0) + 1
    frozen = [{"node": f.node, "op": f.op, "reason": f.reason, "params": [plain_name(p) for p in f.params]}
              for f in analysis.frozen]
    return PruneReport(
        criterion=config.criterion, config=config.to_dict(), params_before=params_before, params_after=params_after,
        macs_before=None if macs is None else macs[0], macs_after=None if macs is None else macs[1],
        units_removed_fraction=1 - units_kept / max(units_total, 1), groups=analysis.by_kind(),
        groups_pruned=pruned, frozen=frozen, verify=check, timings=timings)
