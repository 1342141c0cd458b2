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


def test_kill_9_at_random_moments_leaves_old_or_new_whole(tmp_path: Path, tiny_mlp: Path) -> None:
    import random
    import signal
    import time

    out = tmp_path / "art"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "toolchain", "compile", str(tiny_mlp), "-o", str(out), "-q", "--no-isolate"]
    assert subprocess.run(command, env=env, check=False).returncode == 0
    reference = toolchain.load(out).manifest
    rng = random.Random(7)
    for _ in range(6):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 6.0))  # import, passes, codegen, packaging, commit: wherever it is
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert toolchain.load(out).manifest == reference  # the artifact there is complete (checksums pass)
    survivors = sorted(p.name for p in tmp_path.iterdir())
    assert survivors[-1] == "art"
    toolchain.compile(tiny_mlp, "host", out, progress=False)  # the next build sweeps what the kills left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
