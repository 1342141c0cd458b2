"""The vectorize pass's schedules, built and run for real (host LLVM; Hexagon disassembled)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from toolchain.passes.vectorize import schedule_kernel


def _per_channel_add(channels: int, pixels: int = 12):
    """out[n, h, w, c] = acc[n, h, w, c] + bias[c]: an NHWC requantize stage's shape."""
    from tvm import te

    acc = te.placeholder((1, pixels, pixels, channels), "int32", name="acc")
    bias = te.placeholder((channels,), "int32", name="bias")
    out = te.compute(acc.shape, lambda n, h, w, c: acc[n, h, w, c] + bias[c], name="requantize_sum")
    return te.create_prim_func([acc, bias, out])


@pytest.mark.parametrize("channels", [16, 48])
def test_per_channel_block_with_few_channels_vectorizes_over_pixels_and_channels(channels: int) -> None:
    import tvm

    scheduled, stats, _ = schedule_kernel(_per_channel_add(channels), vector_bits=1024, vector_float=False)
    # 16 or 48 int32 channels are no whole 32-lane vector: (w, c) fused, split at lcm(C, 32)
    assert stats["fused_row_blocks"] == 1 and stats["rows_left_scalar"] == 0
    assert re.search(r"T\.vectorized\(T\.int64\(32\)\)|T\.vectorized\(32\)", scheduled.script())
    lib = tvm.compile(tvm.IRModule({"main": scheduled}), target="llvm")
    rng = np.random.default_rng(channels)
    acc = rng.integers(-1000, 1000, (1, 12, 12, channels), dtype=np.int32)
    bias = rng.integers(-50, 50, channels, dtype=np.int32)
    out = tvm.runtime.tensor(np.zeros_like(acc))
    lib["main"](tvm.runtime.tensor(acc), tvm.runtime.tensor(bias), out)
    np.testing.assert_array_equal(out.numpy(), acc + bias)


def test_per_channel_block_on_hvx_loads_whole_vectors() -> None:
    import tvm

    scheduled, _, _ = schedule_kernel(_per_channel_add(16), vector_bits=1024, vector_float=False)
    target = tvm.target.Target({"kind": "llvm", "mtriple": "hexagon", "mcpu": "hexagonv73", "mattr": ["+hvxv73", "+hvx-length128b"]})
    asm = tvm.compile(tvm.IRModule({"main": scheduled}), target=target).mod.inspect_source("asm")
    body = asm[asm.index("main_compute_:"):]
    body = body[: body.index(".Lfunc_end")]
    # the loop adds whole vectors; the 16-channel bias vector is built once, outside it (measured: 15
    # inserts, 8 scalar loads; lane-by-lane gathers would be 16 of each per vector, 72 vectors)
    assert len(re.findall(r"\.w = vadd\(", body)) >= 4
    assert len(re.findall(r"vinsert", body)) <= 16 and len(re.findall(r"= mem[wd]\(", body)) <= 16


def _gemv(k: int, n: int):
    """y[0, j] = sum_i x[0, i] * w[i, j] in int32, uint8 x int8: a classifier's int8 accumulation."""
    from tvm import te

    x = te.placeholder((1, k), "uint8", name="x")
    w = te.placeholder((k, n), "int8", name="w")
    i = te.reduce_axis((0, k), name="i")
    y = te.compute((1, n), lambda r, j: te.sum(x[r, i].astype("int32") * w[i, j].astype("int32"), axis=i), name="matmul")
    return te.create_prim_func([x, w, y])


def test_extent_no_vector_divides_gets_whole_vectors_and_a_scalar_tail() -> None:
    import tvm

    # 1000 columns (ImageNet's classifier) divide by no vector width down to 16 lanes: 31 vectors of
    # 32 x int32 and 8 scalar columns, for the update and for the init
    scheduled, stats, _ = schedule_kernel(_gemv(64, 1000), vector_bits=1024, vector_float=False)
    assert stats["tails_peeled"] == 2 and stats["vectorized_loops"] == 1
    script = scheduled.script()
    assert re.search(r"T\.vectorized\(32\)", script) and re.search(r"T\.grid\(31, 64\)", script)
    lib = tvm.compile(tvm.IRModule({"main": scheduled}), target="llvm")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1, 64), dtype=np.uint8)
    w = rng.integers(-128, 128, (64, 1000), dtype=np.int8)
    y = tvm.runtime.tensor(np.zeros((1, 1000), np.int32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), y)
    np.testing.assert_array_equal(y.numpy(), x.astype(np.int32) @ w.astype(np.int32))


def test_per_channel_block_with_a_channel_tail_is_exact() -> None:
    import tvm

    # 80 channels on a 3x3 map: neither 80 nor the 720-element run splits into whole 32-lane
    # vectors at a period of 80; two vectors per pixel and a 16-channel tail, on half a vector
    # (no int64 product in this stage; a multiply-high stage's tail stays scalar)
    scheduled, stats, _ = schedule_kernel(_per_channel_add(80, pixels=3), vector_bits=1024, vector_float=False)
    assert stats["tails_peeled"] == 1 and stats["rows_left_scalar"] == 0
    assert re.search(r"T\.vectorized\(32\)", scheduled.script()) and re.search(r"T\.vectorized\(64, 80\)", scheduled.script())
    lib = tvm.compile(tvm.IRModule({"main": scheduled}), target="llvm")
    rng = np.random.default_rng(80)
    acc = rng.integers(-1000, 1000, (1, 3, 3, 80), dtype=np.int32)
    bias = rng.integers(-50, 50, 80, dtype=np.int32)
    out = tvm.runtime.tensor(np.zeros_like(acc))
    lib["main"](tvm.runtime.tensor(acc), tvm.runtime.tensor(bias), out)
    np.testing.assert_array_equal(out.numpy(), acc + bias)


def _bn_relu_conv1x1(channels: int = 48, filters: int = 64, size: int = 40):
    """A DenseNet layer's tail: relu(x * a + b) per channel, then a 1x1 conv (NHWC, HWIO weights)."""
    from tvm import te, topi

    x = te.placeholder((1, size, size, channels), "float32", name="x")
    scale = te.placeholder((channels,), "float32", name="scale")
    shift = te.placeholder((channels,), "float32", name="shift")
    weight = te.placeholder((1, 1, channels, filters), "float32", name="weight")
    act = te.compute(x.shape, lambda n, h, w, c: te.max(x[n, h, w, c] * scale[c] + shift[c], 0.0), name="bn_relu")
    out = topi.nn.conv2d_nhwc(act, weight, 1, 0, 1)
    return te.create_prim_func([x, scale, shift, weight, out])


def test_copy_of_a_once_read_operand_is_inlined_and_big_passes_run_in_parallel() -> None:
    import tvm

    from toolchain.passes.vectorize import PARALLEL_MIN_WORK, _operand_producers

    func = _bn_relu_conv1x1()
    scheduled, stats, relayout = schedule_kernel(func, vector_bits=256, vector_float=True, constant_params=frozenset({3}), parallel=True)
    assert stats["gemm_kernels"] == 1
    # the 64 filters are one column tile and the window is 1x1: each activation is read once, so the
    # conv's copy of its input (`pad_temp`, no padding) is gone; the BatchNorm + ReLU stays a pass
    # (the tiles read a plain tensor), on the thread pool: 40 x 40 x 48 elements
    script = scheduled.script()
    assert "pad_temp" not in script and 'sblock("bn_relu")' in script
    assert stats["parallel_loops"] == 2 and script.count("T.parallel(") == 2
    lib = tvm.compile(tvm.IRModule({"main": scheduled}), target="llvm")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 40, 40, 48)).astype(np.float32)
    scale, shift = rng.standard_normal(48).astype(np.float32), rng.standard_normal(48).astype(np.float32)
    weight = rng.standard_normal((1, 1, 48, 64)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((1, 40, 40, 64), np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, scale, shift, relayout[3].apply(weight) if 3 in relayout else weight)], out)
    expected = np.maximum(x * scale + shift, 0).reshape(-1, 48) @ weight.reshape(48, 64)
    np.testing.assert_allclose(out.numpy().reshape(-1, 64), expected, rtol=1e-4, atol=1e-4)

    # a 3x3 window reads each activation 9 times: the producer stays a pass of its own, on the thread pool
    from tvm import s_tir, te, topi

    act = te.placeholder((1, 32, 32, 64), "float32", name="act")
    w3 = te.placeholder((3, 3, 64, 16), "float32", name="w3")
    conv = te.create_prim_func([act, w3, topi.nn.conv2d_nhwc(act, w3, 1, 1, 1)])
    sch = s_tir.Schedule(conv)
    assert _operand_producers(sch, ["conv2d_nhwc"], frozenset({1}), 256) == {"pad_temp"}
    scheduled, stats, _ = schedule_kernel(conv, vector_bits=256, vector_float=True, constant_params=frozenset({1}), parallel=True)
    assert 34 * 34 * 64 >= PARALLEL_MIN_WORK and stats["parallel_loops"] == 2  # the pad pass and the tiles


def test_float_chain_with_multiplies_is_one_pass_over_memory() -> None:
    """A pre-activation BatchNorm + ReLU + quantize as Relax legalizes it, one stage per op: two float
    multiplies among them (an int8 build fences `x * scale` from the add at the graph level, so
    vectorize needs no block boundary for it). All stages inline into the uint8 store: one parallel
    loop, no intermediate tensor (kept apart, each multiply was a whole pass of its own: DenseNet's
    32x32x80 features took 0.0114 ms, one pass 0.0065)."""
    import tvm
    from tvm import te

    shape = (1, 32, 32, 80)
    x = te.placeholder(shape, "float32", name="x")
    scale = te.placeholder((80,), "float32", name="scale")
    shift = te.placeholder((80,), "float32", name="shift")
    product = te.compute(shape, lambda n, h, w, c: x[n, h, w, c] * scale[c], name="T_multiply")
    fenced = te.compute(shape, lambda *i: te.max(product(*i), tvm.tirx.const(-3.4028234663852886e38, "float32")), name="T_maximum")
    relu = te.compute(shape, lambda n, h, w, c: te.max(fenced[n, h, w, c] + shift[c], 0.0), name="T_relu")
    step = te.compute(shape, lambda *i: relu(*i) * tvm.tirx.const(47.5, "float32"), name="T_multiply1")
    out = te.compute(shape, lambda *i: te.max(te.min(tvm.tirx.nearbyint(step(*i)), 255.0), 0.0).astype("uint8"), name="quantize")
    func = te.create_prim_func([x, scale, shift, out])
    scheduled, stats, _ = schedule_kernel(func, vector_bits=512, vector_float=True, parallel=True)
    script = scheduled.script()
    assert stats["inlined"] == 4 and "alloc_buffer" not in script and script.count("T.parallel(") == 1, script
    lib = tvm.compile(tvm.IRModule({"main": scheduled}), target="llvm")
    rng = np.random.default_rng(5)
    xs, ss, bs = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(80).astype(np.float32), rng.standard_normal(80).astype(np.float32)
    got = tvm.runtime.tensor(np.zeros(shape, np.uint8))
    lib["main"](tvm.runtime.tensor(xs), tvm.runtime.tensor(ss), tvm.runtime.tensor(bs), got)
    expected = np.clip(np.rint(np.maximum(xs * ss + bs, 0) * np.float32(47.5)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got.numpy(), expected)  # fenced: no fused multiply-add, numpy's two roundings
