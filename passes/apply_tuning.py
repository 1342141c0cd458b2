"""apply-tuning: kernels scheduled from tuning records (`socc tune`, or the records socc ships)."""

from __future__ import annotations

import functools
from typing import Any

from .base import CompileContext, GraphPass

# The attribute MetaSchedule puts on a kernel it scheduled; later schedule passes leave such kernels alone.
SCHEDULED_ATTR = "tirx.is_scheduled"


class ApplyTuning(GraphPass):
    """Replaces every kernel that a tuning database holds a record for (same kernel, structurally)
    by the best schedule recorded for it; kernels without a record keep the default path. The
    databases are the context's `tuning_databases` folders (socc's shipped records for the target
    profile, then the user's), each a MetaSchedule JSON database."""

    name = "apply-tuning"

    def run(self, mod: Any, ctx: CompileContext) -> tuple[Any, dict[str, Any]]:
        from tvm import relax, tirx

        kernels = [gv for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
        database = open_databases(ctx.tuning_databases)
        if database is None or not kernels:
            return mod, {"kernels": len(kernels), "kernels_tuned": 0, "databases": list(ctx.tuning_databases)}
        with ctx.target, database:
            result = relax.transform.MetaScheduleApplyDatabase()(mod)
        tuned = sorted(gv.name_hint for gv in kernels if is_scheduled(result[gv.name_hint]))
        return result, {"kernels": len(kernels), "kernels_tuned": len(tuned), "tuned": tuned,
                        "databases": list(ctx.tuning_databases)}


def is_scheduled(func: Any) -> bool:
    return func.attrs is not None and SCHEDULED_ATTR in func.attrs and bool(func.attrs[SCHEDULED_ATTR])


def open_databases(folders: Any) -> Any:
    """One MetaSchedule database over the folders that hold records (None when none does)."""
    from pathlib import Path

    present = tuple((str(folder), Path(folder, "database_tuning_record.json").stat().st_mtime_ns)
                    for folder in folders if Path(folder, "database_tuning_record.json").is_file())
    return _open_databases(present) if present else None


@functools.lru_cache(maxsize=8)
def _open_databases(present: tuple[tuple[str, int], ...]) -> Any:
    """Parsing a database costs ~0.7 s (the shipped host records): done once per process for
    the same files (the modification times are part of the key, so new records are read)."""
    from tvm.s_tir import meta_schedule as ms

    found = [ms.database.JSONDatabase(work_dir=folder, allow_missing=False) for folder, _ in present]
    return found[0] if len(found) == 1 else ms.database.UnionDatabase(*found)
