"""socc's graph passes, one per module, registered here by name in their standard order."""

from __future__ import annotations

from .apply_tuning import ApplyTuning
from .base import CompileContext, GraphPass, TvmPhase
from .convert_layout import ConvertLayout
from .decompose import Decompose
from .fold_constants import FoldConstants
from .fuse_kernels import FuseKernels
from .fusion import FoldBatchNorm, Fusion
from .legalize import Legalize
from .lower_calls import LowerCalls
from .lower_vm import LowerVM
from .memory_plan import MemoryPlan
from .partition import Partition
from .quantize import Quantize
from .static_plan import StaticPlan
from .vectorize import Vectorize
from .winograd import Winograd

# The standard pipeline, in order. A target profile may name its own list (`default_passes`).
# static-plan (TVM's StaticPlanBlockMemory) then memory-plan (socc's arena): memory-plan takes TVM's
# storage tokens back apart and places every sized tensor in one arena, so static-plan's stats stay
# TVM's own plan for comparison; `--skip-pass memory-plan` builds with TVM's plan alone, and
# `--skip-pass static-plan` gives the same arena (memory-plan hands what it cannot size to TVM's planner).
# partition (only for profiles with an accelerator unit) outlines the accelerator's subgraphs after
# quantization, so it sees integer ops; the pipeline builds each part on its own from there.
# apply-tuning (after fuse-kernels: the kernels `socc tune` measured are exactly these) schedules
# kernels from tuning records; vectorize leaves a tuned kernel alone.
# quantize runs on folded constants and before fusion, whose patterns then see integer ops
# only where they fit (generic FuseOps fuses each integer conv/matmul with its float epilogue).
# convert-layout (NHWC targets) runs before fold-constants, which stores its weight permutes as
# HWIO weights, and before quantize, which quantizes convs in either layout.
# winograd runs after quantize (it takes the convs left in float) and before fusion, whose patterns
# would group the conv it replaces; generic fusion then joins the bias/activation to its output transform.
# fold-batchnorm must see R.nn.batch_norm, so it runs before decompose; fusion needs folded constants
# and un-legalized ops, so it runs between fold-constants and legalize (fuse-kernels' FuseTIR then
# makes one kernel of each group it formed).
STANDARD_PIPELINE: tuple[type[GraphPass], ...] = (
    FoldBatchNorm,
    Decompose,
    ConvertLayout,
    FoldConstants,
    Quantize,
    Partition,
    Winograd,
    Fusion,
    Legalize,
    FuseKernels,
    ApplyTuning,
    Vectorize,
    LowerCalls,
    StaticPlan,
    MemoryPlan,
    LowerVM,
)

REGISTRY: dict[str, type[GraphPass]] = {p.name: p for p in STANDARD_PIPELINE}

__all__ = ["CompileContext", "GraphPass", "TvmPhase", "REGISTRY", "STANDARD_PIPELINE"]
