"""fold-batchnorm and fusion: each pattern on a small ONNX graph, then the real models.

Every build is a real TVM compile for the host. A fused build is compared with onnxruntime and with
the same model built without the two passes (`skip_pass=["fold-batchnorm", "fusion"]`); the kernel
counts are the manifest's (TIR functions after fuse-kernels / lower-vm).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import toolchain
from toolchain.importer import Limits, import_onnx
from toolchain.passes import CompileContext
from toolchain.passes.fusion import FoldBatchNorm, Fusion, known_pattern_names

UNFUSED = ["fold-batchnorm", "fusion"]
MAX_REL = 1e-4
node = helper.make_node


# ------------------------------------------------------------------------------------- helpers

def save_model(path: Path, nodes: list, inputs: dict[str, list[int]], outputs: dict[str, list[int]],
               weights: dict[str, np.ndarray], opset: int = 17) -> Path:
    graph = helper.make_graph(
        nodes, path.stem,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), n) for n, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="socc-tests")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def stats_of(art: toolchain.Artifact) -> dict[str, dict[str, Any]]:
    return {p["name"]: p["stats"] for p in art.manifest["passes"]}


def kernels(art: toolchain.Artifact) -> int:
    return stats_of(art)["lower-vm"]["kernels_after"]


def build_both(model: Path, out: Path, **options: Any) -> tuple[toolchain.Artifact, toolchain.Artifact]:
    # the patterns are written for the ONNX layout; the host's own is NHWC (convert-layout: a transpose at each edge)
    options.setdefault("layout", "NCHW")
    fused = toolchain.compile(model, "host", out / f"{model.stem}.fused", progress=False, **options)
    unfused = toolchain.compile(model, "host", out / f"{model.stem}.unfused", skip_pass=UNFUSED, progress=False, **options)
    return fused, unfused


def assert_same_numbers(fused: toolchain.Artifact, unfused: toolchain.Artifact, model: Path,
                        inputs: dict[str, np.ndarray] | None = None) -> None:
    """Both builds match onnxruntime, and each other, within the float32 tolerance."""
    for art in (fused, unfused):
        report = toolchain.verify(art, model=model, inputs=inputs, seed=1)
        assert report.ok and all(o.max_rel <= MAX_REL for o in report.outputs), report.table()
    if inputs is None:
        inputs = {spec["name"]: np.random.default_rng(2).standard_normal(spec["shape"]).astype(np.float32) for spec in fused.inputs}
    a, b = fused.run(inputs), unfused.run(inputs)
    for name in b:
        scale = float(np.abs(b[name]).max()) or 1.0
        assert float(np.abs(a[name] - b[name]).max()) / scale <= MAX_REL, name


def fusion_stats(art: toolchain.Artifact) -> dict[str, Any]:
    return stats_of(art)["fusion"]


def rng_weights(seed: int, **shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) / np.sqrt(max(1, shape[-1]))).astype(np.float32) for name, shape in shapes.items()}


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fusion")


# ------------------------------------------------------------------------------ small graphs

def conv_bn_relu6(path: Path) -> Path:
    rng = np.random.default_rng(0)
    weights = {
        "W": rng.standard_normal((8, 4, 3, 3)) / 6, "gamma": rng.uniform(0.5, 1.5, 8), "beta": rng.normal(0, 0.1, 8),
        "mean": rng.normal(0, 0.2, 8), "var": rng.uniform(0.5, 2.0, 8), "lo": np.float32(0), "hi": np.float32(6),
    }
    nodes = [node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-5),
             node("Clip", ["bn", "lo", "hi"], ["y"])]
    return save_model(path, nodes, {"x": [1, 4, 8, 8]}, {"y": [1, 8, 8, 8]}, weights)


def test_conv_bn_relu6_folds_and_fuses(out: Path) -> None:
    model = conv_bn_relu6(out / "conv_bn_relu6.onnx")
    # no_simplify: onnxsim would fold the BatchNorm itself; here the pass must
    fused, unfused = build_both(model, out, no_simplify=True)
    assert stats_of(fused)["fold-batchnorm"]["batch_norms"] == 1 and stats_of(fused)["fold-batchnorm"]["folded"] == 1
    stats = fusion_stats(fused)
    assert stats["patterns"]["conv2d-bias-act"] == 1
    assert stats["clip_canonicalized"]["clip"] == 1
    assert stats["groups"] == {"fused_conv2d_bias_act": ["nn.conv2d", "add", "clip"]}
    assert stats_of(fused)["fuse-kernels"]["kernels_after"] == 1  # the group is one kernel
    assert kernels(fused) <= kernels(unfused)
    assert_same_numbers(fused, unfused, model)


def test_preactivation_batchnorm_becomes_one_multiply_add(out: Path) -> None:
    """DenseNet's pre-activation BN (no conv before it to fold into) -> x * scale + shift: two
    per-channel constants where decompose would leave four, same numbers as onnxruntime's."""
    rng = np.random.default_rng(3)
    weights = {"gamma": rng.uniform(0.5, 1.5, 6), "beta": rng.normal(0, 0.3, 6), "mean": rng.normal(0, 0.5, 6),
               "var": rng.uniform(0.2, 2.0, 6), "W": rng.standard_normal((8, 6, 1, 1)) / 3}
    nodes = [node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-3),
             node("Relu", ["bn"], ["r"]), node("Conv", ["r", "W"], ["y"])]
    model = save_model(out / "preact_bn.onnx", nodes, {"x": [1, 6, 5, 5]}, {"y": [1, 8, 5, 5]}, weights)
    fused, unfused = build_both(model, out)
    assert stats_of(fused)["fold-batchnorm"]["batch_norms"] == 1
    assert stats_of(fused)["fold-batchnorm"]["folded"] == 0 and stats_of(fused)["fold-batchnorm"]["to_affine"] == 1
    # conv weights 8x6x4 bytes, and the BN's 2 vectors of 6 (decompose's form keeps 4)
    assert fused.manifest["memory"]["weights_bytes"] == (8 * 6 + 2 * 6) * 4
    assert unfused.manifest["memory"]["weights_bytes"] == (8 * 6 + 4 * 6) * 4
    assert_same_numbers(fused, unfused, model)


def test_conv_bias_hardswish_residual(out: Path) -> None:
    weights = rng_weights(1, W=(8, 8, 3, 3), B=(8,))
    nodes = [node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]), node("HardSwish", ["c"], ["h"]),
             node("Add", ["h", "x"], ["y"])]
    model = save_model(out / "conv_hardswish.onnx", nodes, {"x": [1, 8, 8, 8]}, {"y": [1, 8, 8, 8]}, weights)
    fused, unfused = build_both(model, out)
    stats = fusion_stats(fused)
    assert stats["patterns"]["conv2d-bias-hardswish"] == 1 and stats["fused_calls"] == 1
    (ops,) = stats["groups"].values()
    # the residual add after the activation joins the group, as generic fusion would have taken it
    assert ops[:2] == ["nn.conv2d", "add"] and "clip" in ops and ops[-1] == "add"
    assert stats_of(fused)["fuse-kernels"]["kernels_after"] == 1
    assert kernels(fused) <= kernels(unfused)
    assert_same_numbers(fused, unfused, model)


def _dense_bias() -> list:
    return [node("MatMul", ["x", "W"], ["mm"]), node("Add", ["mm", "B"], ["h"])]


@pytest.mark.parametrize("form", ["erf", "tanh"])
def test_matmul_bias_gelu(out: Path, form: str) -> None:
    weights = {**rng_weights(2, W=(32, 48), B=(48,)), "half": np.float32(0.5), "one": np.float32(1.0)}
    if form == "erf":  # what torch exports for nn.GELU()
        weights["sqrt2"] = np.float32(np.sqrt(2.0))
        nodes = [*_dense_bias(), node("Div", ["h", "sqrt2"], ["d"]), node("Erf", ["d"], ["e"]),
                 node("Add", ["e", "one"], ["p"]), node("Mul", ["h", "p"], ["hp"]), node("Mul", ["hp", "half"], ["y"])]
    else:  # nn.GELU(approximate="tanh") written out
        weights.update(three=np.float32(3.0), k=np.float32(0.044715), s=np.float32(np.sqrt(2 / np.pi)))
        nodes = [*_dense_bias(), node("Pow", ["h", "three"], ["h3"]), node("Mul", ["h3", "k"], ["kh3"]),
                 node("Add", ["h", "kh3"], ["inner"]), node("Mul", ["inner", "s"], ["si"]), node("Tanh", ["si"], ["t"]),
                 node("Add", ["t", "one"], ["p"]), node("Mul", ["h", "p"], ["hp"]), node("Mul", ["hp", "half"], ["y"])]
    model = save_model(out / f"dense_gelu_{form}.onnx", nodes, {"x": [4, 32]}, {"y": [4, 48]}, weights)
    fused, unfused = build_both(model, out)
    stats = fusion_stats(fused)
    name = "dense-bias-gelu" if form == "erf" else "dense-bias-gelu-tanh"
    assert stats["patterns"][name] == 1 and stats["fused_calls"] == 1
    (ops,) = stats["groups"].values()
    assert ops[:2] == ["matmul", "add"] and ("erf" if form == "erf" else "tanh") in ops
    assert stats_of(fused)["fuse-kernels"]["kernels_after"] == 1
    assert kernels(fused) <= kernels(unfused)
    assert_same_numbers(fused, unfused, model)


def test_layernorm_written_as_primitives(out: Path) -> None:
    rng = np.random.default_rng(3)
    weights = {"two": np.float32(2.0), "eps": np.float32(1e-5), "gamma": rng.uniform(0.5, 1.5, 32), "beta": rng.normal(0, 0.1, 32)}
    nodes = [node("ReduceMean", ["x"], ["m"], axes=[-1]), node("Sub", ["x", "m"], ["d"]),
             node("Pow", ["d", "two"], ["d2"]), node("ReduceMean", ["d2"], ["v"], axes=[-1]),
             node("Add", ["v", "eps"], ["ve"]), node("Sqrt", ["ve"], ["sd"]), node("Div", ["d", "sd"], ["n"]),
             node("Mul", ["n", "gamma"], ["g"]), node("Add", ["g", "beta"], ["y"])]
    model = save_model(out / "layernorm.onnx", nodes, {"x": [2, 6, 32]}, {"y": [2, 6, 32]}, weights)
    # no_simplify: onnxsim would itself fuse these nodes into one LayerNormalization
    fused, unfused = build_both(model, out, no_simplify=True)
    stats = fusion_stats(fused)
    assert stats["patterns"]["layernorm"] == 1
    assert stats["groups"] == {"fused_layernorm": ["mean", "subtract", "power", "mean", "add", "sqrt", "divide", "multiply", "add"]}
    # two reductions and the elementwise ops between and after them: one TIR kernel
    assert stats_of(fused)["fuse-kernels"]["kernels_after"] == 1
    assert kernels(fused) < kernels(unfused)
    assert_same_numbers(fused, unfused, model)


def attention_model(path: Path) -> Path:
    weights = {"scale": np.float32(4.0)}
    nodes = [node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), node("MatMul", ["q", "kt"], ["s"]),
             node("Div", ["s", "scale"], ["ss"]), node("Add", ["ss", "mask"], ["sm"]),
             node("Softmax", ["sm"], ["p"], axis=-1), node("MatMul", ["p", "v"], ["y"])]
    qkv = [1, 2, 8, 16]
    return save_model(path, nodes, {"q": qkv, "k": qkv, "v": qkv, "mask": [1, 1, 1, 8]}, {"y": qkv}, weights)


def test_attention_with_mask(out: Path) -> None:
    model = attention_model(out / "attention.onnx")
    fused, unfused = build_both(model, out)
    stats = fusion_stats(fused)
    assert stats["patterns"]["attention"] == 1
    assert stats["groups"] == {"fused_attention": ["permute_dims", "matmul", "divide", "add", "nn.softmax", "matmul"]}
    assert stats_of(fused)["fuse-kernels"]["kernels_after"] == 1
    assert kernels(fused) < kernels(unfused)
    assert_same_numbers(fused, unfused, model)


def test_patterns_skip_by_name_and_family(out: Path) -> None:
    model = attention_model(out / "attention_skip.onnx")
    mod = import_onnx(model, shape={}, simplify_model=False, allowed_ops=(), limits=Limits()).mod
    import tvm

    def fuse(skip: list[str]) -> dict[str, Any]:
        ctx = CompileContext(tvm.target.Target({"kind": "llvm"}), "host", options={"skip_fusion": skip})
        return Fusion().run(mod, ctx)[1]

    assert fuse([])["patterns"]["attention"] == 1
    for skip in (["attention"], ["attention", "layernorm"]):  # a pattern name; a family name
        stats = fuse(skip)
        assert stats["patterns"] == {} and "attention" in stats["skipped"] and stats["groups"] == {}
    assert {"attention", "layernorm", "add-layernorm", "conv-bn", "dense-bias-gelu"} <= set(known_pattern_names())
    with pytest.raises(ValueError, match="unknown fusion pattern 'magic'"):
        fuse(["magic"])


# ------------------------------------------------------------------------------- real models

def test_mobilenet_every_conv_bn_pair_folds(mobilenet: Path) -> None:
    """Imported without onnxsim (which would fold them itself), the model keeps its 52 BatchNorms."""
    import tvm

    mod = import_onnx(mobilenet, shape={}, simplify_model=False, allowed_ops=(), limits=Limits()).mod
    ctx = CompileContext(tvm.target.Target({"kind": "llvm"}), "host")
    folded, stats = FoldBatchNorm().run(mod, ctx)
    assert stats["batch_norms"] == 52 and stats["folded"] == 52 and "not_folded" not in stats
    assert "relax.nn.batch_norm" not in str(folded["main"].script(show_meta=False))


def test_mobilenet_fused(mobilenet: Path, out: Path) -> None:
    fused, unfused = build_both(mobilenet, out)
    stats = fusion_stats(fused)
    assert stats["patterns"]["conv2d-bias-act"] == 35  # every conv followed by ReLU6
    assert stats["patterns"]["pool-dense"] == 1
    assert kernels(fused) < kernels(unfused)
    image = np.random.default_rng(3).standard_normal(fused.inputs[0]["shape"]).astype(np.float32)
    assert_same_numbers(fused, unfused, mobilenet, {fused.inputs[0]["name"]: image})


def test_minilm_fused(minilm: Path, out: Path, sentences_inputs: dict[str, np.ndarray]) -> None:
    shape = {name: list(array.shape) for name, array in sentences_inputs.items()}
    fused, unfused = build_both(minilm, out, shape=shape)
    stats = fusion_stats(fused)
    assert stats["patterns"]["attention"] == 6 and stats["patterns"]["dense-bias-gelu"] == 6
    assert stats["patterns"]["add-layernorm"] == 13  # embeddings + 2 per layer
    assert {name.rstrip("0123456789") for name in stats["groups"]} == {"fused_attention", "fused_add_layernorm", "fused_dense_bias_gelu"}
    assert kernels(fused) < kernels(unfused)
    assert stats_of(fused)["fuse-kernels"]["ops_after"] < stats_of(unfused)["fuse-kernels"]["ops_after"]  # kernel calls
    assert_same_numbers(fused, unfused, minilm, sentences_inputs)
