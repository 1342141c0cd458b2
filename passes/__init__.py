"""socc's graph passes, one per module, registered here by name in their standard order."""

from __future__ import annotations

from .base import CompileContext, GraphPass, TvmPhase
from .decompose import Decompose
from .fold_constants import FoldConstants
from .fuse_kernels import FuseKernels
from .legalize import Legalize
from .lower_calls import LowerCalls
from .lower_vm import LowerVM
from .static_plan import StaticPlan

# The standard pipeline, in order. A target profile may name its own list (`default_passes`).
STANDARD_PIPELINE: tuple[type[GraphPass], ...] = (
    Decompose,
    FoldConstants,
    Legalize,
    FuseKernels,
    LowerCalls,
    StaticPlan,
    LowerVM,
)

REGISTRY: dict[str, type[GraphPass]] = {p.name: p for p in STANDARD_PIPELINE}

__all__ = ["CompileContext", "GraphPass", "TvmPhase", "REGISTRY", "STANDARD_PIPELINE"]
