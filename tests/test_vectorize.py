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
