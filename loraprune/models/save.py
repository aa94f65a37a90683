"""Saving a compact (pruned) model as a Hugging Face folder, and loading it back.

A folder holds `model.safetensors` (the compact weights; written by several processes from a sharded model, one
file per process and `model.safetensors.index.json`, as Hugging Face shards a checkpoint), `config.json` (the
compact HF config: for a uniform result plain `AutoModelForCausalLM.from_pretrained` reloads it),
`loraprune_plan.json` (the plan, plus the dense config it was made from) and, if given, the tokenizer files. A
non-uniform result (different head counts or MLP widths per layer) cannot be described by a plain HF config;
`load_pretrained` rebuilds it as dense architecture -> plan -> weights.

Loading never materializes the dense model: its parameters are created on the `meta` device (accelerate's
`init_empty_weights(include_buffers=False)`), sliced by the plan there, then replaced by the saved tensors.
Buffers are created for real on CPU, so non-persistent ones that are not in the file (rotary `inv_freq` and
the like) get the values the model's own constructor computes, for any architecture. The cost is that every
buffer, persistent ones included, is briefly materialized at its dense size; buffers are small next to the
weights.

A folder is written into a hidden temporary sibling and renamed into place at the end: an interruption
leaves either the previous folder or none, never a half-written one.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from loraprune.ir.plan import PlanError, PrunePlan
from loraprune.outputs import check_target, staged_folder
from loraprune.passes.rewrite import apply_plan

__all__ = ["INDEX_FILE", "PLAN_FILE", "WEIGHTS_FILE", "FolderMetadata", "compact_skeleton", "load_pretrained",
           "save_pretrained"]

PLAN_FILE = "loraprune_plan.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
FORMAT = "loraprune-compact-v1"


# ----------------------------------------------------------------------------------------------- saving


def save_pretrained(result_or_model: Any, out_dir: str | os.PathLike, *, plan: PrunePlan | None = None,
                    dense_config: Any = None, tokenizer: Any = None, force: bool = False) -> Path:
    """Write the compact model of a prune result as an HF folder at `out_dir`; return its path.

    `result_or_model` is a `PruneResult` (which knows its plan and the dense config) or the compact model itself,
    given with the `plan` that made it and `dense_config`, the config of the model BEFORE pruning (a
    `PretrainedConfig` or its dict): with the plan it rebuilds non-uniform results. An existing `out_dir` is
    refused unless `force`; even then only an empty folder or one written by this function is replaced.
    """
    model = result_or_model if isinstance(result_or_model, nn.Module) else getattr(result_or_model, "model", None)
    plan = plan if plan is not None else getattr(result_or_model, "plan", None)
    dense_config = dense_config if dense_config is not None else getattr(result_or_model, "dense_config", None)
    if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
        raise ValueError("save_pretrained needs a PruneResult or a Hugging Face model (with a .config)")
    if not isinstance(plan, PrunePlan):
        raise ValueError("save_pretrained needs the PrunePlan that made the model (pass plan=...)")
    if dense_config is None:
        raise ValueError("save_pretrained needs the dense model's config (pass dense_config=...)")
    out_dir = Path(out_dir)
    check_target(out_dir, force, PLAN_FILE)  # before any work
    state = _unique_state(model)
    metadata = FolderMetadata.of(model, plan, dense_config, _dtype_name(state))  # before writing anything
    with staged_folder(out_dir, force, PLAN_FILE) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        metadata.write(tmp, model, tokenizer)
    return out_dir


@dataclass
class FolderMetadata:
    """Everything of a saved folder but the weights: the compact config, the plan, the dense config, the format."""

    config: Any
    plan: PrunePlan
    dense: dict
    info: dict

    @classmethod
    def of(cls, model: nn.Module, plan: PrunePlan, dense_config: Any, dtype: str) -> FolderMetadata:
        """Checked: dense config + plan must rebuild `model`'s shapes, or the folder would not load (catches a
        compact config passed as dense_config, or a plan from another model). `model`'s parameters may be on
        `meta` (the sharded save has no whole compact model anywhere)."""
        dense = _config_dict(dense_config)
        info = {"format": FORMAT, "architecture": type(model).__name__, "dtype": dtype,
                "attn_implementation": getattr(model.config, "_attn_implementation", None)}
        skeleton = _skeleton(dense, info)
        try:
            apply_plan(skeleton, plan, inplace=True)
        except PlanError as err:
            raise ValueError(f"dense_config and plan do not fit together: {err}") from None
        _compare_shapes(skeleton, model, "dense_config + plan")
        config = copy.deepcopy(model.config)
        if getattr(config, "loraprune_uniform", False) and not _plain_loadable(config, model, info):
            warnings.warn("the compact config does not describe the pruned shapes (see loraprune.passes.rewrite."
                          "_patch_config); writing loraprune_uniform=false, reload it with load_pretrained",
                          stacklevel=3)
            config.loraprune_uniform = False
        config.architectures = [type(model).__name__]
        return cls(config, plan, dense, info)

    def write(self, folder: Path, model: nn.Module, tokenizer: Any = None) -> None:
        """config.json, the generation config, the tokenizer, and last the plan (the folder's marker)."""
        self.config.save_pretrained(folder)
        generation = getattr(model, "generation_config", None)
        if generation is not None and callable(getattr(model, "can_generate", None)) and model.can_generate():
            generation.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        _write_json(folder / PLAN_FILE, {**self.plan.to_dict(), **self.info, "dense_config": self.dense})


def compact_skeleton(dense_config: Any, plan: PrunePlan, dtype: str) -> nn.Module:
    """The compact model of `plan` with its parameters on `meta`: its shapes and its (patched) config."""
    dense = _config_dict(dense_config)
    architectures = dense.get("architectures") or [None]
    skeleton = _skeleton(dense, {"dtype": dtype, "architecture": architectures[0]})
    return apply_plan(skeleton, plan, inplace=True)


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent state, each tied tensor once: the first name wins (the embedding before the LM head,
    as in HF checkpoints), and loading re-ties the rest."""
    state, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor is None:
            continue
        if tensor.device.type == "meta":
            raise ValueError(f"cannot save {name}: it is on the meta device (no data)")
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.stride(), tensor.dtype)
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor
    return state


def _dtype_name(state: dict[str, torch.Tensor]) -> str:
    for tensor in state.values():
        if tensor.is_floating_point():
            return str(tensor.dtype).removeprefix("torch.")
    return "float32"


def _config_dict(config: Any) -> dict:
    if hasattr(config, "to_dict"):
        data = config.to_dict()
    elif isinstance(config, dict):
        data = dict(config)
    else:
        raise ValueError(f"dense_config must be a PretrainedConfig or a dict, got {type(config).__name__}")
    if not data.get("model_type"):
        raise ValueError("dense_config has no model_type; pass the Hugging Face config of the dense model")
    try:
        return json.loads(json.dumps(data))
    except TypeError as err:
        raise ValueError(f"dense_config is not JSON-serializable: {err}") from None


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f)


def _plain_loadable(config, model: nn.Module, info: dict) -> bool:
    """Does the compact config alone rebuild the compact shapes (what plain from_pretrained does)?"""
    try:
        skeleton = _skeleton(config.to_dict(), info)
        _compare_shapes(skeleton, model, "compact config")
    except Exception:  # noqa: BLE001 - any failure to build it means plain from_pretrained would fail too
        return False
    return True


# ----------------------------------------------------------------------------------------------- loading


def load_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
    """Load a folder written by `save_pretrained` (uniform or not) as the compact model, in eval mode.

    The weights are read straight onto `device`; `dtype` casts the floating-point ones (default: as saved).
    Buffers the file does not hold keep the dtype the model's constructor gives them (rotary frequencies stay
    float32, as in HF).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no saved model folder at {path}")
    plan_path, weights_path = path / PLAN_FILE, path / WEIGHTS_FILE
    if not plan_path.is_file():
        raise FileNotFoundError(f"{plan_path} is missing: {path} was not saved by loraprune.save_pretrained")
    if not weights_path.is_file() and (path / INDEX_FILE).is_file():
        weights_path = path / INDEX_FILE  # written by the sharded save: one file per process that held tensors
    elif not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing")
    try:
        data = json.loads(plan_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"corrupt plan file {plan_path}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"corrupt plan file {plan_path}: not a JSON object")
    try:
        plan = PrunePlan.from_dict(data)
    except (PlanError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"corrupt plan file {plan_path}: {err}") from None
    dense = data.get("dense_config")
    if not isinstance(dense, dict) or not dense.get("model_type"):
        raise ValueError(f"corrupt plan file {plan_path}: no dense_config with a model_type")

    state = _read_weights(weights_path, str(device))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    info = {**data, "dtype": str(dtype).removeprefix("torch.") if dtype is not None else data.get("dtype")}

    model = _skeleton(dense, info)
    try:
        apply_plan(model, plan, inplace=True)
    except PlanError as err:
        raise ValueError(f"{plan_path} does not fit its dense_config: {err}") from None
    expected = model.state_dict()
    for name, tensor in state.items():
        if name in expected and tuple(expected[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{weights_path}: {name} is {list(tensor.shape)}, the plan makes it "
                             f"{list(expected[name].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{weights_path} holds tensors the model does not have: {', '.join(unexpected[:5])}")
    if missing and hasattr(model, "tie_weights"):
        model.tie_weights()  # tied targets (e.g. lm_head.weight) are saved once, under their source's name
    empty = [n for n, t in list(model.named_parameters(remove_duplicate=False))
             + list(model.named_buffers(remove_duplicate=False)) if t.device.type == "meta"]
    if empty:
        raise ValueError(f"{weights_path} lacks {len(empty)} tensor(s) the model needs: {', '.join(empty[:5])}")
    generation = path / "generation_config.json"
    if generation.is_file() and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ValueError(f"corrupt generation config {generation}: {err}") from None
    return model.to(device).eval()  # the buffers the constructor made; the weights are there already


def _read_weights(path: Path, device: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of every file an index (`model.safetensors.index.json`) names."""
    try:
        if path.name != INDEX_FILE:
            return load_file(str(path), device=device)
        files = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state |= load_file(str(path.parent / name), device=device)
        return state
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"corrupt weights file {path}: {err}") from None


# ----------------------------------------------------------------------------------------------- shared


def _skeleton(config_dict: dict, info: dict) -> nn.Module:
    """The architecture of `config_dict` with parameters on `meta` and buffers real (see module doc)."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"unknown model_type {model_type!r} in the saved config")
    config = CONFIG_MAPPING[model_type].from_dict(dict(config_dict))
    kwargs = {}
    if info.get("dtype"):
        kwargs["dtype"] = getattr(torch, info["dtype"])
    if info.get("attn_implementation"):
        kwargs["attn_implementation"] = info["attn_implementation"]
    arch = info.get("architecture")
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    with init_empty_weights(include_buffers=False):
        if cls is not None and hasattr(cls, "_from_config"):
            return cls._from_config(config, **kwargs)
        return AutoModelForCausalLM.from_config(config, **kwargs)


def _compare_shapes(skeleton: nn.Module, model: nn.Module, what: str) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if want.keys() != got.keys():
        diff = sorted(want.keys() ^ got.keys())
        raise ValueError(f"{what} does not rebuild the model: tensor names differ ({', '.join(diff[:5])})")
    bad = [k for k in want if want[k] != got[k]]
    if bad:
        raise ValueError(f"{what} does not rebuild the model: {bad[0]} is {list(want[bad[0]])} in the model, "
                         f"{list(got[bad[0]])} rebuilt ({len(bad)} mismatches)")
