"""Builds racing for the same output: one wins whole, neither corrupts, nothing half-written is left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import toolchain
from conftest import REPO


def test_two_builds_of_one_output_at_once(tmp_path: Path, tiny_mlp: Path) -> None:
    out = tmp_path / "art"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "toolchain", "compile", str(tiny_mlp), "-o", str(out), "-q", "--no-isolate"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert all(code == 0 for _, _, code in results), results
    art = toolchain.load(out)  # every file matches the manifest: one build won whole
    assert toolchain.verify(art, model=tiny_mlp).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_commit_over_a_folder_created_meanwhile(tmp_path: Path) -> None:
    from toolchain.artifact import commit_dir, staging_dir

    out = tmp_path / "art"
    first, second = staging_dir(out), staging_dir(out)
    (first / "a").write_text("first")
    (second / "a").write_text("second")
    commit_dir(first, out)
    commit_dir(second, out)
    assert (out / "a").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
