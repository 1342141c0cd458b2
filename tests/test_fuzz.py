"""A short fuzz run in the suite (the long one is `make fuzz`): mutated real models never crash socc."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))

from harness import run  # noqa: E402


def test_short_fuzz_run_has_no_crash_hang_or_traceback(tmp_path: Path) -> None:
    summary = run(cases=60, seed=12345, timeout=120, findings=tmp_path / "findings", workers=2)
    assert summary["crashes"] == 0 and summary["hangs"] == 0 and summary["tracebacks"] == 0, summary["findings"]
    assert summary["ok"] + summary["clean_errors"] + summary["contained_native_crashes"] == 60
    assert summary["clean_errors"] > 0 and summary["ok"] > 0  # the mutations really reach both outcomes
