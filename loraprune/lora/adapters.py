"""LoRA adapters on a model: attach them (PEFT), find them, read their factors, and name things as the plain model does.

Pruning sees a PEFT-wrapped model under PEFT's names (`base_model.model...base_layer.weight`); the plan a user
re-applies and the model a user deploys use the plain names. This module is the one place that knows both.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from loraprune.ir.groups import ChannelGroup
from loraprune.ir.plan import PrunePlan

__all__ = ["LORA_INITS", "add_lora", "base_weight_names", "factors", "is_peft_model", "linear_targets", "lora_layers",
           "lora_params", "merged_weight", "plain_base", "plain_groups", "plain_name", "plain_plan"]


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


def factors(module: nn.Module) -> tuple[nn.Parameter, nn.Parameter, float]:
    adapter = module.active_adapters[0]
    return module.lora_A[adapter].weight, module.lora_B[adapter].weight, float(module.scaling[adapter])


def plain_name(name: str) -> str:
    """The name a PEFT-wrapped parameter or module has in the plain (merged) model."""
    return re.sub(r"^base_model\.model\.", "", name).replace(".base_layer", "")


def base_weight_names(model: nn.Module) -> dict[str, nn.Module]:
    """Both spellings of each LoRA layer's base weight (PEFT `...base_layer.weight` and the plain name) ->
    its LoRA layer, so groups analysed on either the PEFT model or the plain model can be scored."""
    out = {}
    for name, module in lora_layers(model).items():
        out[f"{name}.base_layer.weight"] = module
        out[f"{plain_name(name)}.weight"] = module
    return out


def merged_weight(module: nn.Module) -> torch.Tensor:
    """W0 + s·BA as a new float tensor (the delta is computed fresh, so it is safe to add into)."""
    base = module.get_base_layer().weight.detach()
    with torch.no_grad():
        delta = module.get_delta_weight(module.active_adapters[0]).detach().float()
        return delta.add_(base)


def lora_params(layers: dict[str, nn.Module]) -> list[nn.Parameter]:
    out = []
    for module in layers.values():
        a, b, _ = factors(module)
        out += [a, b]
    return out


def plain_plan(plan: PrunePlan) -> PrunePlan:
    """The plan of a PEFT model in the plain model's names, LoRA factors dropped: it applies to the base."""
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


def plain_base(model: nn.Module) -> nn.Module:
    """The plain model under an (unmodified) input: itself, or for a PeftModel a merged copy."""
    return copy.deepcopy(model).merge_and_unload() if is_peft_model(model) else model
