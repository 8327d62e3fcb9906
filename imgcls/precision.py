"""Mixed precision: which autocast dtype a run uses, and the context that applies it."""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype; None means fp32. auto: bf16 on CPUs and on GPUs that support it
    (Ampere and newer), else fp16 (with a GradScaler, which the trainer enables for fp16)."""
    if name not in PRECISIONS:
        raise ValueError(f"train.precision={name!r}: expected one of {', '.join(PRECISIONS)}")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[name]


def autocast(device: torch.device, dtype: torch.dtype | None) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for `device` (a no-op one for fp32)."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def precision_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]
