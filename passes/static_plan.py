"""static-plan: TVM's own block memory planner (StaticPlanBlockMemory)."""

from __future__ import annotations

from typing import Any

from .base import CompileContext, TvmPhase
from .stats import storage_allocations


class StaticPlan(TvmPhase):
    """Replaces per-tensor allocations in `main` with shared storage tokens reused across tensors whose lifetimes do not overlap (TVM's planner; socc's own arena planner is issue 5)."""

    name = "static-plan"

    def transforms(self, ctx: CompileContext) -> list[Any]:
        from tvm import relax

        return [relax.transform.StaticPlanBlockMemory()]

    def extra_stats(self, before: Any, after: Any) -> dict[str, Any]:
        sizes = storage_allocations(after)
        static = [s for s in sizes if s is not None]
        return {
            "storages": len(sizes),
            "planned_bytes": sum(static),
            "dynamic_storages": len(sizes) - len(static),
        }
