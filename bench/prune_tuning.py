"""Drop shipped tuning records that lose to the default schedule on this machine.

    python bench/prune_tuning.py [--dry-run]

For each bench model (float, and int8 with the bench's calibration), builds the kernels a compile
would tune, and times every kernel that has a shipped host record twice, the same way (`socc tune`'s
timing: median of 5 repeats of >= 20 ms, inputs of ones): with the record's schedule and with the
default a compile builds without it (the vectorize pass's schedule). A record that is not faster
is removed from `toolchain/tuning/host` (the database is rewritten as `merge_tuning.py` writes it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    from merge_tuning import merge
    from run import calibration, models

    from toolchain import api
    from toolchain.progress import Progress
    from toolchain.targets import load_profile
    from toolchain.tuning import SHIPPED_DIR, recorded_kernels

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="report only; leave the shipped records as they are")
    parser.add_argument("--only", nargs="*", help="bench model names")
    args = parser.parse_args()
    shipped = SHIPPED_DIR / "host"
    host = load_profile("host")
    losers: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (path, inputs, shapes) in models(Path(folder)).items():
            if args.only and name not in args.only:
                continue
            for label, options in (("float", {}), ("int8", {"quantize": "int8", "calibration": calibration(name, inputs)})):
                mod, ctx = api.kernels_before_tuning(path, host, None, Progress(enabled=False), shape=shapes, **options)
                rows = recorded_kernels(mod, ctx, (str(shipped),))
                for row in rows:
                    lost = row["record_ms"] is None or (row["default_ms"] is not None and row["record_ms"] >= row["default_ms"])
                    if lost:
                        losers[row["workload"]] = f"{name} {label} {row['name']}"
                    print(f"{name:<14}{label:<6}{row['name']:<60}x{row['weight']:<3} record {row['record_ms']} ms  "
                          f"default {row['default_ms']} ms{'  DROP' if lost else ''}", flush=True)
    print(f"{len(losers)} records not faster than the default")
    if losers and not args.dry_run:
        workloads, read = merge(shipped, [], drop=set(losers))
        print(f"{shipped}: {workloads} workloads kept (read {read} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
