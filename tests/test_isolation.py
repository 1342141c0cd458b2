"""Isolated builds: a crash, a hang or runaway memory in the compiler becomes one clean error naming the stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def socc_with_env(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "toolchain", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env}, check=False)


@pytest.mark.parametrize(("stage", "signal_name"), [("legalize", "SIGSEGV"), ("codegen", "SIGABRT"), ("package", "SIGKILL")])
def test_native_crash_in_a_stage_is_one_clean_error(tmp_path: Path, tiny_mlp: Path, stage: str, signal_name: str) -> None:
    out = tmp_path / "art"
    result = socc_with_env({"SOCC_FAULT_STAGE": stage, "SOCC_FAULT_SIGNAL": signal_name}, "compile", tiny_mlp, "-o", out, "-q")
    assert result.returncode == 2
    assert result.stderr.strip() == f"socc: error: the compiler crashed ({signal_name}) in stage {stage}; memory limit 16384 MiB"
    assert not out.exists() and not any(p.name.startswith(".art") for p in tmp_path.iterdir())


def test_crash_keeps_the_previous_artifact_whole(tmp_path: Path, tiny_mlp: Path) -> None:
    out = tmp_path / "art"
    assert socc_with_env({}, "compile", tiny_mlp, "-o", out, "-q").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = socc_with_env({"SOCC_FAULT_STAGE": "package", "SOCC_FAULT_SIGNAL": "SIGKILL"}, "compile", tiny_mlp, "-o", out, "-q")
    assert result.returncode == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert socc_with_env({}, "verify", out, "--model", tiny_mlp).returncode == 0


def test_time_limit(tmp_path: Path, tiny_mlp: Path) -> None:
    result = socc_with_env({}, "compile", tiny_mlp, "-o", tmp_path / "art", "-q", "--timeout", "1")
    assert result.returncode == 2
    assert result.stderr.startswith("socc: error: build stopped after 1 s in stage ") and "(time limit)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_memory_limit(tmp_path: Path, tiny_mlp: Path) -> None:
    result = socc_with_env({}, "compile", tiny_mlp, "-o", tmp_path / "art", "-q", "--build-memory", "1GiB")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and ("out of memory in stage" in line or "crashed" in line), line
    assert not (tmp_path / "art").exists()
