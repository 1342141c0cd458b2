"""Register-tiled matmuls and NHWC convolutions (passes/gemm.py) and the fast exp/erf/softmax
(passes/fast_math.py), built with LLVM for this machine and checked against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from toolchain.passes.vectorize import schedule_kernel


def _host_features() -> frozenset[str]:
    from toolchain.targets import load_profile

    return frozenset(load_profile("host").llvm_features())


def _run(func, arrays: list[np.ndarray], relayout: dict) -> np.ndarray:
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}))
    tensors = [tvm.runtime.tensor(relayout[i].apply(a) if i in relayout else a) for i, a in enumerate(arrays)]
    lib["main"](*tensors)
    return tensors[-1].numpy()


def _matmul(m: int, k: int, n: int, a_dtype: str, b_dtype: str, out_dtype: str):
    """C = A @ W followed by a per-column scale (an epilogue the tile runs in registers)."""
    from tvm import te

    a = te.placeholder((m, k), a_dtype, name="a")
    w = te.placeholder((k, n), b_dtype, name="w")
    scale = te.placeholder((n,), out_dtype if out_dtype.startswith("float") else "float32", name="scale")
    r = te.reduce_axis((0, k), name="k")
    acc = te.compute((m, n), lambda i, j: te.sum(a[i, r].astype(out_dtype) * w[r, j].astype(out_dtype), axis=r), name="matmul")
    out = te.compute((m, n), lambda i, j: acc[i, j].astype("float32") * scale[j], name="T_multiply")
    return te.create_prim_func([a, w, scale, out])


@pytest.mark.parametrize("m,k,n", [(128, 384, 384), (6, 64, 48), (1, 640, 1000)])
def test_int8_matmul_tiles_give_exact_integers(m: int, k: int, n: int) -> None:
    features = _host_features()
    scheduled, stats, relayout = schedule_kernel(_matmul(m, k, n, "uint8", "int8", "int32"), 256, True, frozenset({1}), parallel=True,
                                                 features=features)
    assert stats["gemm_kernels"] == 1
    # the VNNI dot product where the CPU has it and the shape allows (n a multiple of 16, k of 4)
    assert stats["dot_product_kernels"] == int("avx512vnni" in features and n % 16 == 0 and k % 4 == 0)
    rng = np.random.default_rng(m)
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-127, 128, (k, n), dtype=np.int8)
    scale = np.ones(n, np.float32)
    got = _run(scheduled, [a, w, scale, np.zeros((m, n), np.float32)], relayout)
    expected = (a.astype(np.int64) @ w.astype(np.int64)).astype(np.float32)
    np.testing.assert_array_equal(got, expected)


def test_float_matmul_tiles_match_numpy() -> None:
    scheduled, stats, relayout = schedule_kernel(_matmul(64, 96, 80, "float32", "float32", "float32"), 256, True, frozenset({1}), parallel=True)
    assert stats["gemm_kernels"] == 1 and relayout[1].permutation == (1, 0, 2)
    rng = np.random.default_rng(1)
    a, w = rng.standard_normal((64, 96)).astype(np.float32), rng.standard_normal((96, 80)).astype(np.float32)
    scale = rng.standard_normal(80).astype(np.float32)
    got = _run(scheduled, [a, w, scale, np.zeros((64, 80), np.float32)], relayout)
    np.testing.assert_allclose(got, (a @ w) * scale, rtol=1e-5, atol=1e-4)


def _conv_nhwc(size: int, channels: int, filters: int, kernel: int, stride: int, dtype: str, acc_dtype: str):
    from tvm import te, topi

    data = te.placeholder((1, size, size, channels), dtype, name="data")
    weight = te.placeholder((kernel, kernel, channels, filters), "int8" if dtype == "uint8" else dtype, name="weight")
    out = topi.nn.conv2d_nhwc(data, weight, stride, kernel // 2, 1, out_dtype=acc_dtype)
    return te.create_prim_func([data, weight, out])


@pytest.mark.parametrize("dtype,acc", [("uint8", "int32"), ("float32", "float32")])
@pytest.mark.parametrize("kernel,stride", [(3, 1), (1, 1), (3, 2)])
def test_nhwc_conv_tiles_match_numpy(dtype: str, acc: str, kernel: int, stride: int) -> None:
    features = _host_features()
    scheduled, stats, relayout = schedule_kernel(_conv_nhwc(12, 32, 48, kernel, stride, dtype, acc), 256, True, frozenset({1}),
                                                 parallel=True, features=features)
    assert stats["gemm_kernels"] == 1
    assert stats["dot_product_kernels"] == int(dtype == "uint8" and "avx512vnni" in features)
    rng = np.random.default_rng(kernel * 10 + stride)
    if dtype == "uint8":
        x = rng.integers(0, 256, (1, 12, 12, 32), dtype=np.uint8)
        w = rng.integers(-127, 128, (kernel, kernel, 32, 48), dtype=np.int8)
    else:
        x = rng.standard_normal((1, 12, 12, 32)).astype(np.float32)
        w = rng.standard_normal((kernel, kernel, 32, 48)).astype(np.float32)
    pad = kernel // 2
    xp = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out_size = (12 + 2 * pad - kernel) // stride + 1
    expected = np.zeros((1, out_size, out_size, 48))
    for ry in range(kernel):
        for rx in range(kernel):
            window = xp[:, ry: ry + stride * out_size: stride, rx: rx + stride * out_size: stride, :]
            expected += window @ w[ry, rx].astype(np.float64)
    got = _run(scheduled, [x, w, np.zeros((1, out_size, out_size, 48), acc)], relayout)
    if dtype == "uint8":
        np.testing.assert_array_equal(got, expected.astype(np.int32))
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def _depthwise_nhwc(size: int, channels: int, stride: int, dtype: str, acc_dtype: str):
    """A 3x3 depthwise conv (TOPI's group conv, as Relax legalizes one) and a per-channel scale after it."""
    from tvm import te, topi

    data = te.placeholder((1, size, size, channels), dtype, name="data")
    weight = te.placeholder((3, 3, 1, channels), "int8" if dtype == "uint8" else dtype, name="weight")
    scale = te.placeholder((channels,), "float32", name="scale")
    acc = topi.nn.group_conv2d_nhwc(data, weight, stride, 1, 1, channels, out_dtype=acc_dtype)
    out = te.compute(acc.shape, lambda n, y, x, f: acc[n, y, x, f].astype("float32") * scale[f], name="T_multiply")
    return te.create_prim_func([data, weight, scale, out])


@pytest.mark.parametrize("dtype,acc", [("uint8", "int32"), ("float32", "float32")])
@pytest.mark.parametrize("channels,stride", [(48, 1), (72, 2), (24, 1)])
def test_depthwise_conv_tiles_match_numpy(dtype: str, acc: str, channels: int, stride: int) -> None:
    # 512-bit vectors: 72 and 24 channels are no whole number of 16-lane vectors and take 8 lanes
    scheduled, stats, _ = schedule_kernel(_depthwise_nhwc(16, channels, stride, dtype, acc), 512, True, parallel=True,
                                          features=_host_features())
    assert stats["depthwise_kernels"] == 1
    rng = np.random.default_rng(channels + stride)
    if dtype == "uint8":
        x = rng.integers(0, 256, (1, 16, 16, channels), dtype=np.uint8)
        w = rng.integers(-127, 128, (3, 3, 1, channels), dtype=np.int8)
    else:
        x = rng.standard_normal((1, 16, 16, channels)).astype(np.float32)
        w = rng.standard_normal((3, 3, 1, channels)).astype(np.float32)
    scale = np.ones(channels, np.float32) if dtype == "uint8" else rng.standard_normal(channels).astype(np.float32)
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    out_size = (16 + 2 - 3) // stride + 1
    expected = np.zeros((1, out_size, out_size, channels))
    for ry in range(3):
        for rx in range(3):
            expected += xp[:, ry: ry + stride * out_size: stride, rx: rx + stride * out_size: stride, :] * w[ry, rx, 0].astype(np.float64)
    got = _run(scheduled, [x, w, scale, np.zeros((1, out_size, out_size, channels), np.float32)], {})
    if dtype == "uint8":
        np.testing.assert_array_equal(got, expected.astype(np.float32))  # integer sums, exact
    else:
        np.testing.assert_allclose(got, expected * scale, rtol=1e-4, atol=1e-4)


def test_depthwise_tiles_take_pixels_before_channel_vectors() -> None:
    """A depthwise tap's weight vectors serve the tile's pixels: its tile is as many pixels as fit
    (MobileNetV2's 24-wide, 96-channel layer: 12 x 1 vectors), where a matmul's is as many columns."""
    from toolchain.passes.gemm import tile_shape

    accumulators = 15  # under TVM's 1 KiB stack limit at 64 bytes each
    assert tile_shape(24, 6, 32, accumulators, more_rows=True) == (12, 1)
    assert tile_shape(24, 6, 32, accumulators) == (2, 6)
    assert tile_shape(3, 30, 32, accumulators, more_rows=True) == (3, 5)  # no more pixels: more vectors
    rows, vectors = tile_shape(48, 3, 32, accumulators, more_rows=True)
    assert rows * vectors <= accumulators and 48 % rows == 0 and rows == 12


def _elementwise_kernel(function, n: int):
    from tvm import te

    x = te.placeholder((n,), "float32", name="x")
    return te.create_prim_func([x, te.compute((n,), lambda i: function(x[i]), name="y")])


def test_fast_exp_and_erf_are_accurate_over_their_range() -> None:
    import math

    from toolchain.passes.fast_math import fast_erf, fast_exp

    x = np.linspace(-87.0, 88.0, 200_001, dtype=np.float32)
    got = _run(_elementwise_kernel(fast_exp, x.size), [x, np.zeros_like(x)], {})
    relative = np.abs(got.astype(np.float64) - np.exp(x.astype(np.float64))) / np.exp(x.astype(np.float64))
    assert relative.max() < 5e-7, relative.max()  # a few float32 ulps (libm: 1)
    low = _run(_elementwise_kernel(fast_exp, 4), [np.array([-1e30, -100.0, np.float32(-3.4e38), 0.0], np.float32), np.zeros(4, np.float32)], {})
    # masked attention scores: exactly zero, never a tiny float whose products are denormals (slow on Intel)
    assert np.all(low[:3] == 0.0) and low[3] == 1.0
    z = np.linspace(-6.0, 6.0, 100_001, dtype=np.float32)
    got = _run(_elementwise_kernel(fast_erf, z.size), [z, np.zeros_like(z)], {})
    assert np.abs(got.astype(np.float64) - np.array([math.erf(v) for v in z.astype(np.float64)])).max() < 5e-7  # A&S 1.5e-7 + float32 rounding


def test_models_with_softmax_and_gelu_take_the_fast_math_and_still_match_onnxruntime(tmp_path) -> None:
    import toolchain
    from examples import models

    model = models.minilm(tmp_path / "minilm.onnx", seq_len=16)
    art = toolchain.compile(model, "host", tmp_path / "out", shape={"input_ids": [1, 16], "attention_mask": [1, 16]}, progress=False,
                            isolate=False)
    legalize = next(p for p in art.manifest["passes"] if p["name"] == "legalize")
    # the 6 layers share one attention and one GELU function: their softmax and erf, legalized once each
    assert legalize["stats"]["fast_math"] == {"relax.erf": 1, "relax.nn.softmax": 1}, legalize["stats"]
    ids = np.random.default_rng(0).integers(0, 30000, (1, 16)).astype(np.int64)
    report = toolchain.verify(art, inputs={"input_ids": ids, "attention_mask": np.ones((1, 16), np.int64)})
    assert report.ok and max(o.max_rel for o in report.outputs) <= 1e-4, report.table()
    exact = toolchain.compile(model, "host", tmp_path / "exact", shape={"input_ids": [1, 16], "attention_mask": [1, 16]}, progress=False,
                              isolate=False, exact_math=True)
    assert next(p for p in exact.manifest["passes"] if p["name"] == "legalize")["stats"]["fast_math_ops"] == 0
