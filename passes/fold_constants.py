"""fold-constants: evaluate at compile time every op whose inputs are all constants."""

from __future__ import annotations

from typing import Any

from .base import CompileContext, TvmPhase
from .stats import constant_bytes


class FoldConstants(TvmPhase):
    """Replaces calls whose arguments are all constants (shape arithmetic, weight transposes, casts) by their values."""

    name = "fold-constants"

    def transforms(self, ctx: CompileContext) -> list[Any]:
        from tvm import relax

        return [relax.transform.FoldConstant()]

    def extra_stats(self, before: Any, after: Any) -> dict[str, Any]:
        return {"constant_bytes_before": constant_bytes(before), "constant_bytes_after": constant_bytes(after)}
