"""The winograd pass: which convs it rewrites, and that they still match onnxruntime (host, and arm-cpu under qemu)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import toolchain
from toolchain.passes.winograd import TRANSFORMS, transformed_weight


def _residual_block(path: Path, size: int) -> Path:
    """x [1, 16, size, size] -> Conv3x3 16->32 + bias -> Relu -> Conv3x3 32->32 + bias -> + first Relu
    -> Relu -> Conv3x3 stride 2 32->16 -> y."""
    rng = np.random.default_rng(size)
    weights = [numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)
               for name, shape in (("w0", (32, 16, 3, 3)), ("w1", (32, 32, 3, 3)), ("w2", (16, 32, 3, 3)))]
    weights += [numpy_helper.from_array((rng.standard_normal(32) / 10).astype(np.float32), name) for name in ("b0", "b1")]
    node = helper.make_node
    nodes = [node("Conv", ["x", "w0", "b0"], ["c0"], name="conv_0", pads=[1, 1, 1, 1]),
             node("Relu", ["c0"], ["r0"], name="relu_0"),
             node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv_1", pads=[1, 1, 1, 1]),
             node("Add", ["c1", "r0"], ["sum"], name="add_0"),
             node("Relu", ["sum"], ["r1"], name="relu_1"),
             node("Conv", ["r1", "w2"], ["y"], name="conv_down", pads=[1, 1, 1, 1], strides=[2, 2])]
    out = (size + 1) // 2
    graph = helper.make_graph(nodes, "residual_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, out, out])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def _stats(art: toolchain.Artifact) -> dict:
    return next(p for p in art.manifest["passes"] if p["name"] == "winograd")["stats"]


@pytest.mark.parametrize("m", [2, 4])
def test_each_transform_gives_the_direct_convolution_of_a_tile(m: int) -> None:
    """A^T [(G g G^T) * (B^T d B)] A of one (m+2) x (m+2) tile is the m x m 'valid' correlation of d with g."""
    transform = TRANSFORMS[m]
    rng = np.random.default_rng(m)
    g = rng.standard_normal((3, 3, 1, 1))
    d = rng.standard_normal((m + 2, m + 2))
    u = transformed_weight(g, transform).reshape(m + 2, m + 2).astype(np.float64)
    y = transform.a_t @ (u * (transform.b_t @ d @ transform.b_t.T)) @ transform.a_t.T
    direct = np.array([[np.sum(d[r:r + 3, s:s + 3] * g[:, :, 0, 0]) for s in range(m)] for r in range(m)])
    np.testing.assert_allclose(y, direct, rtol=1e-5, atol=1e-5)  # U is stored in float32


@pytest.mark.parametrize(("size", "m"), [(24, 4), (11, 4), (6, 2), (3, 0)])
def test_stride_one_3x3_convs_get_the_cheaper_transform_and_match_onnxruntime(tmp_path: Path, size: int, m: int) -> None:
    model = _residual_block(tmp_path / "block.onnx", size)
    art = toolchain.compile(model, "host", tmp_path / "out", progress=False, isolate=False)
    stats = _stats(art)
    # 24x24 and 11x11 (cropped 4x4 tiles): F(4x4) does 4x fewer multiply-adds (its weight, 4x larger,
    # is paid back); 6x6: F(2x2), as F(4x4)'s 4 tiles of 6x6 would waste 56% of their work; 3x3: the
    # direct conv, as F(2x2) on its 4 cropped tiles costs more in weight bytes than it saves
    assert stats["transforms"] == ({f"F{m}x{m}": 2} if m else {}), stats
    assert stats["kept"].get("stride_dilation_groups") == 1, stats  # the stride-2 conv stays direct
    assert stats["kept"].get("not_faster", 0) == (0 if m else 2), stats
    if m:
        tiles = -(-size // m)
        assert stats["multiply_adds_after"] / stats["multiply_adds_before"] == pytest.approx((m + 2) ** 2 * tiles * tiles / (9 * size * size))
        assert stats["weight_bytes_after"] / stats["weight_bytes_before"] == pytest.approx((m + 2) ** 2 / 9)
    image = np.random.default_rng(1).standard_normal((1, 16, size, size)).astype(np.float32)
    report = toolchain.verify(art, inputs={"x": image})
    assert report.ok and max(o.max_rel for o in report.outputs) <= 1e-5, report.table()


def test_skipping_the_pass_keeps_direct_convs_with_the_same_outputs(tmp_path: Path) -> None:
    model = _residual_block(tmp_path / "block.onnx", 12)
    image = np.random.default_rng(2).standard_normal((1, 16, 12, 12)).astype(np.float32)
    fast = toolchain.compile(model, "host", tmp_path / "fast", progress=False, isolate=False)
    direct = toolchain.compile(model, "host", tmp_path / "direct", progress=False, isolate=False, skip_pass=["winograd"])
    assert not any(p["name"] == "winograd" for p in direct.manifest["passes"])
    a, b = fast.run({"x": image})["y"], direct.run({"x": image})["y"]
    # the same convolution, summed in another order: rounding apart, not equal bit for bit
    assert not np.array_equal(a, b) and np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_rewritten_convs_match_onnxruntime_on_arm_under_qemu(tmp_path: Path) -> None:
    model = _residual_block(tmp_path / "block.onnx", 12)
    art = toolchain.compile(model, "arm-cpu", tmp_path / "arm", progress=False)
    assert _stats(art)["transforms"] == {"F4x4": 2}
    image = np.random.default_rng(3).standard_normal((1, 16, 12, 12)).astype(np.float32)
    report = toolchain.verify(art, inputs={"x": image})
    assert report.ok and max(o.max_rel for o in report.outputs) <= 1e-5, report.table()
