"""Hexagon profiles: HVX code, and the static program run under qemu-hexagon against host and onnxruntime."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_socc
from toolchain import api

pytestmark = pytest.mark.skipif(shutil.which("qemu-hexagon") is None or shutil.which("clang") is None,
                                reason="needs qemu-hexagon and clang (make install)")

STATIC = {"image": [1, 1, 8, 8]}


def _mlp_block(path: Path) -> Path:
    """x[1,64] -> MatMul(64x128) + bias -> Relu -> MatMul(128x64) + bias -> + x (residual) ->
    MatMul(64x32) + bias: a transformer's MLP block and a head, real trained-like scale."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array((rng.standard_normal((64, 128)) / 8).astype(np.float32), "W1"),
        numpy_helper.from_array((rng.standard_normal(128) / 10).astype(np.float32), "B1"),
        numpy_helper.from_array((rng.standard_normal((128, 64)) / 11).astype(np.float32), "W2"),
        numpy_helper.from_array((rng.standard_normal(64) / 10).astype(np.float32), "B2"),
        numpy_helper.from_array((rng.standard_normal((64, 32)) / 8).astype(np.float32), "W3"),
        numpy_helper.from_array((rng.standard_normal(32) / 10).astype(np.float32), "B3"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "B1"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "W2"], ["o"], name="fc2"),
        helper.make_node("Add", ["o", "B2"], ["ob"], name="fc2_bias"),
        helper.make_node("Add", ["ob", "x"], ["r"], name="residual"),
        helper.make_node("MatMul", ["r", "W3"], ["p"], name="head"),
        helper.make_node("Add", ["p", "B3"], ["y"], name="head_bias"),
    ]
    graph = helper.make_graph(nodes, "mlp_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def digits(models_dir: Path) -> dict:
    from examples.models import digits_cnn, digits_data

    model = digits_cnn(models_dir / "digits_cnn_hexagon.onnx")
    x_train, _, x_test, y_test = digits_data()
    calibration = models_dir / "digits_calibration_hexagon.npz"
    np.savez(calibration, image=x_train[:128])
    return {"model": model, "calibration": calibration, "x_test": x_test, "y_test": y_test}


@pytest.fixture(scope="module")
def digits_int8(digits: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, api.Artifact]:
    out = tmp_path_factory.mktemp("hexagon")
    # hexagon requantizes in fixed point and converts convs to NHWC (its profile says so): the host build
    # does the same to compare bits (in NCHW, float layers after the convs may round differently)
    return {target: api.compile(digits["model"], target, out / f"digits.{target}", shape=STATIC, quantize="int8",
                                calibration=digits["calibration"], requantize="integer", layout="NHWC", progress=False)
            for target in ("host", "hexagon-v73")}


def test_int8_cnn_under_qemu_hexagon_is_bit_identical_to_host(digits: dict, digits_int8: dict[str, api.Artifact]) -> None:
    hexagon, host = digits_int8["hexagon-v73"], digits_int8["host"]
    assert hexagon.manifest["quantization"]["layers_by_mode"] == {"int8": 5}
    predictions = []
    for image in digits["x_test"][:24]:
        x = {"image": image[None]}
        expected = host.run(x)["logits"]
        got = hexagon.run(x)["logits"]  # the static program under qemu-hexagon
        np.testing.assert_array_equal(got, expected)
        predictions.append(int(got.argmax()))
    assert np.mean(np.array(predictions) == digits["y_test"][:24]) >= 0.9  # a trained model, really classifying


def test_int8_mlp_block_under_qemu_hexagon_is_bit_identical_to_host(tmp_path: Path) -> None:
    model = _mlp_block(tmp_path / "mlp.onnx")
    rng = np.random.default_rng(0)
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, x=rng.standard_normal((16, 1, 64)).astype(np.float32))
    built = {t: api.compile(model, t, tmp_path / f"mlp.{t}", quantize="int8", calibration=calibration, progress=False,
                            requantize="integer" if t == "host" else None)  # hexagon's profile default
             for t in ("host", "hexagon-v73")}
    float_requantize = api.compile(model, "host", tmp_path / "mlp.float", quantize="int8", calibration=calibration, progress=False)
    quant = built["hexagon-v73"].manifest["quantization"]
    assert quant["integer_requantized"] == 1  # fc1 -> relu -> fc2's input
    assert quant["integer_residual_adds"] == 1  # fc2 + x -> the head's input, x as fc1's input codes
    reference = ort.InferenceSession(str(model))
    for _ in range(6):
        x = {"x": rng.standard_normal((1, 64)).astype(np.float32)}
        np.testing.assert_array_equal(built["hexagon-v73"].run(x)["y"], built["host"].run(x)["y"])
        expected = reference.run(None, x)[0]
        for art in (built["host"], float_requantize):  # the integer residual add is as accurate as the float one
            assert np.abs(art.run(x)["y"] - expected).max() <= 0.05 * np.abs(expected).max()
    code = built["hexagon-v73"].manifest["code"]["kernels"]
    matmuls = {name: k for name, k in code.items() if "matmul" in name}
    assert len(matmuls) == 3
    # both matmuls run on HVX (128 x int8 weights a load, int32 accumulators), fc1 with its integer
    # requantize (32 x int32 multiply-high) and its 8-bit cast
    assert all(k["vector_share"] >= 0.5 for k in matmuls.values()), matmuls
    assert any("requantize" in name and k["vector_share"] >= 0.75 for name, k in matmuls.items()), matmuls


def _pooled_cnn(path: Path) -> Path:
    """x[1,8,6,6] -> Conv 3x3 (64) + bias -> Clip(0, 6) -> GlobalAveragePool -> Flatten -> Gemm(64x10):
    the tail of MobileNetV2 (its last conv, ReLU6, the pool and the classifier)."""
    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array((rng.standard_normal((64, 8, 3, 3)) * 0.2).astype(np.float32), "W"),
        numpy_helper.from_array((rng.standard_normal(64) * 0.1).astype(np.float32), "B"),
        numpy_helper.from_array((rng.standard_normal((64, 10)) * 0.3).astype(np.float32), "G"),
        numpy_helper.from_array((rng.standard_normal(10) * 0.1).astype(np.float32), "GB"),
        numpy_helper.from_array(np.array(0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6, np.float32), "hi"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["r"], name="relu6"),
    ]
    return _with_pooled_classifier(path, "pooled_cnn", nodes, "r", inits, [1, 8, 6, 6])


def _with_pooled_classifier(path: Path, name: str, nodes: list, features: str, inits: list, x_shape: list[int]) -> Path:
    """Saves the graph `nodes` (input x) followed by GlobalAveragePool -> Flatten -> Gemm(G, GB) -> y[1, 10]."""
    nodes = [*nodes, helper.make_node("GlobalAveragePool", [features], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"), helper.make_node("Gemm", ["f", "G", "GB"], ["y"], name="classifier")]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _downsample_block(path: Path) -> Path:
    """x[1,16,8,8] -> Relu -> (Conv 3x3 s2 -> Relu -> Conv 3x3) + Conv 1x1 s2 -> Relu -> a basic block
    (Conv -> Relu -> Conv, + its input) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(32x10):
    ResNet's downsample block (the skip is a conv's output, not an 8-bit tensor), then a block whose
    residual output is pooled (its skip the 8-bit input of its first conv), 32 channels."""
    rng = np.random.default_rng(11)
    inits = [
        numpy_helper.from_array((rng.standard_normal((32, 16, 3, 3)) * 0.15).astype(np.float32), "W1"),
        numpy_helper.from_array((rng.standard_normal(32) * 0.1).astype(np.float32), "B1"),
        numpy_helper.from_array((rng.standard_normal((32, 32, 3, 3)) * 0.1).astype(np.float32), "W2"),
        numpy_helper.from_array((rng.standard_normal(32) * 0.1).astype(np.float32), "B2"),
        numpy_helper.from_array((rng.standard_normal((32, 16, 1, 1)) * 0.3).astype(np.float32), "WS"),
        numpy_helper.from_array((rng.standard_normal(32) * 0.1).astype(np.float32), "BS"),
        numpy_helper.from_array((rng.standard_normal((32, 32, 3, 3)) * 0.1).astype(np.float32), "W3"),
        numpy_helper.from_array((rng.standard_normal(32) * 0.1).astype(np.float32), "B3"),
        numpy_helper.from_array((rng.standard_normal((32, 32, 3, 3)) * 0.1).astype(np.float32), "W4"),
        numpy_helper.from_array((rng.standard_normal(32) * 0.1).astype(np.float32), "B4"),
        numpy_helper.from_array((rng.standard_normal((32, 10)) * 0.3).astype(np.float32), "G"),
        numpy_helper.from_array((rng.standard_normal(10) * 0.1).astype(np.float32), "GB"),
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="input_relu"),
        helper.make_node("Conv", ["a", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Conv", ["a", "WS", "BS"], ["cs"], strides=[2, 2], name="downsample"),
        helper.make_node("Add", ["c2", "cs"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["r"], name="relu2"),
        helper.make_node("Conv", ["r", "W3", "B3"], ["c3"], pads=[1, 1, 1, 1], name="conv3"),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("Conv", ["r3", "W4", "B4"], ["c4"], pads=[1, 1, 1, 1], name="conv4"),
        helper.make_node("Add", ["c4", "r"], ["s2"], name="residual2"),
        helper.make_node("Relu", ["s2"], ["r4"], name="relu4"),
    ]
    return _with_pooled_classifier(path, "downsample_block", nodes, "r4", inits, [1, 16, 8, 8])


def _dense_blocks(path: Path) -> Path:
    """DenseNet in small, x[1,8,8,8]: a stem conv (32), two dense layers (BN -> ReLU -> Conv 1x1 (32)
    -> ReLU -> Conv 3x3 (16), concatenated to what came before: 48, 64 channels), a transition
    (BN -> ReLU -> Conv 1x1 (32) -> AveragePool 2x2), a third dense layer (48), BN -> ReLU, and
    the pooled classifier. The features are float sums of int8 layers' outputs, never quantized
    themselves: each BN + ReLU reads them concatenated."""
    rng = np.random.default_rng(13)
    inits, nodes = [], []

    def conv(name: str, source: str, cin: int, cout: int, kernel: int) -> str:
        scale = 1.0 / np.sqrt(cin * kernel * kernel)
        inits.append(numpy_helper.from_array((rng.standard_normal((cout, cin, kernel, kernel)) * scale).astype(np.float32), f"{name}_w"))
        nodes.append(helper.make_node("Conv", [source, f"{name}_w"], [name], pads=[kernel // 2] * 4, name=name))
        return name

    def bn_relu(name: str, source: str, channels: int) -> str:
        for key, values in {"g": rng.uniform(0.5, 1.5, channels), "b": rng.normal(0, 0.2, channels),
                            "m": rng.normal(0, 0.3, channels), "v": rng.uniform(0.5, 2.0, channels)}.items():
            inits.append(numpy_helper.from_array(values.astype(np.float32), f"{name}_{key}"))
        nodes.append(helper.make_node("BatchNormalization", [source, *(f"{name}_{k}" for k in "gbmv")], [f"{name}_bn"], name=f"{name}_bn"))
        nodes.append(helper.make_node("Relu", [f"{name}_bn"], [f"{name}_relu"], name=f"{name}_relu"))
        return f"{name}_relu"

    def dense_layer(name: str, source: str, channels: int) -> str:
        bottleneck = conv(f"{name}_1x1", bn_relu(name, source, channels), channels, 32, 1)
        nodes.append(helper.make_node("Relu", [bottleneck], [f"{name}_mid"], name=f"{name}_mid"))
        grown = conv(f"{name}_3x3", f"{name}_mid", 32, 16, 3)
        nodes.append(helper.make_node("Concat", [source, grown], [f"{name}_cat"], axis=1, name=f"{name}_cat"))
        return f"{name}_cat"

    features = dense_layer("d2", dense_layer("d1", conv("stem", "x", 8, 32, 3), 32), 48)
    transition = conv("t", bn_relu("t", features, 64), 64, 32, 1)
    nodes.append(helper.make_node("AveragePool", [transition], ["t_pool"], kernel_shape=[2, 2], strides=[2, 2], name="t_pool"))
    features = bn_relu("final", dense_layer("d3", "t_pool", 32), 48)
    inits += [numpy_helper.from_array((rng.standard_normal((48, 10)) * 0.3).astype(np.float32), "G"),
              numpy_helper.from_array((rng.standard_normal(10) * 0.1).astype(np.float32), "GB")]
    return _with_pooled_classifier(path, "dense_blocks", nodes, features, inits, [1, 8, 8, 8])


def _integer_builds(model: Path, tmp_path: Path) -> tuple[dict[str, api.Artifact], api.Artifact, list[int]]:
    """The model in int8 for hexagon-v73 (integer requantize, its profile's default), for the host
    the same way, and for the host with float requantize; and its input shape."""
    shape = [int(d.dim_value) for d in onnx.load(model).graph.input[0].type.tensor_type.shape.dim]
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, x=np.random.default_rng(1).standard_normal((16, *shape)).astype(np.float32))
    built = {t: api.compile(model, t, tmp_path / f"model.{t}", quantize="int8", calibration=calibration, progress=False,
                            requantize="integer" if t == "host" else None, layout="NHWC")
             for t in ("host", "hexagon-v73")}
    float_requantize = api.compile(model, "host", tmp_path / "model.float", quantize="int8", calibration=calibration, progress=False)
    return built, float_requantize, shape


def _assert_bit_identical_and_as_close(model: Path, built: dict[str, api.Artifact], float_requantize: api.Artifact,
                                       shape: list[int], tolerance: float) -> None:
    """hexagon = host bit for bit, and the integer build as close to onnxruntime as the float-requantize
    one (within `tolerance`, about one output step of the pool)."""
    reference = ort.InferenceSession(str(model))
    rng = np.random.default_rng(2)
    for _ in range(4):
        x = {"x": rng.standard_normal(shape).astype(np.float32)}
        np.testing.assert_array_equal(built["hexagon-v73"].run(x)["y"], built["host"].run(x)["y"])
        expected = reference.run(None, x)[0]
        assert np.abs(built["host"].run(x)["y"] - expected).max() <= np.abs(float_requantize.run(x)["y"] - expected).max() + tolerance


@pytest.mark.parametrize("builder", [_pooled_cnn, _downsample_block])
def test_int8_pool_residual_and_classifier_run_in_integer_under_qemu_hexagon(builder, tmp_path: Path) -> None:
    """The conv's ReLU6 epilogue and the global average pool requantize in integer (the pool sums
    per-pixel fixed-point terms: a layer's, or a residual add's two, whose skip may be another
    conv's accumulator), and the classifier's bias goes into its int32 accumulator: no float but
    the logits' one multiply, so every conv and the pool are HVX; hexagon = host bit for bit."""
    model = builder(tmp_path / "model.onnx")
    built, float_requantize, shape = _integer_builds(model, tmp_path)
    quant = built["hexagon-v73"].manifest["quantization"]
    assert quant["integer_mean_pools"] == 1 and quant["integer_output_biases"] == 1
    # the downsample block's add requantizes alone (two accumulators); the second block's add is in the pool
    assert quant["integer_residual_adds"] == (builder is _downsample_block)
    assert quant["integer_requantized"] == (2 if builder is _downsample_block else 0)  # conv1 and conv3, through their ReLUs
    _assert_bit_identical_and_as_close(model, built, float_requantize, shape, 0.03)
    code = built["hexagon-v73"].manifest["code"]["kernels"]
    integer = {name: k for name, k in code.items() if "conv2d" in name or "requantize" in name}
    assert len(integer) >= 2 and all(k["vector_share"] >= 0.5 for k in integer.values()), code


def test_int8_dense_blocks_run_in_integer_under_qemu_hexagon(tmp_path: Path) -> None:
    """DenseNet's BN + ReLU over concatenated features (and over a transition's average pool)
    requantizes from the int32 accumulators, concatenated and window-summed in int32: no float
    kernel is left but the input's quantize and the logits, every conv, matmul and concatenation
    is at least half HVX, and hexagon = host bit for bit."""
    model = _dense_blocks(tmp_path / "model.onnx")
    built, float_requantize, shape = _integer_builds(model, tmp_path)
    quant = built["hexagon-v73"].manifest["quantization"]
    # 4 BN + ReLU (over the stem's output, a concatenation, the transition's over another, over its
    # average pool), 3 bottleneck convs' ReLU (no bias); the last BN + ReLU is the pool's term
    assert quant["integer_requantized"] == 7 and quant["integer_mean_pools"] == 1 and quant["integer_output_biases"] == 1
    _assert_bit_identical_and_as_close(model, built, float_requantize, shape, 0.05)
    code = built["hexagon-v73"].manifest["code"]["kernels"]
    layers = {name: k for name, k in code.items() if "conv2d" in name or "matmul" in name or "concatenate" in name}
    assert sum("concatenate" in name for name in layers) >= 2
    assert all(k["vector_share"] >= 0.5 for k in layers.values()), layers
    vectorize = next(p["stats"] for p in built["hexagon-v73"].manifest["passes"] if p["name"] == "vectorize")
    assert vectorize["scalar_float_blocks"] <= 3, vectorize  # the input's quantize (and its cast), the logits


def test_float_model_under_qemu_hexagon_matches_onnxruntime(digits: dict, tmp_path: Path) -> None:
    # through the CLI with a relative output path (the linker runs in the staging folder)
    result = run_socc("compile", digits["model"], "--target", "hexagon-v73", "--shape", "image=1,1,8,8", "-o", "digits.float",
                      cwd=tmp_path)
    assert result.code == 0, result.stderr
    art = api.load(tmp_path / "digits.float")
    session = ort.InferenceSession(str(digits["model"]))
    for image in digits["x_test"][:4]:
        x = image[None].astype(np.float32)
        expected = session.run(None, {"image": x})[0]
        got = art.run({"image": x})["logits"]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    report = api.verify(art, model=digits["model"])  # socc verify through the same path: random inputs vs onnxruntime
    assert report.ok


def test_artifact_holds_dsp_library_static_program_and_driver(digits_int8: dict[str, api.Artifact]) -> None:
    art = digits_int8["hexagon-v73"]
    files = art.manifest["files"]
    for name in ("model.so", "run_model", "model_driver.c", "model_weights.bin", "hexagon_rt.c", "report.md"):
        assert name in files
    for name in ("model.so", "run_model"):
        header = (art.path / name).read_bytes()[:20]
        assert header[:4] == b"\x7fELF" and header[4] == 1  # 32-bit ELF
        assert int.from_bytes(header[18:20], "little") == 164  # EM_HEXAGON
    driver = (art.path / "model_driver.c").read_text()
    calls = re.findall(r"socc_call\(__tvm_ffi_(\w+),", driver)
    # the planned main's calls: quantize the image (and transpose it to NHWC), 3 convs, max-pool (on
    # uint8), the transpose back to NCHW that the flatten needs, 2 gemms
    assert calls[0].startswith("fused_multiply") and calls[0].endswith("transpose") and calls[3] == "max_pool2d"
    assert calls[5].startswith("fused_transpose") and len(calls) == 8
    arena = re.search(r"static unsigned char socc_arena\d+\[(\d+)\]", driver)
    assert arena and int(arena.group(1)) == art.manifest["memory"]["arena_bytes"]  # one arena, as planned


def test_vector_share_is_reported_per_kernel(digits_int8: dict[str, api.Artifact]) -> None:
    code = digits_int8["hexagon-v73"].manifest["code"]
    assert all(k["wrapper_instructions"] > 0 for k in code["kernels"].values())  # each body found with its entry point
    convs = [k for name, k in code["kernels"].items() if name.startswith("fused_conv2d")]
    assert len(convs) == 3 and all(k["vector_instructions"] > 0 for k in convs)  # every int8 conv has HVX code
    # every int8 conv and matmul is at least half HVX; the 10-way classifier too (it was 0%: 10 columns
    # are narrower than a 32 x int32 vector, so its weight gets zero columns up to 32)
    layers = {name: k for name, k in code["kernels"].items() if name.startswith(("fused_conv2d", "fused_matmul"))}
    assert len(layers) == 5 and all(k["vector_share"] >= 0.5 for k in layers.values()), layers
    assert digits_int8["hexagon-v73"].manifest["quantization"]["padded_matmul_columns"] == 32 - 10
    result = run_socc("inspect", digits_int8["hexagon-v73"].path)
    assert result.code == 0
    assert re.search(r"^kernel\s+fused_conv2d\S*\s+\d+ instr\s+\d+\.\d% vector", result.stdout, re.M)


def test_dynamic_shapes_are_refused_naming_the_dims(digits: dict, tmp_path: Path) -> None:
    result = run_socc("compile", digits["model"], "--target", "hexagon-v73", "-o", tmp_path / "out")
    assert result.code == 2
    assert "image[0]=batch" in result.stderr and "--shape" in result.stderr
    assert not (tmp_path / "out").exists()


def test_float_transformer_under_qemu_hexagon_matches_onnxruntime(minilm: Path, tmp_path: Path) -> None:
    """all-MiniLM-L6-v2, real weights: softmax, erf-GELU, layer norm run on our C runtime's float math."""
    from examples.models import minilm_tokenize

    art = api.compile(minilm, "hexagon-v73", tmp_path / "minilm.hexagon", progress=False,
                      shape={"input_ids": [1, 8], "attention_mask": [1, 8]})
    inputs = minilm_tokenize(["A man is playing a guitar."], 8)
    report = api.verify(art, model=minilm, inputs=inputs)
    assert report.ok, report.table()
    assert max(o.max_rel for o in report.outputs) < 1e-5


RUNTIME_PROBE = r"""
#include <stdint.h>
#include <stddef.h>
int socc_read_file(const char* path, void* dst, size_t size);
int socc_write_file(const char* path, const void* src, size_t size);
float __hexagon_divsf3(float a, float b);
float expf(float), sqrtf(float), erff(float), tanhf(float), logf(float), nearbyintf(float);
int64_t __hexagon_divdi3(int64_t, int64_t);
int64_t __hexagon_moddi3(int64_t, int64_t);
enum { N = 4096 };
static float a[N], b[N], out[7 * N];
static int64_t ia[N], ib[N], iout[2 * N];
int socc_main(int argc, char** argv) {
  if (socc_read_file(argv[1], a, sizeof a) || socc_read_file(argv[2], b, sizeof b)) return 2;
  if (socc_read_file(argv[3], ia, sizeof ia) || socc_read_file(argv[4], ib, sizeof ib)) return 2;
  for (int i = 0; i < N; ++i) {
    out[i] = __hexagon_divsf3(a[i], b[i]);
    out[N + i] = expf(b[i]);
    out[2 * N + i] = sqrtf(a[i] < 0 ? -a[i] : a[i]);
    out[3 * N + i] = erff(b[i]);
    out[4 * N + i] = tanhf(b[i]);
    out[5 * N + i] = logf(a[i] < 0 ? -a[i] : a[i]);
    out[6 * N + i] = nearbyintf(b[i] * 8.0f);
    iout[i] = __hexagon_divdi3(ia[i], ib[i]);
    iout[N + i] = __hexagon_moddi3(ia[i], ib[i]);
  }
  return socc_write_file(argv[5], out, sizeof out) || socc_write_file(argv[6], iout, sizeof iout);
}
"""


def test_c_runtime_math_under_qemu_hexagon(tmp_path: Path) -> None:
    """The freestanding runtime's division is exactly rounded; its expf/sqrtf/erff/tanhf/logf are within a few ulps."""
    import math
    import subprocess

    from toolchain.freestanding import RUNTIME_SOURCE, _ffi_include_dir
    from toolchain.targets import load_profile

    profile = load_profile("hexagon-v73")
    (tmp_path / "probe.c").write_text(RUNTIME_PROBE)
    for source in ("probe.c", str(RUNTIME_SOURCE)):
        subprocess.run([*profile.cc, f"-I{_ffi_include_dir()}", "-c", source, "-o", tmp_path / (Path(source).stem + ".o")],
                       cwd=tmp_path, check=True)
    subprocess.run([*profile.ld, "-static", "-o", "probe", "probe.o", "hexagon_rt.o"], cwd=tmp_path, check=True)
    rng = np.random.default_rng(0)
    n = 4096
    a = (rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    b = (rng.standard_normal(n) * 4).astype(np.float32)
    b[:8] = [0.5, -0.5, 1e-30, 88.0, -100.0, 0.03125, 2.5 / 8, 3.5 / 8]  # halves for nearbyint, tiny and huge exp
    ia = rng.integers(-(2 ** 62), 2 ** 62, n)
    ib = rng.integers(-(2 ** 31), 2 ** 31, n)
    ib[ib == 0] = 7
    for name, array in (("a", a), ("b", b), ("ia", ia), ("ib", ib)):
        (tmp_path / f"{name}.bin").write_bytes(array.tobytes())
    subprocess.run([*profile.emulator, "./probe", "a.bin", "b.bin", "ia.bin", "ib.bin", "out.bin", "iout.bin"],
                   cwd=tmp_path, check=True)
    out = np.fromfile(tmp_path / "out.bin", dtype=np.float32).reshape(7, n)
    iout = np.fromfile(tmp_path / "iout.bin", dtype=np.int64).reshape(2, n)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(out[0], a / b)  # IEEE division, round half to even, subnormals included

        def ulps(got: np.ndarray, exact: np.ndarray) -> float:
            exact32 = exact.astype(np.float32)
            finite = np.isfinite(exact32) & (exact32 != 0)
            return float(np.max(np.abs(got[finite] - exact32[finite]) / np.spacing(np.abs(exact32[finite]))))

        b64, a64 = b.astype(np.float64), np.abs(a.astype(np.float64))
        assert ulps(out[1], np.exp(b64)) <= 4
        assert ulps(out[2], np.sqrt(a64)) <= 1
        assert ulps(out[3][np.abs(b) > 1e-3], np.array([math.erf(v) for v in b64[np.abs(b) > 1e-3]])) <= 8
        assert ulps(out[4], np.tanh(b64)) <= 8
        assert ulps(out[5][a64 != 1], np.log(a64[a64 != 1])) <= 4
    np.testing.assert_array_equal(out[6], np.rint(b * np.float32(8)))
    quotients = [(abs(int(x)) // abs(int(y))) * (1 if (x < 0) == (y < 0) else -1) for x, y in zip(ia, ib)]  # C: toward zero
    np.testing.assert_array_equal(iout[0], quotients)
    np.testing.assert_array_equal(iout[1], [int(x) - q * int(y) for x, y, q in zip(ia, ib, quotients)])


def test_hexagon_rebuild_is_byte_identical(digits: dict, digits_int8: dict[str, api.Artifact], tmp_path: Path) -> None:
    art = digits_int8["hexagon-v73"]
    again = api.rebuild(art, model=digits["model"], output=tmp_path / "again", progress=False)
    assert again.manifest["files"] == art.manifest["files"]  # model.so, run_model, driver, weights: same SHA-256
