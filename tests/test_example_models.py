"""The example models of examples/models.py: deterministic, valid, runnable, and (MiniLM) really trained.

The `mobilenet`, `minilm` and `multi_io` files come from conftest's session fixtures (each exported once).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import REPO
from examples import models

ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64}


@pytest.fixture(scope="session")
def unsupported(models_dir: Path) -> Path:
    return models.unsupported_op_model(models_dir / "unsupported.onnx")


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_checked(path: Path, dims: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Runs the model on random inputs of its declared shapes (symbolic dims from `dims`) and checks
    every output against its declared dtype and shape."""
    sess = session(path)
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in sess.get_inputs():
        shape = [dims[d] if isinstance(d, str) else d for d in spec.shape]
        dtype = ORT_TYPES[spec.type]
        feeds[spec.name] = rng.integers(1, 2, shape).astype(dtype) if dtype == np.int64 else rng.standard_normal(shape).astype(dtype)
    outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    for spec in sess.get_outputs():
        value = outputs[spec.name]
        assert value.dtype == ORT_TYPES[spec.type], spec.name
        assert list(value.shape) == [dims[d] if isinstance(d, str) else d for d in spec.shape], spec.name
        assert np.all(np.isfinite(value)), spec.name
    return outputs


def signature(path: Path) -> dict[str, list]:
    model = onnx.load(str(path), load_external_data=False)
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}


def test_importing_examples_does_not_import_torch() -> None:
    code = "import sys, examples.models; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.parametrize("name", ["mobilenet", "minilm", "multi_io", "unsupported"])
def test_two_exports_are_byte_identical(request: pytest.FixtureRequest, tmp_path: Path, name: str) -> None:
    first: Path = request.getfixturevalue(name)
    builder = {"mobilenet": models.mobilenet_v2_like, "minilm": models.minilm,
               "multi_io": models.multi_io, "unsupported": models.unsupported_op_model}[name]
    again = builder(tmp_path / "again.onnx")
    assert again == tmp_path / "again.onnx"
    assert again.read_bytes() == first.read_bytes()
    onnx.checker.check_model(str(again))


def test_mobilenet_runs_and_keeps_batchnorm(mobilenet: Path) -> None:
    assert signature(mobilenet) == {"image": [1, 3, 96, 96], "logits": [1, 1000]}
    ops = {n.op_type for n in onnx.load(str(mobilenet)).graph.node}
    assert {"Conv", "BatchNormalization", "Clip", "Add", "GlobalAveragePool", "Gemm"} <= ops
    logits = [run_checked(mobilenet, {}, seed)["logits"] for seed in range(3)]
    assert all(x.std() > 0.05 for x in logits), "activations collapsed"
    assert np.std(logits, axis=0).mean() > 0.01, "the output does not depend on the image"


def test_mobilenet_options(tmp_path: Path) -> None:
    path = models.mobilenet_v2_like(tmp_path / "m.onnx", width=0.35, image_size=64, num_classes=10, fold_batchnorm=True)
    assert signature(path) == {"image": [1, 3, 64, 64], "logits": [1, 10]}
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    run_checked(path, {})


def test_minilm_runs_at_two_sequence_lengths(minilm: Path) -> None:
    assert signature(minilm) == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"],
                                 "last_hidden_state": ["batch", "sequence", 384], "sentence_embedding": ["batch", 384]}
    for dims in ({"batch": 1, "sequence": 8}, {"batch": 2, "sequence": 32}):
        out = run_checked(minilm, dims)
        np.testing.assert_allclose(np.linalg.norm(out["sentence_embedding"], axis=1), 1.0, rtol=1e-5)


def test_multi_io_runs(multi_io: Path) -> None:
    assert signature(multi_io) == {"x": [1, 16], "y": [1, 8], "scale": [1],
                                   "sum": [1, 8], "prod": [1, 8], "feat": [1, 24], "num_pos": [1]}
    out = run_checked(multi_io, {})
    np.testing.assert_allclose(out["feat"].sum(), 1.0, rtol=1e-5)


def test_unsupported_model_is_valid_onnx_that_onnxruntime_runs(unsupported: Path) -> None:
    onnx.checker.check_model(str(unsupported), full_check=True)
    assert {n.op_type: n.name for n in onnx.load(str(unsupported)).graph.node}.items() >= {
        "Celu": "celu_0", "LpNormalization": "lpnorm_0"}.items()
    run_checked(unsupported, {})


def test_unsupported_model_fails_in_tvm_from_onnx(unsupported: Path) -> None:
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    with pytest.raises(tvm.error.OpNotImplemented) as info:
        from_onnx(onnx.load(str(unsupported)), keep_params_in_input=False)
    assert all(op in str(info.value) for op in models.UNSUPPORTED_OPS)


PARAPHRASES = ["A man is playing a guitar on the street.", "Someone plays the guitar outdoors."]
UNRELATED = ["The stock market fell sharply today.", "Bake the bread for forty minutes."]


def test_minilm_has_the_real_weights(minilm: Path) -> None:
    feeds = models.minilm_tokenize(PARAPHRASES + UNRELATED, 24)
    assert feeds["input_ids"].shape == (4, 24) and feeds["input_ids"].dtype == np.int64
    assert feeds["input_ids"][0, 0] == 101 and feeds["attention_mask"][0, -1] == 0  # [CLS] first, padded
    emb = session(minilm).run(["sentence_embedding"], feeds)[0]
    cos = emb @ emb.T
    assert cos[0, 1] > 0.6, cos  # paraphrases
    assert max(abs(cos[i, j]) for i in range(4) for j in range(4) if i < j and (i, j) != (0, 1)) < 0.3, cos

    from sentence_transformers import SentenceTransformer  # the reference implementation of this model

    reference = SentenceTransformer(models._minilm_path(), device="cpu").encode(PARAPHRASES + UNRELATED)  # noqa: SLF001
    np.testing.assert_allclose(emb, reference, atol=1e-5)


def test_minilm_static_shapes(tmp_path: Path) -> None:
    path = models.minilm(tmp_path / "static.onnx", dynamic_seq=False, seq_len=8)
    assert signature(path) == {"input_ids": [1, 8], "attention_mask": [1, 8],
                               "last_hidden_state": [1, 8, 384], "sentence_embedding": [1, 384]}
    run_checked(path, {})
