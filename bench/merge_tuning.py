"""Merge tuning databases into the records socc ships (`toolchain/tuning/<profile>/`).

    python bench/merge_tuning.py toolchain/tuning/host [/tmp/tunedb/host ...]

Keeps the best record (lowest mean run time) of every workload across the shipped database and
the given ones; `apply-tuning` only reads the best, so the rest would be dead weight in the repo.
The output is rewritten in a fixed order (workloads by structural hash), so merging the same
inputs gives the same files.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path


def _mean_seconds(record) -> float:  # noqa: ANN001 - a MetaSchedule TuningRecord
    times = [float(t) for t in record.run_secs or []]
    return sum(times) / len(times) if times else float("inf")


def merge(shipped: Path, sources: list[Path], drop: set[str] = frozenset()) -> tuple[int, int]:
    """Rewrites `shipped` with the best record per workload, without the workloads whose hash is in
    `drop`; returns (workloads, records read)."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    best: dict[str, object] = {}
    read = 0
    for folder in [shipped, *sources]:
        if not (folder / "database_workload.json").exists():
            continue
        database = ms.database.JSONDatabase(work_dir=str(folder), allow_missing=False)
        for record in database.get_all_tuning_records():
            read += 1
            key = f"{tvm_ffi.structural_hash(record.workload.mod):020d}"
            if key in drop:
                continue
            if key not in best or _mean_seconds(record) < _mean_seconds(best[key]):
                best[key] = record
    staging = Path(tempfile.mkdtemp(prefix="merged-", dir=shipped.parent))
    merged = ms.database.JSONDatabase(work_dir=str(staging))
    for key in sorted(best):
        record = best[key]
        workload = merged.commit_workload(record.workload.mod)
        merged.commit_tuning_record(ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target, record.args_info))
    shutil.rmtree(shipped, ignore_errors=True)
    staging.rename(shipped)
    return len(best), read


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    workloads, read = merge(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
    print(f"{sys.argv[1]}: {workloads} workloads, best record each (read {read} records)")
