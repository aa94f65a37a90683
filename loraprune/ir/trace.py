"""Trace any nn.Module to an ATen-level FX graph with torch.export, and map its inputs back to state_dict names."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["CausalLMLogits", "TraceError", "TracedProgram", "trace", "wrap_for_trace"]


class TraceError(RuntimeError):
    """A model torch.export cannot trace; the message names the model and the failing op or module."""


class CausalLMLogits(nn.Module):
    """input_ids -> logits (or last hidden state), no KV cache: the shape-stable core of an HF model.

    HF models return ModelOutput objects and build caches; torch.export wants tensors in, tensors out.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        kwargs = {"use_cache": False} if getattr(self.model.config, "use_cache", None) is not None else {}
        out = self.model(input_ids=input_ids, **kwargs)
        for key in ("logits", "last_hidden_state"):
            if getattr(out, key, None) is not None:
                return getattr(out, key)
        return out[0]


def wrap_for_trace(model: nn.Module) -> tuple[nn.Module, str]:
    """HF PreTrainedModels get the logits wrapper; the prefix it adds to parameter names is returned."""
    if hasattr(model, "config") and hasattr(model.config, "model_type"):
        return CausalLMLogits(model), "model."
    return model, ""


@dataclass
class TracedProgram:
    """The exported program plus the naming needed to talk about parameters as users know them."""

    exported: torch.export.ExportedProgram
    param_of_input: dict[str, str]  # graph placeholder name -> state_dict name of the original model
    aliases: dict[str, list[str]]  # state_dict name -> all state_dict names sharing that tensor (tied weights)
    user_inputs: list[str] = field(default_factory=list)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)  # placeholder name -> lifted tensor constant

    @property
    def graph(self) -> torch.fx.Graph:
        return self.exported.graph_module.graph


def _alias_table(model: nn.Module) -> dict[str, list[str]]:
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), []).append(name)
    return {name: names for names in by_tensor.values() for name in names}


def trace(model: nn.Module, example_inputs: tuple | torch.Tensor) -> TracedProgram:
    """Export `model` on `example_inputs` (real or meta tensors) to an ATen graph with readable names."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    wrapped, prefix = wrap_for_trace(model)
    was_training = model.training
    model.eval()
    try:
        exported = torch.export.export(wrapped, tuple(example_inputs), strict=False)
        exported = exported.run_decompositions({})
    except Exception as err:  # torch.export raises many types; all mean the same thing to a user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TraceError(f"cannot trace {type(model).__name__}: {type(err).__name__}: {first}") from err
    finally:
        model.train(was_training)
    signature = exported.graph_signature
    param_of_input: dict[str, str] = {}
    for spec in signature.input_specs:
        target = getattr(spec, "target", None)
        if target is not None and spec.kind.name in ("PARAMETER", "BUFFER"):
            param_of_input[spec.arg.name] = target[len(prefix):] if target.startswith(prefix) else target
    user_inputs = [spec.arg.name for spec in signature.input_specs if spec.kind.name == "USER_INPUT"]
    constants = {spec.arg.name: exported.constants[spec.target] for spec in signature.input_specs
                 if spec.kind.name == "CONSTANT_TENSOR" and spec.target in exported.constants}
    return TracedProgram(exported, param_of_input, _alias_table(model), user_inputs, constants)
