"""lower-calls: leave dataflow form; make every kernel call write into an explicit allocation."""

from __future__ import annotations

from typing import Any

from .base import CompileContext, TvmPhase


class LowerCalls(TvmPhase):
    """Rewrites dataflow reshapes into zero-copy views, leaves dataflow blocks, and turns each `call_tir` into an explicit output allocation plus a destination-passing call."""

    name = "lower-calls"
    required = True

    def transforms(self, ctx: CompileContext) -> list[Any]:
        from tvm import relax

        return [
            relax.transform.RewriteDataflowReshape(),
            relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(),
            relax.transform.CallTIRRewrite(),
        ]
