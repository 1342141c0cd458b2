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
    # vectors at a period of 80; two vectors per pixel and a 16-channel scalar tail
    scheduled, stats, _ = schedule_kernel(_per_channel_add(80, pixels=3), vector_bits=1024, vector_float=False)
    assert stats["tails_peeled"] == 1 and stats["rows_left_scalar"] == 0
    lib = tvm.compile(tvm.IRModule({"main": scheduled}), target="llvm")
    rng = np.random.default_rng(80)
    acc = rng.integers(-1000, 1000, (1, 3, 3, 80), dtype=np.int32)
    bias = rng.integers(-50, 50, 80, dtype=np.int32)
    out = tvm.runtime.tensor(np.zeros_like(acc))
    lib["main"](tvm.runtime.tensor(acc), tvm.runtime.tensor(bias), out)
    np.testing.assert_array_equal(out.numpy(), acc + bias)
