"""legalize: lower every high-level Relax op to a TIR kernel called with call_tir."""

from __future__ import annotations

from typing import Any

from .base import CompileContext, TvmPhase
from .fast_math import legalize_map


class Legalize(TvmPhase):
    """Rewrites each Relax operator call into `call_tir` of a TIR PrimFunc (TOPI compute), dispatches sort/scan/sampling to the CPU library kernels, and annotates each kernel's fusion pattern kind. On CPUs with float vectors, float32 exp, erf and softmax become vectorizable arithmetic (fast_math.py) instead of a libm call per element; `exact_math` keeps libm."""

    name = "legalize"
    required = True

    def __init__(self) -> None:
        self.fast_math_counts: dict[str, int] = {}

    def transforms(self, ctx: CompileContext) -> list[Any]:
        from tvm import relax

        fast_math = ctx.vector_float and ctx.vector_bits > 0 and not ctx.options.get("exact_math", False)
        return [
            relax.backend.DispatchSampling(),
            relax.backend.DispatchSortScan(),
            relax.transform.LegalizeOps(customize_legalize_map=legalize_map(self.fast_math_counts) if fast_math else None),
            relax.transform.AnnotateTIROpPattern(),
        ]

    def extra_stats(self, before: Any, after: Any) -> dict[str, Any]:
        return {"fast_math_ops": sum(self.fast_math_counts.values()), "fast_math": dict(sorted(self.fast_math_counts.items()))}
