"""Which precision and memory format training runs in on a device, and why.

On CUDA, mixed precision is float16 autocast with a gradient scaler, in channels_last.
On a CPU, training is float32 NCHW unless asked (``--cpu-bf16``): bfloat16 autocast
(oneDNN's bf16 kernels) with channels_last then runs where the CPU has AMX. Measured on
one (Intel Xeon, 2 threads, a training step), bf16 + channels_last ran resnet18 at 64 px
1.56x and resnet50 at 224 px 3.0x as fast as fp32 NCHW, while with oneDNN held to
AVX512-BF16 (no AMX) the same steps ran 0.86-1.03x and to AVX-512 without bf16 0.4x
(``docs/benchmarks.md``), so a CPU without AMX stays in fp32 even when asked. It is not
the default because bpl's paired accuracy check moved test top-1 beyond its interval in
2 of 8 cells (``docs/results.md``). Weights, BatchNorm statistics, the optimiser and every
checkpoint stay float32 either way: autocast changes only what convolutions and linear
layers compute in.

``BPL_CPU_BF16=1`` (or ``0``) forces bf16 on (or off) whatever was asked, e.g. to test the
bf16 path on a CPU without AMX; ``ONEDNN_MAX_CPU_ISA`` below AMX counts as no AMX, since
oneDNN will not use it then.
"""

from __future__ import annotations

import contextlib
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

__all__ = ["Precision", "choose_precision", "cpu_bf16"]

ENV = "BPL_CPU_BF16"


def _forced() -> str | None:
    """``BPL_CPU_BF16``'s setting, "0" or "1", or None when it does not force either."""
    value = os.environ.get(ENV, "").strip()
    return value if value in ("0", "1") else None


def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU runs bf16 convolutions faster than fp32 (it has AMX), and why."""
    forced = _forced()
    if forced is not None:
        return forced == "1", f"{ENV}={forced}"
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if not caps.get("amx_bf16"):
        has = "AVX512-BF16 but no AMX" if caps.get("avx512_bf16") else "no AMX"
        return False, f"this CPU has {has}, where bf16 trained at 0.4-1.0x the speed of fp32"
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if isa and isa not in ("ALL", "DEFAULT") and "AMX" not in isa:
        return False, f"ONEDNN_MAX_CPU_ISA={isa} keeps oneDNN from using this CPU's AMX"
    return True, "this CPU has AMX (amx_bf16)"


@dataclass(frozen=True)
class Precision:
    """What one run computes in: the autocast dtype (None: float32), the memory format."""

    dtype: torch.dtype | None
    channels_last: bool
    device_type: str
    why: str

    @property
    def scaled(self) -> bool:
        """float16 needs a gradient scaler; bfloat16 has float32's range and does not."""
        return self.dtype is torch.float16

    def autocast(self) -> AbstractContextManager:
        """The mixed-precision context of a forward pass (a no-op for float32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the run's memory format (4-d inputs only)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def describe(self) -> dict[str, str]:
        """For logs, checkpoints and metrics.json: what ran and why."""
        return {"autocast": str(self.dtype).replace("torch.", "") if self.dtype else "float32",
                "memory_format": "channels_last" if self.channels_last else "contiguous",
                "why": self.why}

    def __str__(self) -> str:
        d = self.describe()
        return f"{d['autocast']}, {d['memory_format']} ({d['why']})"


def choose_precision(device: torch.device, amp: bool = True,
                     channels_last: bool = True, cpu_bf16_opt_in: bool = False) -> Precision:
    """The precision a run on ``device`` uses: ``amp`` and ``channels_last`` say where allowed.

    CUDA: float16 autocast when ``amp``. CPU: float32 unless ``cpu_bf16_opt_in``
    (``--cpu-bf16``) or ``BPL_CPU_BF16=1`` asks for bfloat16, which runs where the CPU
    has AMX (:func:`cpu_bf16`), with channels_last (in fp32 it measured 0.9x-1.3x NCHW
    depending on the network, so fp32 stays NCHW). Opt-in because bpl's paired check
    found test top-1 differences beyond their intervals in 2 of 8 cells (docs/results.md).
    """
    if device.type == "cuda":
        why = "CUDA mixed precision" if amp else "--no-amp"
        return Precision(torch.float16 if amp else None, channels_last, "cuda", why)
    if device.type != "cpu":
        return Precision(None, False, device.type, f"no mixed precision on {device.type}")
    if not amp:
        return Precision(None, False, "cpu", "--no-amp")
    if not cpu_bf16_opt_in and _forced() is None:
        return Precision(None, False, "cpu", "float32 is the CPU default; --cpu-bf16 trains in "
                         "bfloat16 where the CPU has AMX")
    native, why = cpu_bf16()
    if not native:
        return Precision(None, False, "cpu", why)
    return Precision(torch.bfloat16, channels_last, "cpu", why)
