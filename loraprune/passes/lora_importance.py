"""LoRA-guided importance and iterative pruning during LoRA fine-tuning (LoRAPrune, arXiv 2305.18403).

Base weights W0 stay frozen; only the LoRA factors A [r, in] and B [out, r] (scale s) get gradients. The
gradient of the merged weight is estimated from one virtual SGD step of size 1 on the factors:
s·(B - dB)(A - dA) - s·BA = -s·(dB·A + B·dA - dB·dA), so G = s·(dB·A + B·dA - dB·dA), and an element's
importance is |(W0 + s·BA) ⊙ G|. No gradient of W0 is ever stored (the memory win; `taylor` is the
full-gradient baseline, LLM-Pruner's first-order |W ⊙ dW|).

`iterative_prune` fine-tunes the LoRA factors while masks grow to the target ratio on a cubic schedule;
masked units are zeroed in the base weights and in the LoRA factors alike, so the masked model is exactly
what the rewrite produces, and `lora_prune` does the whole thing: add LoRA, analyse, prune while tuning,
rewrite (base weights and factors), optionally merge.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from loraprune.ir.groups import ChannelGroup
from loraprune.passes.checkpointing import activation_checkpointing
from loraprune.passes.importance import GroupScores, group_scores, index_scores, register_criterion
from loraprune.passes.select import SelectConfig, select_units
from loraprune.passes.verify import compact_logits, compare_logits, logits

__all__ = ["GradientStats", "add_lora", "causal_lm_loss", "estimated_gradient", "gradient_bytes", "iterative_prune",
           "linear_targets", "lora_criterion", "lora_layers", "lora_prune", "lora_recover", "plain_groups",
           "plain_name", "plain_plan", "taylor_criterion"]


# ----------------------------------------------------------------------------------------------- LoRA plumbing

def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


# How the factors start (PEFT's `init_lora_weights`). "standard": A random, B = 0, so at first every factor
# gradient is dB·A: a random rank-r view of the weight gradient that says nothing about input channels
# (dA = s·Bᵀ·dW = 0). "pissa" (arXiv 2404.02948): B·A is the weight's top-r singular part and W0 becomes the
# residual (the function is unchanged up to rounding), so from the first step dB and dA are the weight
# gradient seen through the weight's own principal subspaces, on the output and the input side alike.
LORA_INITS = {"standard": True, "pissa": "pissa_niter_4"}


def add_lora(model: nn.Module, r: int = 8, alpha: int = 16, target: Sequence[str] | str | None = None,
             dropout: float = 0.05, seed: int | None = 0, init: str = "standard") -> nn.Module:
    """Wrap `model` in PEFT LoRA adapters (in place, as PEFT does); a PeftModel is returned as is.

    `target` None means every nn.Linear / Conv1D leaf except the output head (`linear_targets`); otherwise
    module-name suffixes such as ("q_proj", "v_proj"). Base weights are frozen. `seed` makes the factor
    initialisation reproducible without touching the global RNG. `init` is a key of `LORA_INITS`; "pissa"
    rewrites the base weights to their residual in place (copy the model first to keep it).
    """
    from peft import LoraConfig, get_peft_model

    if init not in LORA_INITS:
        raise ValueError(f"unknown LoRA init {init!r}; known: {', '.join(LORA_INITS)}")
    if is_peft_model(model):
        return model
    if target is None:
        target = linear_targets(model)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", init_lora_weights=LORA_INITS[init],
                        target_modules=target if isinstance(target, str) else list(target))
    training = model.training
    with torch.random.fork_rng(devices=[]), _targets_as_given():
        if seed is not None:
            torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    peft_model.train(training)  # PEFT leaves its wrapper and the new adapter layers in train mode
    for name, p in peft_model.named_parameters():
        if "lora_" not in name:
            p.requires_grad_(False)
    return peft_model


@contextlib.contextmanager
def _targets_as_given() -> Iterator[None]:
    """PEFT renames targets such as gate_proj / up_proj / down_proj to the fused expert tensors of transformers v5
    for about 30 model types (DeepSeek, Qwen-MoE, ...), so that adapters trained on v4 still load; a dense MLP or a
    shared expert of that name then silently gets no adapter. A new adapter takes its targets as given."""
    from peft.utils import transformers_weight_conversion as conversion

    convert = getattr(conversion, "convert_peft_config_for_transformers", None)
    if convert is None:
        yield
        return
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = convert


def linear_targets(model: nn.Module) -> list[str]:
    """Every nn.Linear / HF Conv1D leaf except the output head: PEFT's "all-linear", spelled out as names.

    Spelled out because PEFT resolves "all-linear" on MoE models to the fused 3-D expert tensors as well, which
    it wraps in a ParamWrapper (no dropout allowed, and factors the criterion and the rewrite have no rule for).
    Leaf names ("q_proj") are used where no other module shares them, full names elsewhere.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    linear = [name for name, m in model.named_modules()
              if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and m is not head and _acts_linear(m)]
    if not linear:
        raise ValueError(f"{type(model).__name__} has no nn.Linear / Conv1D layer to put LoRA adapters on")
    chosen = set(linear)
    shared = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name and name not in chosen}
    leaves = {name.rsplit(".", 1)[-1] for name in linear}
    return sorted(leaf for leaf in leaves if leaf not in shared) + [
        name for name in linear if name.rsplit(".", 1)[-1] in shared]


def _acts_linear(module: nn.Module) -> bool:
    """A Linear subclass with a forward of its own may return something else (Llama 4's MoE router returns
    scores and logits): a LoRA adapter adds onto the output, so that layer gets none. Checked on one zero row."""
    if type(module).forward is nn.Linear.forward or not isinstance(module, nn.Linear):
        return True
    weight = module.weight
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, module.in_features, dtype=weight.dtype, device=weight.device))
    except Exception:  # a forward that cannot take a plain row is no plain linear layer either
        return False
    return isinstance(out, torch.Tensor) and tuple(out.shape) == (1, module.out_features)


def _lora_linear_type():
    from peft.tuners.lora.layer import Linear

    return Linear


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> PEFT LoRA Linear (nn.Linear or Conv1D base) with an active, unmerged adapter."""
    linear = _lora_linear_type()
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, linear) and not module.merged and module.active_adapters:
            adapter = module.active_adapters[0]
            if adapter in module.lora_A:
                out[name] = module
    return out


def _factors(module: nn.Module) -> tuple[nn.Parameter, nn.Parameter, float]:
    adapter = module.active_adapters[0]
    return module.lora_A[adapter].weight, module.lora_B[adapter].weight, float(module.scaling[adapter])


def plain_name(name: str) -> str:
    """The name a PEFT-wrapped parameter or module has in the plain (merged) model."""
    return re.sub(r"^base_model\.model\.", "", name).replace(".base_layer", "")


def _base_weight_names(model: nn.Module) -> dict[str, nn.Module]:
    """Both spellings of each LoRA layer's base weight (PEFT `...base_layer.weight` and the plain name) ->
    its LoRA layer, so groups analysed on either the PEFT model or the plain model can be scored."""
    out = {}
    for name, module in lora_layers(model).items():
        out[f"{name}.base_layer.weight"] = module
        out[f"{plain_name(name)}.weight"] = module
    return out


def estimated_gradient(module: nn.Module) -> torch.Tensor:
    """G = s·(dB·A + B·dA - dB·dA) in the base weight's layout (transposed for fan_in_fan_out / Conv1D)."""
    a, b, s = _factors(module)
    da = a.grad if a.grad is not None else torch.zeros_like(a)
    db = b.grad if b.grad is not None else torch.zeros_like(b)
    a, b, da, db = (t.detach().float() for t in (a, b, da, db))
    g = db @ a  # then in place: one weight-sized tensor, however large the layer
    g.addmm_(b, da).addmm_(db, da, alpha=-1.0).mul_(s)
    return g.T if module.fan_in_fan_out else g


def _merged_weight(module: nn.Module) -> torch.Tensor:
    """W0 + s·BA as a new float tensor (the delta is computed fresh, so it is safe to add into)."""
    base = module.get_base_layer().weight.detach()
    with torch.no_grad():
        delta = module.get_delta_weight(module.active_adapters[0]).detach().float()
        return delta.add_(base)


def lora_element_importance(module: nn.Module) -> torch.Tensor:
    """|(W0 + s·BA) ⊙ G| per element of the base weight, computed in place to keep the scoring's peak low."""
    return _merged_weight(module).mul_(estimated_gradient(module)).abs_()


def gradient_bytes(model: nn.Module) -> int:
    """Bytes held by `.grad` tensors of the model's parameters (what a scoring backward pass stores)."""
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


@dataclasses.dataclass
class GradientStats:
    """Filled by the criteria when passed as `stats=`: peak bytes of parameter gradients held after a
    backward pass, and how many parameters had a gradient. Activations and their gradients are not counted."""

    grad_bytes: int = 0
    params_with_grad: int = 0

    def record(self, model: nn.Module) -> None:
        self.grad_bytes = max(self.grad_bytes, gradient_bytes(model))
        self.params_with_grad = max(self.params_with_grad, sum(p.grad is not None for p in model.parameters()))


# ----------------------------------------------------------------------------------------------- data and loss

def _as_batches(batches: Iterable | torch.Tensor, batch_size: int) -> list:
    if isinstance(batches, torch.Tensor):
        batches = batches[None] if batches.dim() == 1 else batches
        return list(batches.split(batch_size))
    if isinstance(batches, dict):
        return [batches]
    out = list(batches)
    if not out:
        raise ValueError("batches is empty")
    return out


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def causal_lm_loss(model: nn.Module, batch: torch.Tensor | dict) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch: token ids [b, seq], or a dict with input_ids (and optionally
    attention_mask, labels; -100 labels are ignored, so are padded positions)."""
    device = _device_of(model)
    if isinstance(batch, dict):
        ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        labels = batch.get("labels")
    else:
        ids, mask, labels = batch.to(device), None, None
    kwargs = {"input_ids": ids}
    if mask is not None:
        kwargs["attention_mask"] = mask = mask.to(device)
    out = model(**kwargs)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    if labels is None:
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    # shift the labels, not the logits: flattening sliced [b, seq, vocab] logits copies them, and the slice's
    # backward pass allocates another vocab-sized tensor (the largest activations of a small model)
    targets = F.pad(labels.to(device)[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


# ----------------------------------------------------------------------------------------------- scoring

class LoRAScorer:
    """Per-index LoRA importances of every group member that is a LoRA base weight, smoothed over steps:
    I_t = lam·I_{t-1} + (1 - lam)·Î_t (I_0 = 0; the common factor cancels in the per-member normalisation).
    Members without LoRA (norm weights, biases, LoRA factors themselves) contribute nothing."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], lam: float = 0.9) -> None:
        if not 0.0 <= lam < 1.0:
            raise ValueError(f"lam must be in [0, 1), got {lam!r}")
        self.groups, self.lam = groups, lam
        names = _base_weight_names(model)
        # member keys by LoRA layer: one weight-sized importance tensor alive at a time, not one per layer
        self.by_module: dict[int, tuple[nn.Module, list[tuple[str, int]]]] = {}
        for g in groups:
            for key in dict.fromkeys(list(g.members) + list(g.kv_members)):
                module = names.get(key[0])
                if module is not None and key not in self.by_module.setdefault(id(module), (module, []))[1]:
                    self.by_module[id(module)][1].append(key)
        if not self.by_module:
            raise ValueError("no group member is the base weight of a LoRA layer: add LoRA adapters to the "
                             "projections (add_lora) and analyse the same model")
        self.smoothed: dict[tuple[str, int], np.ndarray] = {}
        self.steps = 0

    def update(self) -> None:
        """Read the factor gradients of the last backward pass into the smoothed estimate."""
        for module, keys in self.by_module.values():
            element = lora_element_importance(module)
            for key in keys:
                cur = index_scores(element, key[1])
                prev = self.smoothed.get(key)
                self.smoothed[key] = (1 - self.lam) * cur if prev is None else self.lam * prev + (1 - self.lam) * cur
            del element
        self.steps += 1

    def scores(self) -> GroupScores:
        return group_scores(self.groups, self.smoothed)


def _lora_params(layers: dict[str, nn.Module]) -> list[nn.Parameter]:
    out = []
    for module in layers.values():
        a, b, _ = _factors(module)
        out += [a, b]
    return out


def _plain_backward(model: nn.Module, batch) -> None:
    causal_lm_loss(model, batch).backward()


@register_criterion("lora")
def lora_criterion(model: nn.Module, groups: list[ChannelGroup], *, batches=None, seed: int = 0, lam: float = 0.9,
                   batch_size: int = 4, stats: GradientStats | None = None, r: int = 8, alpha: int = 16,
                   backward=None, checkpointing: bool = False, init: str = "standard",
                   **_: object) -> GroupScores:
    """LoRA-guided importance from the factor gradients of `batches` (no optimiser step, eval mode).

    On a model without LoRA layers, adapters (`init`, see `LORA_INITS`) are added for the scoring and removed
    again; with an init that rewrites the base weights a copy is scored, so the input model is never changed.
    Groups may be analysed on the PEFT model or the plain model. Base weights get no `.grad`.
    `backward(model, batch)` leaves the factor gradients of one step in `.grad` (default: the batch's
    causal-LM loss; `loraprune.distributed` passes a data-parallel one). `checkpointing` recomputes each
    decoder layer in the backward pass instead of keeping its activations (less memory, one more forward).
    """
    if batches is None:
        raise ValueError("criterion 'lora' needs calibration batches: pass batches=[token ids [b, seq], ...]")
    batches = _as_batches(batches, batch_size)
    added = not lora_layers(model)
    copied = added and init != "standard"
    flags = {id(p): p.requires_grad for p in model.parameters()}  # add_lora freezes the base weights
    work = add_lora(copy.deepcopy(model) if copied else model, r=r, alpha=alpha, seed=seed, dropout=0.0,
                    init=init) if added else model
    try:
        with activation_checkpointing(work, checkpointing):
            return _score(work, groups, batches, lam, stats, seed, backward or _plain_backward)
    finally:
        if added and not copied:
            work.unload()
            for p in model.parameters():
                p.requires_grad_(flags.get(id(p), p.requires_grad))


def _score(model, groups, batches, lam, stats, seed, backward) -> GroupScores:
    layers = lora_layers(model)
    params = _lora_params(layers)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    scorer = LoRAScorer(model, groups, lam)
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in params:
            p.requires_grad_(True)
        model.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for batch in batches:
                for p in params:
                    p.grad = None
                backward(model, batch)
                if stats is not None:
                    stats.record(model)
                scorer.update()
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
        model.train(was_training)
    return scorer.scores()


@register_criterion("taylor")
def taylor_criterion(model: nn.Module, groups: list[ChannelGroup], *, batches=None, seed: int = 0,
                     batch_size: int = 4, stats: GradientStats | None = None, checkpointing: bool = False,
                     **_: object) -> GroupScores:
    """First-order Taylor with full weight gradients (LLM-Pruner style): |W ⊙ dL/dW|, gradients summed over
    `batches`. Every group member parameter gets a gradient: the memory-hungry baseline. On a PEFT model the
    base weights of LoRA layers are scored with their merged value and LoRA factors are skipped.
    `checkpointing` as in `lora_criterion`."""
    if batches is None:
        raise ValueError("criterion 'taylor' needs calibration batches: pass batches=[token ids [b, seq], ...]")
    batches = _as_batches(batches, batch_size)
    state = model.state_dict(keep_vars=True)
    names = sorted({p for g in groups for p, _ in list(g.members) + list(g.kv_members)
                    if not re.search(r"\.lora_[A-Za-z_]+\.", f".{p}.")})
    targets = {n: state[n] for n in names if isinstance(state.get(n), nn.Parameter)}
    merged = _base_weight_names(model)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in targets.values():
            p.requires_grad_(True)
        model.eval()
        with torch.random.fork_rng(devices=[]), activation_checkpointing(model, checkpointing):
            torch.manual_seed(seed)
            for batch in batches:
                causal_lm_loss(model, batch).backward()  # gradients accumulate: the sum over batches
                if stats is not None:
                    stats.record(model)
        per_index = {}
        for g in groups:
            for key in list(g.members) + list(g.kv_members):
                p = targets.get(key[0])
                if p is None or p.grad is None or key in per_index:
                    continue
                w = _merged_weight(merged[key[0]]) if key[0] in merged else p.detach().float()
                per_index[key] = index_scores((w * p.grad.float()).abs(), key[1])
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
        model.train(was_training)
    return group_scores(groups, per_index)


# ----------------------------------------------------------------------------------------------- masks

class _Masker:
    """Zeroes removed units in every member tensor (base weights, biases, norms, LoRA factors) in place,
    exactly the entries `masked_copy` zeroes and the rewrite removes."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup]) -> None:
        self.state = model.state_dict(keep_vars=True)
        self.groups = groups
        self.removed: list[tuple[torch.Tensor, int, torch.Tensor]] = []

    def set(self, kept: dict[str, np.ndarray]) -> None:
        gone: dict[tuple[str, int], np.ndarray] = {}
        for g in self.groups:
            keep = np.asarray(kept.get(g.name, np.arange(g.num_units)))
            keep_kv = np.unique(g.kv_of_unit[keep]) if g.num_kv_units else None
            for table, k in ((g.members, keep), (g.kv_members, keep_kv)):
                for key, ids in table.items():
                    gone[key] = gone.get(key, np.zeros(len(ids), bool)) | ((ids >= 0) & ~np.isin(ids, k))
        self.removed = [(self.state[p], d, torch.as_tensor(np.flatnonzero(m), device=self.state[p].device))
                        for (p, d), m in gone.items() if m.any()]

    @torch.no_grad()
    def apply(self, trainable_only: bool = False) -> None:
        for tensor, dim, idx in self.removed:
            if not trainable_only or tensor.requires_grad:
                tensor.data.index_fill_(dim, idx, 0.0)


def _select_monotone(groups: list[ChannelGroup], scores: GroupScores, kept: dict[str, np.ndarray],
                     config: SelectConfig) -> dict[str, np.ndarray]:
    """`select_units` with already-removed units scored lowest, so none comes back and counts only shrink."""
    units, kv = {}, {}
    for g in groups:
        s = np.nan_to_num(np.asarray(scores.units[g.name], dtype=float), nan=0.0, posinf=0.0, neginf=0.0)
        alive = np.zeros(g.num_units, bool)
        alive[kept[g.name]] = True
        if g.kind == "hidden" and config.scope == "global":  # pooled as score / mean there: stay finite
            s = np.where(alive, np.maximum(s, 0.0) + 1e-200, 0.0)
        else:
            s = np.where(alive, s, -np.inf)
        units[g.name] = s
        if g.num_kv_units:
            k = np.nan_to_num(np.asarray(scores.kv[g.name], dtype=float), nan=0.0, posinf=0.0, neginf=0.0)
            kv[g.name] = np.where(np.isin(np.arange(g.num_kv_units), g.kv_of_unit[kept[g.name]]), k, -np.inf)
    new = select_units(groups, units, config, kv)
    for g in groups:
        if not np.isin(new[g.name], kept[g.name]).all():  # cannot happen with monotone counts; never hide it
            raise RuntimeError(f"selection revived pruned units of {g.name}")
    return new


def cubic_ratio(step: int, steps: int, ratio: float, warmup: float = 0.1, cooldown: float = 0.1) -> float:
    """ratio·(1 - (1 - p)^3), p going 0 -> 1 between the warm-up and the cool-down (step counts completed)."""
    start = int(round(warmup * steps))
    end = max(start, steps - int(round(cooldown * steps)))
    p = 1.0 if end <= start else min(max((step - start) / (end - start), 0.0), 1.0)
    return ratio * (1.0 - (1.0 - p) ** 3)


# ----------------------------------------------------------------------------------------------- the schedule

def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch, after_backward=None) -> float:
    """One AdamW step on the causal-LM loss of `batch`; `after_backward` reads the gradients before the step."""
    optimizer.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, batch)
    loss.backward()
    if after_backward is not None:
        after_backward()
    optimizer.step()
    return float(loss.detach())


def lora_recover(model: nn.Module, batches, *, steps: int, lr: float = 1e-4, r: int = 8, alpha: int = 16,
                 target: Sequence[str] | None = None, dropout: float = 0.05, seed: int = 0, batch_size: int = 4,
                 merge: bool = True, progress: bool = True, checkpointing: bool = False,
                 init: str = "pissa") -> tuple[nn.Module, list[float]]:
    """LoRA recovery fine-tuning of an (already pruned) model: the baselines' counterpart of the schedule.

    Same optimiser, loss, batches and step count as `iterative_prune`, so a one-shot criterion followed by this
    gets the same fine-tuning budget as LoRA-guided pruning. Works on a copy; returns (model, loss per step),
    the model merged into plain weights unless `merge` is False (then a PeftModel). `checkpointing`
    recomputes each decoder layer in the backward pass instead of keeping its activations; `init` is how the
    factors start (`LORA_INITS`).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    work = add_lora(copy.deepcopy(model), r=r, alpha=alpha, target=target, dropout=dropout, seed=seed, init=init)
    batches = _as_batches(batches, batch_size)
    params = _lora_params(lora_layers(work))
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]), activation_checkpointing(work, checkpointing):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        work.train()
        bar = tqdm(range(1, steps + 1), desc="lora-recover", unit="step", disable=not progress)
        for step in bar:
            losses.append(_train_step(work, optimizer, batches[(step - 1) % len(batches)]))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        bar.close()
        optimizer.zero_grad(set_to_none=True)
    work.eval()
    return (work.merge_and_unload() if merge else work), losses


def iterative_prune(model: nn.Module, analysis, batches, *, ratio: float, config: SelectConfig | None = None,
                    steps: int, lr: float = 1e-4, update_every: int = 10, warmup: float = 0.1, cooldown: float = 0.1,
                    lam: float = 0.9, progress: bool = True, seed: int = 0, batch_size: int = 4,
                    weight_decay: float = 0.0, checkpointing: bool = False) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Fine-tune the LoRA factors of the PEFT `model` (in place) while its masks grow to `ratio`.

    AdamW on the LoRA factors only, causal-LM loss, one batch per step (cycling through `batches`). The
    target ratio follows `cubic_ratio`; every `update_every` steps (and when the schedule reaches `ratio`)
    units are reselected with `select_units` from the smoothed LoRA scores, removed units never return,
    and removed units are zeroed in the base weights and the LoRA factors (kept zero after every step).
    Once the masks reach `ratio`, the remaining steps (the cool-down) fine-tune only: no scoring, no updates.
    The final kept counts are those `select_units` gives for `ratio`; `checkpointing` as in `lora_recover`.
    Returns (kept units per group, history): one record per update with step, ratio, mean loss since the
    last update and the kept units.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if update_every < 1:
        raise ValueError(f"update_every must be >= 1, got {update_every}")
    config = dataclasses.replace(config or SelectConfig(), ratio=ratio)
    groups = analysis.groups
    if not any(g.num_units > 1 for g in groups):
        name = type(model.get_base_model() if is_peft_model(model) else model).__name__
        raise ValueError(f"nothing to prune in {name}: the dependency pass found no group of "
                         f"prunable units ({len(analysis.frozen)} frozen reports say why)")
    batches = _as_batches(batches, batch_size)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers: wrap it with add_lora first")
    params = _lora_params(layers)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    scorer = LoRAScorer(model, groups, lam)
    masker = _Masker(model, groups)
    kept = {g.name: np.arange(g.num_units) for g in groups}
    history: list[dict] = []
    end = max(int(round(warmup * steps)), steps - int(round(cooldown * steps)))
    last_ratio, losses = None, []

    def update(step: int, target: float) -> None:
        nonlocal kept, last_ratio, losses
        new = _select_monotone(groups, scorer.scores(), kept, dataclasses.replace(config, ratio=target))
        kept = new
        masker.set(kept)
        masker.apply()
        last_ratio = target
        history.append({"step": step, "ratio": target, "loss": float(np.mean(losses)) if losses else None,
                        "kept": {k: v.copy() for k, v in kept.items()}})
        losses = []

    was_training = model.training
    with torch.random.fork_rng(devices=[]), activation_checkpointing(model, checkpointing):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        model.train()
        bar = tqdm(range(1, steps + 1), desc="lora-prune", unit="step", disable=not progress)
        try:
            for step in bar:
                pruning = last_ratio != ratio  # once the masks reach `ratio` they are final: no scores needed
                value = _train_step(model, optimizer, batches[(step - 1) % len(batches)],
                                    after_backward=scorer.update if pruning else None)
                masker.apply(trainable_only=True)
                losses.append(value)
                if pruning and (step % update_every == 0 or step == end):
                    update(step, cubic_ratio(step, steps, ratio, warmup, cooldown))
                bar.set_postfix(loss=f"{value:.3f}", ratio=f"{last_ratio or 0.0:.3f}", refresh=False)
            if last_ratio != ratio:
                update(steps, ratio)
        finally:
            bar.close()
            optimizer.zero_grad(set_to_none=True)
            model.train(was_training)
    return kept, history


# ----------------------------------------------------------------------------------------------- end to end

def plain_plan(plan):
    """The plan of a PEFT model in the plain model's names, LoRA factors dropped: it applies to the base."""
    from loraprune.ir.plan import PrunePlan

    def keep(name: str) -> bool:
        return not re.search(r"\.lora_[A-Za-z_]+\.", f".{name}.")

    return PrunePlan({plain_name(n): d for n, d in plan.kept.items() if keep(n)},
                     {plain_name(n): s for n, s in plan.shapes.items() if keep(n)},
                     {plain_name(n): a for n, a in plan.attention.items()},
                     {plain_name(n): [plain_name(g) for g in gs] for n, gs in plan.group_of.items() if keep(n)},
                     {plain_name(n): s for n, s in plan.sizes.items()}, dict(plan.meta))


def plain_groups(groups: list[ChannelGroup]) -> list[ChannelGroup]:
    """Groups of a PEFT model in the plain model's names, LoRA factor members dropped."""
    def table(t):
        return {(plain_name(p), d): ids for (p, d), ids in t.items()
                if not re.search(r"\.lora_[A-Za-z_]+\.", f".{p}.")}

    return [dataclasses.replace(g, name=plain_name(g.name), members=table(g.members), kv_members=table(g.kv_members))
            for g in groups]


def lora_prune(model: nn.Module, example_inputs, batches, *, ratio: float, config: SelectConfig | None = None,
               steps: int, merge: bool = True, r: int = 8, alpha: int = 16, target: Sequence[str] | None = None,
               dropout: float = 0.05, lr: float = 1e-4, update_every: int = 10, warmup: float = 0.1,
               cooldown: float = 0.1, lam: float = 0.9, progress: bool = True, seed: int = 0, batch_size: int = 4,
               inplace: bool = False, count_macs: bool = True, checkpointing: bool = False, init: str = "pissa"):
    """LoRAPrune end to end. Returns a `PruneResult`.

    add_lora (an existing PeftModel is used as is) -> analyze the PEFT model -> iterative_prune -> make_plan +
    apply_plan (masked channels removed from the base weights and the LoRA factors alike). With `merge`,
    the compact adapters are merged into a plain model and plan, groups and kept units use the plain
    model's names (the plan re-applies to the original checkpoint); otherwise the compact PeftModel is
    returned with PEFT names (with `init="pissa"` its base weights are the residual the adapter completes).
    The input model is not modified unless `inplace`.
    """
    from loraprune.api import PruneResult, count_params
    from loraprune.ir.trace import trace
    from loraprune.passes.dependency import analyze
    from loraprune.passes.macs import count_macs as macs_of
    from loraprune.passes.rewrite import apply_plan, make_plan

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    config = dataclasses.replace(config or SelectConfig(), ratio=ratio)
    timings = {}
    report_macs = {}
    if count_macs:
        start = time.perf_counter()
        report_macs["macs_before"] = macs_of(trace(_plain_base(model), example_inputs).graph)
        timings["count_macs"] = time.perf_counter() - start
    start = time.perf_counter()
    work = model if inplace else copy.deepcopy(model)
    peft_model = add_lora(work, r=r, alpha=alpha, target=target, dropout=dropout, seed=seed, init=init)
    lora_names = {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    params_before = sum(p.numel() for n, p in peft_model.named_parameters() if n not in lora_names)
    analysis = analyze(peft_model, example_inputs)
    timings["trace_and_dependency"] = time.perf_counter() - start
    start = time.perf_counter()
    kept, history = iterative_prune(peft_model, analysis, batches, ratio=ratio, config=config, steps=steps, lr=lr,
                                    update_every=update_every, warmup=warmup, cooldown=cooldown, lam=lam,
                                    progress=progress, seed=seed, batch_size=batch_size,
                                    checkpointing=checkpointing)
    timings["lora_finetune_and_prune"] = time.perf_counter() - start
    start = time.perf_counter()
    lora_meta = {"r": r, "alpha": alpha, "init": init, "steps": steps, "lr": lr, "update_every": update_every,
                 "warmup": warmup, "cooldown": cooldown, "lam": lam, "seed": seed, "checkpointing": checkpointing}
    plan = make_plan(analysis.groups, kept, analysis.param_shapes, analysis.program.aliases,
                     meta={"criterion": "lora", "select": config.to_dict(), "lora": lora_meta})
    reference = logits(peft_model, example_inputs)  # the masked model, which the compact one must equal
    compact = apply_plan(peft_model, plan, inplace=True)
    groups = analysis.groups
    if merge:
        compact = compact.merge_and_unload()
        plan, groups = plain_plan(plan), plain_groups(groups)
        kept = {plain_name(k): v for k, v in kept.items()}
    timings["rewrite"] = time.perf_counter() - start
    check = compare_logits(reference, compact_logits(compact, example_inputs), exact=not config.prune_hidden)
    if not check["ok"]:
        raise RuntimeError(f"rewrite verification failed: compact logits differ from the masked model's by "
                           f"{check['relative_diff']:.2e} (relative)")
    params_after = sum(p.numel() for n, p in compact.named_parameters() if "lora_" not in n)
    report = {"ratio": ratio, "criterion": "lora", "select": config.to_dict(), "lora": lora_meta,
              "merged": merge, "params_before": params_before, "params_after": params_after,
              "params_removed_fraction": 1 - params_after / params_before,
              "lora_params": count_params(compact) - params_after, "groups": analysis.by_kind(),
              "history": [{k: v for k, v in h.items() if k != "kept"} | {
                  "units_kept": int(sum(len(u) for u in h["kept"].values()))} for h in history],
              "verify": check, "timings": timings}
    if count_macs:
        start = time.perf_counter()
        report_macs["macs_after"] = macs_of(trace(compact if merge else _plain_base(compact), example_inputs).graph)
        timings["count_macs"] += time.perf_counter() - start
        report.update(report_macs)
    return PruneResult(compact, plan, groups, report, kept, analysis)


def _plain_base(model: nn.Module) -> nn.Module:
    """The plain model under an (unmodified) input: itself, or for a PeftModel a merged copy."""
    return copy.deepcopy(model).merge_and_unload() if is_peft_model(model) else model
