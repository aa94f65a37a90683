"""The rewrite pass: physically shrink every tensor of a plan and patch the shapes that depended on it.

Tensors are sliced (weights, biases, norm weights, buffers, PEFT LoRA factors alike: they are members of
the same groups); module attributes that encode sizes are then patched from one table, keyed by the
attribute name, so a new architecture needs at most a new row, never a new code path. A module whose widths
differ from those of the config shared by every layer (the first and last layers left whole, say) gets its own
view of that config (`ConfigView`), for code that reads `self.config.num_attention_heads` at run time (Phi-3).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from loraprune.ir.groups import ChannelGroup, module_of
from loraprune.ir.plan import PlanError, PrunePlan

__all__ = ["ConfigView", "apply_plan", "make_plan", "masked_copy"]

# attribute name -> how its new value follows from the new attention shape (heads, kv_heads, head_dim)
ATTENTION_ATTRS = {
    "num_heads": lambda h, kv, d: h,
    "num_attention_heads": lambda h, kv, d: h,
    "n_head": lambda h, kv, d: h,
    "n_heads": lambda h, kv, d: h,
    "num_key_value_heads": lambda h, kv, d: kv,
    "num_kv_heads": lambda h, kv, d: kv,
    "n_kv_heads": lambda h, kv, d: kv,
    "num_key_value_groups": lambda h, kv, d: h // kv,
    "all_head_size": lambda h, kv, d: h * d,
    "split_size": lambda h, kv, d: h * d,
    "inner_dim": lambda h, kv, d: h * d,
    "embed_dim": lambda h, kv, d: h * d,  # inside attention modules: the query width (GPTBigCode's qkv split)
    "kv_dim": lambda h, kv, d: kv * d,
}

# Counts of blocks that each hold a fixed number of heads (CodeGen's `mp_num` model-parallel partitions of its fused
# qkv_proj, whose width the code reads as embed_dim // mp_num): they scale with the kept heads, so every block keeps
# its width. The dependency pass only lets heads go in whole blocks (`CouplingState.split_rows`).
HEAD_BLOCK_ATTRS = ("mp_num",)
_HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")


def _patch_attention(module: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    """Size attributes of an attention module (and of its submodules) after its heads were sliced."""
    for sub in module.modules():
        before = next((v for a in _HEAD_COUNT_ATTRS if isinstance(v := getattr(sub, a, None), int)), None)
        for attr, rule in ATTENTION_ATTRS.items():
            if isinstance(getattr(sub, attr, None), int):
                setattr(sub, attr, rule(heads, kv_heads, head_dim))
        for attr in HEAD_BLOCK_ATTRS:
            blocks = getattr(sub, attr, None)
            if isinstance(blocks, int) and before and heads * blocks % before == 0:
                setattr(sub, attr, heads * blocks // before)


def _module_sizes(module: nn.Module) -> None:
    """Size attributes of standard layers, read back from their (sliced) tensors."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        return
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        if module.groups > 1:  # the dependency pass keeps or removes whole groups: each keeps its width
            module.groups = w.shape[0] // (module.out_channels // module.groups)
        module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = w.shape
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(w.shape)
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = w.shape[0]
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # HF GPT-2 style [in, out] weights
        module.nx, module.nf = w.shape


def make_plan(groups: list[ChannelGroup], kept_units: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]],
              aliases: dict[str, list[str]] | None = None, meta: dict | None = None) -> PrunePlan:
    """Turn kept units into kept indices per (parameter, dim); tied names (aliases) get the same entry."""
    removed: dict[tuple[str, int], np.ndarray] = {}
    group_of: dict[str, list[str]] = {}
    attention: dict[str, dict[str, int]] = {}
    sizes: dict[str, dict] = {}
    for g in groups:
        keep = np.asarray(kept_units.get(g.name, np.arange(g.num_units)))
        keep_kv = np.unique(g.kv_of_unit[keep]) if g.num_kv_units else None
        for table, kept in ((g.members, keep), (g.kv_members, keep_kv)):
            for key, ids in table.items():
                gone = (ids >= 0) & ~np.isin(ids, kept)
                removed[key] = removed.get(key, np.zeros(len(ids), bool)) | gone
                group_of.setdefault(key[0], [])
                if g.name not in group_of[key[0]]:
                    group_of[key[0]].append(g.name)
        sizes[g.name] = {"kind": g.kind, "units": g.num_units, "kept": int(len(keep)), "unit_size": g.unit_size}
        # a single unit is never pruned, and may be all heads merged (ALiBi): its module keeps its own counts
        if g.kind == "attention" and (g.num_units > 1 or g.num_kv_units):
            kv_heads = int(len(keep_kv)) if keep_kv is not None else int(len(keep))
            attention[module_of(g.params)] = {"heads": int(len(keep)), "kv_heads": kv_heads,
                                              "head_dim": int(g.unit_size)}
    kept: dict[str, dict[int, list[int]]] = {}
    for (param, dim), gone in removed.items():
        if gone.any():
            for name in (aliases or {}).get(param, [param]):
                kept.setdefault(name, {})[dim] = np.flatnonzero(~gone).tolist()
    all_shapes = {n: list(shapes[p]) for p in shapes for n in (aliases or {}).get(p, [p])}
    return PrunePlan(kept, all_shapes, attention, group_of, sizes, meta or {})


def _validate(model: nn.Module, plan: PrunePlan) -> dict[str, torch.Tensor]:
    state = model.state_dict(keep_vars=True)
    for name, dims in plan.kept.items():
        if name not in state:
            raise PlanError(f"plan names parameter {name!r}, which this model does not have")
        shape = list(state[name].shape)
        if name in plan.shapes and shape != list(plan.shapes[name]):
            raise PlanError(f"plan was made for another architecture: {name} is {shape} here, "
                            f"{plan.shapes[name]} in the plan")
        for dim, idx in dims.items():
            if dim >= len(shape) or (idx and (min(idx) < 0 or max(idx) >= shape[dim])) or not idx:
                raise PlanError(f"plan indices for {name} dim {dim} do not fit its shape {shape}")
    for module_name in plan.attention:
        try:
            model.get_submodule(module_name)
        except AttributeError:
            raise PlanError(f"plan names attention module {module_name!r}, which this model does not have") \
                from None
    return state


def apply_plan(model: nn.Module, plan: PrunePlan, inplace: bool = False) -> nn.Module:
    """Return the compact model: every planned tensor sliced, size attributes and config patched.

    The plan is checked against the model first; on any mismatch nothing is changed.
    """
    _validate(model, plan)
    if not inplace:
        model = copy.deepcopy(model)
    new_tensor: dict[int, torch.Tensor] = {}  # tied tensors stay tied: sliced once, shared again
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for attr, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            full = prefix + attr
            if tensor is None or full not in plan.kept:
                continue
            if id(tensor) not in new_tensor:
                data = tensor.data
                for dim, idx in sorted(plan.kept[full].items()):
                    data = data.index_select(dim, torch.as_tensor(idx, device=data.device))
                data = data.contiguous()
                new_tensor[id(tensor)] = nn.Parameter(data, requires_grad=tensor.requires_grad) \
                    if isinstance(tensor, nn.Parameter) else data
            if attr in module._parameters:
                module._parameters[attr] = new_tensor[id(tensor)]
            else:
                module._buffers[attr] = new_tensor[id(tensor)]
        _module_sizes(module)
    for module_name, shape in plan.attention.items():
        _patch_attention(model.get_submodule(module_name), shape["heads"], shape["kv_heads"], shape["head_dim"])
    _patch_config(model, plan)
    _own_configs(model, plan)
    return model


CONFIG_ATTRS = {
    "heads": ("num_attention_heads", "n_head"),
    "kv_heads": ("num_key_value_heads",),
    "intermediate": ("intermediate_size", "ffn_dim", "n_inner"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
}


def _patch_config(model: nn.Module, plan: PrunePlan) -> None:
    """Uniform results are written into the HF config so plain from_pretrained reloads them; whether the
    widths are uniform is recorded, since non-uniform ones reload through the plan."""
    config = getattr(model, "config", None)
    if config is None:
        return
    widths = _module_widths(plan).values()
    values = {key: {w[key] for w in widths if key in w} for key in ("heads", "kv_heads", "intermediate")}
    values["hidden"] = {s["kept"] * s["unit_size"] for s in plan.sizes.values() if s["kind"] == "hidden"}
    head_dim = {s["head_dim"] for s in plan.attention.values()}
    if len(head_dim) == 1 and getattr(config, "head_dim", None) is None:
        config.head_dim = next(iter(head_dim))  # derived head_dim must not change when heads or hidden do
    for key, kept in values.items():
        if len(kept) == 1:
            for attr in CONFIG_ATTRS[key]:
                if getattr(config, attr, None) is not None:
                    setattr(config, attr, next(iter(kept)))
    config.loraprune_uniform = all(len(v) <= 1 for v in values.values())


class ConfigView:
    """One module's view of a config that every layer shares: its own widths, and every other attribute read from
    the shared config, so a later change there (`set_attn_implementation`, say) still reaches the module."""

    def __init__(self, shared: Any, widths: dict[str, int]) -> None:
        self._shared = shared
        self._widths = widths  # canonical attribute name (after the config's attribute_map) -> this module's value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "_shared" not in self.__dict__:  # copy/pickle probe an empty instance
            raise AttributeError(name)
        canonical = getattr(self._shared, "attribute_map", {}).get(name, name)
        return self._widths[canonical] if canonical in self._widths else getattr(self._shared, name)

    def __repr__(self) -> str:
        return f"ConfigView({type(self._shared).__name__}, {self._widths})"


def _module_widths(plan: PrunePlan) -> dict[str, dict[str, int]]:
    """The widths each rewritten module has now, keyed like CONFIG_ATTRS, by module name. MLP groups whose units
    span several rows of one weight (a fused gate/up projection) are of kind "channel"."""
    widths = {name: {"heads": s["heads"], "kv_heads": s["kv_heads"]} for name, s in plan.attention.items()}
    for name, s in plan.sizes.items():
        if s["kind"] in ("mlp", "channel"):
            widths.setdefault(name, {})["intermediate"] = s["kept"] * s["unit_size"]
    return widths


def _own_configs(model: nn.Module, plan: PrunePlan) -> None:
    """Give every module whose widths differ from the shared config's its own `ConfigView`, in each attribute of
    it or of its submodules that holds the shared config (an inner module's widths win over its ancestor's)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    aliases = getattr(config, "attribute_map", {})
    own: dict[int, tuple[nn.Module, dict[str, int]]] = {}
    for name, widths in sorted(_module_widths(plan).items()):
        values = {aliases.get(attr, attr): value for key, value in widths.items() for attr in CONFIG_ATTRS[key]
                  if getattr(config, attr, None) not in (None, value)}
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # a group named after no single module: nothing there holds its widths
        for sub in module.modules() if values else ():
            own.setdefault(id(sub), (sub, {}))[1].update(values)
    for sub, values in own.values():
        for attr in [attr for attr, value in vars(sub).items() if value is config]:
            setattr(sub, attr, ConfigView(config, values))


def masked_copy(model: nn.Module, groups: list[ChannelGroup], kept_units: dict[str, np.ndarray]) -> nn.Module:
    """The dense model with every removed unit zeroed in all its tensors: what the compact model must equal
    (for heads and MLP channels)."""
    masked = copy.deepcopy(model)
    state = masked.state_dict(keep_vars=True)
    with torch.no_grad():
        for g in groups:
            keep = np.asarray(kept_units.get(g.name, np.arange(g.num_units)))
            keep_kv = np.unique(g.kv_of_unit[keep]) if g.num_kv_units else None
            for table, kept in ((g.members, keep), (g.kv_members, keep_kv)):
                for (param, dim), ids in table.items():
                    gone = np.flatnonzero((ids >= 0) & ~np.isin(ids, kept))
                    if len(gone):
                        state[param].data.index_fill_(dim, torch.as_tensor(gone, device=state[param].device), 0.0)
    return masked
