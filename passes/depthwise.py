"""Register-blocked schedule for depthwise convolutions in NHWC (used by the `vectorize` pass).

`C[n, y, x, f] += A[n, y*s + ry, x*s + rx, f] * W[ry, rx, 0, f]` (MobileNet's 3x3 convs, one
filter per channel) is no matmul: every multiply-add reads its own input element, so the GEMM
tiles do not apply. The generic schedule ran it one output pixel at a time into a full-size
accumulator tensor, then each epilogue stage (rescale, bias, clip, the next quantize) as one more
pass over memory. Here the output runs in tiles of up to 16 pixels along x by up to 8 vectors of
channels that stay in registers over the 3x3 window: each tap loads its weight vectors once for
the tile's pixels, and the epilogue runs on the tile before it is stored. The padding stays
inlined into the taps (a bounds test per load): kept as a copy, MobileNetV2's float build was
slower (one more pass over memory).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .gemm import STACK_ALLOCA_BYTES, consumer_chain, indexed_by, keep_tile_in_registers, loop_extent, tile_shape, vector_registers


@dataclasses.dataclass(frozen=True)
class DepthwiseShape:
    """A depthwise conv block's loops: n, y, x, f spatial; ry, rx, rc (of extent 1) reduced."""

    loops: list[Any]
    width: int  # x's extent
    channels: int  # f's extent


def match_depthwise(sch: Any, block_rv: Any) -> DepthwiseShape | None:
    """The block as a depthwise conv2d in NHWC with a channel multiplier of 1, else None."""
    from tvm import tirx

    block = sch.get(block_rv)
    loops = sch.get_loops(block_rv)
    spatial, reduction = tirx.IterVar.DataPar, tirx.IterVar.CommReduce
    if len(block.reads) != 2 or len(block.writes) != 1 or len(loops) != 7:
        return None
    if [iv.iter_type for iv in block.iter_vars] != [spatial] * 4 + [reduction] * 3:
        return None
    n, y, x, f, ry, rx, rc = (iv.var for iv in block.iter_vars)
    a, w = block.reads
    c = block.writes[0]
    extents = [loop_extent(sch, loop) for loop in loops]
    if None in extents[1:] or extents[6] != 1 or len(a.region) != 4 or len(w.region) != 4:
        return None
    channel_vars = tirx.analysis.undefined_vars(a.region[3].min, [])
    if not (indexed_by(c, [n, y, x, f]) and indexed_by(w, [ry, rx, rc, f]) and any(v.same_as(f) for v in channel_vars)
            and all(v.same_as(f) or v.same_as(rc) for v in channel_vars) and int(a.source.shape[3]) == extents[3]):
        return None
    return DepthwiseShape(loops=list(loops), width=extents[2], channels=extents[3])


def schedule_depthwise(sch: Any, block_rv: Any, shape: DepthwiseShape, lanes: int, features: frozenset[str], parallel: bool,
                       parallel_min_work: int) -> tuple[dict[str, int], set[str]]:
    """Schedules the depthwise block and its elementwise consumers as register tiles; returns stats
    and the names of the blocks it scheduled. Raises when `lanes` does not divide the channels."""
    if shape.channels % lanes:
        raise ValueError(f"{shape.channels} channels are not whole vectors of {lanes}")
    n, y, x, f, ry, rx, rc = shape.loops
    # accumulators under TVM's stack limit: a tile of 1 KiB or more comes from its workspace pool,
    # and past the padding's bounds tests between taps LLVM then stored every accumulator to it
    # after every multiply-add (16 pixels x 16 int32 lanes: the int8 48x48x16 conv)
    # More pixels before more channels: each tap's weight vectors (sign-extended first in int8) are
    # loaded once per tile and serve its pixels (MobileNetV2 int8 0.2558 -> 0.2411 ms, float 0.3453
    # -> 0.3321 with 12 x 1 tiles over 2 x 6 ones).
    accumulator_bytes = lanes * 4
    rows, vectors = tile_shape(shape.width, shape.channels // lanes, vector_registers(features), (STACK_ALLOCA_BYTES - 1) // accumulator_bytes,
                               more_rows=True)
    x_outer, x_inner = sch.split(x, factors=[None, rows])
    f_outer, f_vector, f_lane = sch.split(f, factors=[None, vectors, lanes])
    sch.reorder(n, y, x_outer, f_outer, ry, rx, rc, x_inner, f_vector, f_lane)
    consumers = consumer_chain(sch, block_rv) or [sch.cache_write(block_rv, 0, "global")]
    for consumer in consumers:
        sch.reverse_compute_at(consumer, f_outer)
    taps = (loop_extent(sch, ry) or 1) * (loop_extent(sch, rx) or 1)
    work = (loop_extent(sch, n) or 1) * (loop_extent(sch, y) or 1) * shape.width * shape.channels * taps
    stats = {"depthwise_kernels": 1, "parallel_loops": int(parallel and work >= parallel_min_work)}
    if stats["parallel_loops"]:
        sch.parallel(sch.fuse(n, y, x_outer))
    sch.vectorize(f_lane)
    init = sch.decompose_reduction(block_rv, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(f_vector)
    sch.unroll(x_inner)
    keep_tile_in_registers(sch, init, consumers, lanes)
    return stats, {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_loops(init)[0])}
