"""legalize: lower every high-level Relax op to a TIR kernel called with call_tir."""

from __future__ import annotations

from typing import Any

from .base import CompileContext, TvmPhase


class Legalize(TvmPhase):
    """Rewrites each Relax operator call into `call_tir` of a TIR PrimFunc (TOPI compute), dispatches sort/scan/sampling to the CPU library kernels, and annotates each kernel's fusion pattern kind."""

    name = "legalize"
    required = True

    def transforms(self, ctx: CompileContext) -> list[Any]:
        from tvm import relax

        return [
            relax.backend.DispatchSampling(),
            relax.backend.DispatchSortScan(),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
        ]
