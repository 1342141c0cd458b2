"""Shared fixtures: real ONNX models built once per session, and a real `socc` process runner."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `examples` is a folder of the repo, not an installed package


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_socc(*args: str | Path, cwd: Path | None = None) -> CliResult:
    """Runs the real CLI in a child process (exit codes and stderr as a user sees them)."""
    proc = subprocess.run(
        [sys.executable, "-m", "toolchain", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def tiny_mlp_model() -> onnx.ModelProto:
    """x[batch,16] -> MatMul -> Add -> Relu -> y[batch,8]: the smallest real model."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "B")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["mm"], name="matmul_0"),
            helper.make_node("Add", ["mm", "B"], ["biased"], name="add_0"),
            helper.make_node("Relu", ["biased"], ["y"], name="relu_0"),
        ],
        "tiny_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [weight, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="socc-tests")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_mlp(models_dir: Path) -> Path:
    path = models_dir / "tiny_mlp.onnx"
    onnx.save(tiny_mlp_model(), path)
    return path


@pytest.fixture(scope="session")
def mobilenet(models_dir: Path) -> Path:
    from examples.models import mobilenet_v2_like

    return mobilenet_v2_like(models_dir / "mobilenet_v2_like.onnx")


@pytest.fixture(scope="session")
def minilm(models_dir: Path) -> Path:
    from examples.models import minilm

    return minilm(models_dir / "minilm.onnx")


@pytest.fixture(scope="session")
def multi_io(models_dir: Path) -> Path:
    from examples.models import multi_io

    return multi_io(models_dir / "multi_io.onnx")


@pytest.fixture(scope="session")
def sentences_inputs() -> dict[str, np.ndarray]:
    """Real English sentences, tokenized by MiniLM's own tokenizer, padded to 16 tokens."""
    from examples.models import minilm_tokenize

    return minilm_tokenize(["A man is playing a guitar on the street.", "The stock market fell sharply today."], 16)
