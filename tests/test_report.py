"""The build report and the memory budget, through the CLI and API."""

from __future__ import annotations

from pathlib import Path

import toolchain
from conftest import run_socc


def test_memory_budget_refusal_writes_nothing(tmp_path: Path, mobilenet: Path) -> None:
    out = tmp_path / "art"
    result = run_socc("compile", mobilenet, "-o", out, "-q", "--max-memory", "4MiB")
    assert result.code == 2, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "exceeds the budget of 4.00 MiB" in line and "peak memory" in line and "largest tensors: " in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_report_and_memory_section(tmp_path: Path, mobilenet: Path) -> None:
    art = toolchain.compile(mobilenet, "host", tmp_path / "art", max_memory=64 << 20, progress=False)
    memory = art.manifest["memory"]
    assert memory["peak_bytes"] == memory["weights_bytes"] + memory["arena_bytes"] <= 64 << 20
    assert memory["lower_bound_bytes"] <= memory["arena_bytes"] <= 1.02 * memory["lower_bound_bytes"]
    assert memory["arena_bytes"] < memory["tvm_default_bytes"]
    assert memory["weights_bytes"] > 7_000_000  # the CNN's float weights
    report = (art.path / "report.md").read_text()
    assert "| fuse-kernels |" in report and "TVM StaticPlanBlockMemory" in report
    assert (art.path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"report.md", "memory.png"} <= set(art.manifest["files"])


def test_max_shape_bounds_symbolic_dims(tmp_path: Path, tiny_mlp: Path) -> None:
    # Unfused, the MLP keeps two [batch, 8] intermediates for the planner.
    result = run_socc("compile", tiny_mlp, "-o", tmp_path / "art", "-q", "--json", "--max-shape", "batch=64",
                      "--skip-pass", "fuse-kernels")
    assert result.code == 0, result.stderr
    art = toolchain.load(tmp_path / "art")
    assert art.manifest["options"]["max_shape"] == {"batch": 64}
    assert art.manifest["memory"]["bounded_dims"] == {"batch": 64}
    assert art.manifest["memory"]["arena_bytes"] == 2 * 64 * 8 * 4  # two live [64, 8] float32 tensors
    import numpy as np

    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    assert toolchain.verify(art, model=tiny_mlp, inputs={"x": x}).ok
