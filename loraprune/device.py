"""Where a job runs and in which dtype: `--device {auto,cpu,cuda,cuda:N}` and `--dtype {auto,bf16,fp16,fp32}`.

`auto` means CUDA and bf16 where torch sees a GPU (fp16 on GPUs without bf16), the CPU and fp32 elsewhere.
Asking for CUDA where there is none is an error, never a quiet CPU run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DEVICES", "DTYPES", "DeviceError", "Placement", "dtype_name", "resolve"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICES = ("auto", "cpu", "cuda", "cuda:N")


class DeviceError(ValueError):
    """A device or dtype that cannot be had here; the message is one line naming what was asked and why not."""


@dataclass(frozen=True)
class Placement:
    """The device and dtype a job runs in, as resolved from what was asked."""

    device: torch.device
    dtype: torch.dtype

    def to_dict(self) -> dict[str, str]:
        return {"device": str(self.device), "dtype": dtype_name(self.dtype)}


def dtype_name(dtype: torch.dtype) -> str:
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))


def resolve(device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> Placement:
    """The placement `device` and `dtype` ask for, checked against what this machine has."""
    where = _device(device)
    if isinstance(dtype, torch.dtype):
        kind = dtype
    elif dtype == "auto":
        kind = torch.float32 if where.type == "cpu" else (
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    elif dtype in DTYPES:
        kind = DTYPES[dtype]
    else:
        raise DeviceError(f"unknown dtype {dtype!r}; known: auto, {', '.join(DTYPES)}")
    if kind not in DTYPES.values():
        raise DeviceError(f"dtype {kind} is not a floating-point dtype loraprune runs in ({', '.join(DTYPES)})")
    if where.type == "cuda" and kind == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"bf16 was asked for, and {torch.cuda.get_device_name(where)} has no bf16 support; "
                          "use --dtype fp16")
    return Placement(where, kind)


def _device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}; known: {', '.join(DEVICES)}") from None
    if where.type == "cpu":
        return torch.device("cpu")
    if where.type != "cuda":
        raise DeviceError(f"device {device!r} is not supported; known: {', '.join(DEVICES)}")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} was asked for, and torch sees no CUDA GPU here "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    count = torch.cuda.device_count()
    if where.index is not None and where.index >= count:
        raise DeviceError(f"device {device!r} was asked for, and there {'is' if count == 1 else 'are'} only {count} "
                          "CUDA GPU" + ("" if count == 1 else "s"))
    return torch.device("cuda", where.index or 0)
