"""Acceptance: real models compiled for host and arm-cpu, run (ARM under qemu-aarch64), checked against onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import toolchain
from conftest import run_socc

MAX_REL = 1e-4
_built: dict[tuple[str, str], toolchain.Artifact] = {}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("real")


def build(request: pytest.FixtureRequest, out_dir: Path, model_fixture: str, target: str) -> tuple[Path, toolchain.Artifact]:
    """Compiles each (model, target) once per session; the source model stays findable by hash."""
    model = request.getfixturevalue(model_fixture)
    key = (model_fixture, target)
    if key not in _built:
        _built[key] = toolchain.compile(model, target, model.parent / f"{model.stem}.{target}", progress=False)
    return model, _built[key]


def assert_close(report: toolchain.VerifyReport) -> None:
    assert report.outputs, "no outputs compared"
    for out in report.outputs:
        assert out.max_rel <= MAX_REL, report.table()
        assert out.cosine > 0.99999, report.table()
    assert report.ok


@pytest.mark.parametrize("target", ["host", "arm-cpu"])
def test_mobilenet_v2_like(request: pytest.FixtureRequest, out_dir: Path, target: str) -> None:
    model, art = build(request, out_dir, "mobilenet", target)
    image = np.random.default_rng(3).standard_normal([1 if isinstance(d, str) else d for d in art.inputs[0]["shape"]]).astype(np.float32)
    report = toolchain.verify(art, inputs={art.inputs[0]["name"]: image})
    assert_close(report)
    if target == "arm-cpu":
        assert {"model.so", "run_model", "run_model.cc", "runtime/libtvm_runtime.so", "runtime/libtvm_ffi.so"} <= set(art.manifest["files"])


@pytest.mark.parametrize("target", ["host", "arm-cpu"])
def test_minilm_real_weights_dynamic_sequence(request: pytest.FixtureRequest, out_dir: Path, target: str,
                                              sentences_inputs: dict[str, np.ndarray]) -> None:
    model, art = build(request, out_dir, "minilm", target)
    seq_dims = [spec["shape"][1] for spec in art.inputs]
    assert all(isinstance(d, str) for d in seq_dims), "sequence length should stay symbolic"
    report = toolchain.verify(art, inputs=sentences_inputs)
    assert_close(report)
    if target == "host":  # one compiled module serves other sequence lengths too
        short = {k: v[:, :9] for k, v in sentences_inputs.items()}
        assert_close(toolchain.verify(art, inputs=short))


@pytest.mark.parametrize("target", ["host", "arm-cpu"])
def test_multi_input_multi_output(request: pytest.FixtureRequest, out_dir: Path, target: str) -> None:
    model, art = build(request, out_dir, "multi_io", target)
    assert len(art.inputs) >= 2 and len(art.outputs) >= 2
    report = toolchain.verify(art, seed=7)
    assert [o.name for o in report.outputs] == [o["name"] for o in art.outputs]
    assert_close(report)


def test_cli_verify_under_emulation(request: pytest.FixtureRequest, out_dir: Path) -> None:
    model, art = build(request, out_dir, "multi_io", "arm-cpu")
    result = run_socc("verify", art.path, "--json", "--seed", "3")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] and data["target"] == "arm-cpu"


@pytest.mark.parametrize("target", ["cortex-a55", "cortex-a76", "cortex-a78", "cortex-x3", "cortex-x4"])
def test_every_arm_profile_builds_and_runs(tmp_path: Path, tiny_mlp: Path, target: str) -> None:
    art = toolchain.compile(tiny_mlp, target, tmp_path / target, progress=False)
    assert art.manifest["target"]["tvm_target"]["mcpu"] == target
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    assert_close(toolchain.verify(art, model=tiny_mlp, inputs={"x": x}))


def test_arm_rebuild_is_byte_identical(request: pytest.FixtureRequest, out_dir: Path, tmp_path: Path) -> None:
    model, art = build(request, out_dir, "multi_io", "arm-cpu")
    again = toolchain.compile(model, "arm-cpu", tmp_path / "again", progress=False)
    assert again.manifest == art.manifest
