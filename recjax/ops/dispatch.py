"""What every op dispatcher shares: whether the Pallas GPU kernels can run here, and the ``impl`` rule
(``"auto"`` = the Pallas kernel on a supporting GPU, XLA elsewhere; explicit names pass through)."""

from __future__ import annotations

from collections.abc import Sequence

import jax

IMPLS = ("auto", "pallas", "xla", "reference")


def pallas_supported() -> bool:
    """Triton-lowering Pallas on an NVIDIA GPU with bf16/int8 tensor cores (compute capability >= 8.0).
    Elsewhere kernels run only in interpret mode (tests on CPU)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    cc = getattr(dev, "compute_capability", None)
    return dev.platform == "gpu" and cc is not None and float(cc) >= 8.0


def resolve_impl(impl: str, impls: Sequence[str] = IMPLS) -> str:
    if impl not in impls:
        raise ValueError(f"impl: expected one of {tuple(impls)}, got {impl!r}")
    if impl == "auto":
        return "pallas" if pallas_supported() else "xla"
    return impl
