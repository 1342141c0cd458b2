"""Register-blocked schedules for matmul-shaped kernels (used by the `vectorize` pass).

A kernel whose one reduction is `C[.., m, n] += A[.., m, k] * B[k, n]` with B a constant weight
(MiniLM's projections and MLPs, a Gemm, a 1x1 conv in NHWC) gets the schedule every fast GEMM
has: the output in tiles of `rows` x `columns` that stay in registers for the whole reduction,
each step loading `rows` broadcast elements of A and `columns / lanes` vectors of B, the weight
packed tile by tile at compile time so B streams contiguously, and the epilogue (rescale, bias,
activation, the next layer's quantize) run on the tile while it is in registers.

int8 (uint8 x int8 -> int32) on a CPU with a 4-way int8 dot-product instruction (x86 AVX-512
VNNI `vpdpbusd`: 16 lanes, 64 multiply-adds in one; Arm I8MM `usdot`: 4 lanes, 16) computes each
step with that instruction (the weight packed [N/lanes, K/4, lanes, 4]). Elsewhere the int8 tile
is plain vector code (LLVM widens).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# The int8 dot products this schedule can emit, by the LLVM feature that provides them:
# (lanes of int32 accumulators, int8 pairs summed per lane, activation dtype, weight dtype, LLVM intrinsic)
DOT_PRODUCTS = {
    "avx512vnni": (16, 4, "uint8", "int8", "llvm.x86.avx512.vpdpbusd.512"),  # x86 AVX-512 VNNI: vpdpbusd
    "i8mm": (4, 4, "uint8", "int8", "llvm.aarch64.neon.usdot"),  # Armv8.6 I8MM (Cortex-X3/X4, A720): usdot
}


@dataclasses.dataclass(frozen=True)
class Relayout:
    """How a constant weight is rearranged at compile time for a scheduled kernel:
    `np.transpose(w.reshape(shape), permutation)` (no reshape when `shape` is empty)."""

    permutation: tuple[int, ...]
    shape: tuple[int, ...] = ()

    def apply(self, weight: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.transpose(weight.reshape(self.shape) if self.shape else weight, self.permutation))


@dataclasses.dataclass(frozen=True)
class GemmShape:
    """The matmul a reduction block computes: its loops and the operands' roles."""

    batch: list[Any]  # the spatial loops outside m (batch dims, attention heads; a conv's n, y), outermost first
    row: Any  # the loop over m (a conv's output x)
    column: Any  # the loop over n (a conv's output channels)
    reduce: list[Any]  # the loops over k, the contiguous one last (a conv's ry, rx, input channels)
    m: int  # 0: symbolic (a dynamic batch of rows): tiles of one row
    n: int
    k: int  # the extent of the contiguous reduction loop
    a_dtype: str
    b_dtype: str
    c_dtype: str
    weight_param: int | None  # the kernel parameter B is, when B is a weight every call passes as a constant
    weight_shape: tuple[int, ...] = ()  # B's shape: [k, n], or a conv's [kh, kw, c, f] (HWIO)


def loop_extent(sch: Any, loop: Any) -> int | None:
    """A loop's extent, None when symbolic."""
    from tvm import tirx

    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def match_gemm(sch: Any, block_rv: Any, constant_params: frozenset[int]) -> GemmShape | None:
    """The block as a matmul `C[.., m, n] += A[.., m, k] * B[.., k, n]` (B with the batch dims or
    without them, a weight), or None when it is not one."""
    from tvm import tirx

    block = sch.get(block_rv)
    loops = sch.get_loops(block_rv)
    kinds = [iv.iter_type for iv in block.iter_vars]
    if len(loops) != len(kinds) or len(kinds) < 3 or kinds[-1] != tirx.IterVar.CommReduce or tirx.IterVar.CommReduce in kinds[:-1]:
        return None
    if len(block.reads) < 2 or len(block.writes) != 1:
        return None
    names = [iv.var for iv in block.iter_vars]
    a, b = block.reads[0], block.reads[1]
    c = block.writes[0]
    spatial, k_var = names[:-1], names[-1]
    batch = spatial[:-2]
    extents = [loop_extent(sch, loop) for loop in loops]
    # a symbolic batch or m (a dynamic batch of rows) is fine: n and k are the tile's
    if not (indexed_by(a, [*spatial[:-1], k_var]) and indexed_by(c, spatial)) or None in extents[-2:]:
        return None
    decoded = len(block.reads) > 2
    if decoded:
        # a weight decoded inside the reduction (int4 codes, group scales, zero points): every
        # other read is indexed by k and n alone; tiled as is (no packing, no dot product)
        def uses_rows(expr: Any) -> bool:
            return any(u.same_as(v) for u in tirx.analysis.undefined_vars(expr, []) for v in spatial[:-1])

        if any(uses_rows(r.min) for region in block.reads[1:] for r in region.region):
            return None
    elif not (indexed_by(b, [k_var, spatial[-1]]) or indexed_by(b, [*batch, k_var, spatial[-1]])):
        return None
    weight = not decoded and len(b.region) == 2  # B [k, n], not per batch
    return GemmShape(batch=loops[:-3], row=loops[-3], column=loops[-2], reduce=[loops[-1]], m=extents[-3] or 0, n=extents[-2], k=extents[-1],
                     a_dtype=str(a.source.dtype), b_dtype="decoded" if decoded else str(b.source.dtype), c_dtype=str(c.source.dtype),
                     weight_param=_weight_param(sch, b.source, constant_params) if weight else None,
                     weight_shape=tuple(int(d) for d in b.source.shape) if weight else ())


def indexed_by(region: Any, variables: list[Any]) -> bool:
    """The buffer region is exactly one element at the given iteration variables."""
    from tvm import tirx

    return len(region.region) == len(variables) and all(
        isinstance(r.extent, tirx.IntImm) and int(r.extent) == 1 and r.min.same_as(v) for r, v in zip(region.region, variables))


def _weight_param(sch: Any, buffer: Any, constant_params: frozenset[int]) -> int | None:
    """The kernel parameter `buffer` is, when every call passes it as a constant."""
    param = next((i for i, p in enumerate(sch.mod["main"].params) if p.same_as(buffer)), None)
    return param if param is not None and param in constant_params else None


def match_conv_nhwc(sch: Any, block_rv: Any, constant_params: frozenset[int]) -> GemmShape | None:
    """A conv2d in NHWC/HWIO, `C[n, y, x, f] += A[n, y*s + ry, x*s + rx, c] * W[ry, rx, c, f]`, as a
    GEMM: rows are output pixels along x, columns output channels, the reduction (ry, rx, c) with
    the input channels contiguous. None when the block is not one."""
    from tvm import tirx

    block = sch.get(block_rv)
    if not block.name_hint.startswith("conv2d_nhwc") or len(block.reads) != 2 or len(block.writes) != 1:
        return None
    loops = sch.get_loops(block_rv)
    kinds = [iv.iter_type for iv in block.iter_vars]
    spatial, reduction = tirx.IterVar.DataPar, tirx.IterVar.CommReduce
    if len(loops) != 7 or kinds != [spatial] * 4 + [reduction] * 3:
        return None
    n, y, x, f, ry, rx, rc = (iv.var for iv in block.iter_vars)
    a, b = block.reads
    c = block.writes[0]
    if not (indexed_by(b, [ry, rx, rc, f]) and indexed_by(c, [n, y, x, f]) and len(a.region) == 4 and a.region[3].min.same_as(rc)):
        return None
    extents = [loop_extent(sch, loop) for loop in loops]
    if None in extents[1:]:  # a symbolic batch (n) is fine
        return None
    return GemmShape(batch=loops[:2], row=loops[2], column=loops[3], reduce=loops[4:], m=extents[2], n=extents[3], k=extents[6],
                     a_dtype=str(a.source.dtype), b_dtype=str(b.source.dtype), c_dtype=str(c.source.dtype),
                     weight_param=_weight_param(sch, b.source, constant_params), weight_shape=tuple(int(d) for d in b.source.shape))


def match(sch: Any, block_rv: Any, constant_params: frozenset[int]) -> GemmShape | None:
    """The block as a matmul or an NHWC conv2d that the register tiles take, else None."""
    return match_gemm(sch, block_rv, constant_params) or match_conv_nhwc(sch, block_rv, constant_params)


def dot_product_for(features: frozenset[str], gemm: GemmShape) -> tuple[int, int, str, str, str] | None:
    """The int8 dot-product instruction this GEMM can use on a CPU with these LLVM features."""
    for feature, spec in DOT_PRODUCTS.items():
        lanes, group, a_dtype, b_dtype, _ = spec
        if (feature in features and (gemm.a_dtype, gemm.b_dtype, gemm.c_dtype) == (a_dtype, b_dtype, "int32")
                and gemm.n % lanes == 0 and gemm.k % group == 0 and gemm.weight_param is not None):
            return spec
    return None


def _dot_spec(features: frozenset[str] | tuple[str, ...], activation_dtype: str) -> tuple[int, int, str, str, str] | None:
    """The int8 dot product of a CPU with these LLVM features for activations of this dtype."""
    return next((spec for feature, spec in DOT_PRODUCTS.items() if feature in features and spec[2] == activation_dtype), None)


def int8_reduction_multiple(features: frozenset[str] | tuple[str, ...], activation_dtype: str = "uint8") -> int:
    """The multiple an int8 conv's input channels are padded to (zero weights): the pairs a dot
    product sums per lane, so a 3-channel image (MobileNet's stem) still takes the instruction."""
    spec = _dot_spec(features, activation_dtype)
    return spec[1] if spec else 1


def int8_column_multiple(features: frozenset[str] | tuple[str, ...], vector_bits: int, activation_dtype: str = "uint8") -> int:
    """The width an int8 matmul with fewer output columns is padded to (zero weight columns, sliced
    off after the product): the lanes of the target's int8 dot product, else of its int32
    accumulator vector. The digits CNN's 10 classes would miss HVX (32 lanes) entirely."""
    spec = _dot_spec(features, activation_dtype)
    return spec[0] if spec else max(vector_bits // 32, 1)


_REGISTERED: set[str] = set()


def _dot_intrinsic(lanes: int, group: int, a_dtype: str, b_dtype: str, llvm_name: str) -> str:
    """Registers (once) the tensor intrinsic `C[i] += sum_j A[j] * B[i, j]` for `lanes` x `group`
    8-bit pairs, implemented by one call of the LLVM dot-product intrinsic; returns its name."""
    from tvm import s_tir
    from tvm.script import tirx as T
    from tvm.target.codegen import llvm_version_major

    name = f"socc_dot_{lanes}x{group}_{a_dtype}_{b_dtype}_{llvm_name.replace('.', '_')}"
    if name in _REGISTERED:
        return name
    bytes_operands = llvm_version_major() >= 22 or "aarch64" in llvm_name
    operand_types = (f"{a_dtype}x{lanes * group}", f"{b_dtype}x{lanes * group}") if bytes_operands else (f"int32x{lanes}", f"int32x{lanes}")

    @T.prim_func(s_tir=True)
    def description(a: T.Buffer((group,), a_dtype, offset_factor=1), b: T.Buffer((lanes, group), b_dtype, offset_factor=1),
                    c: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:group], b[0:lanes, 0:group])
            T.writes(c[0:lanes])
            for i, j in T.grid(lanes, group):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    c[vi] = c[vi] + T.Cast("int32", a[vj]) * T.Cast("int32", b[vi, vj])

    @T.prim_func(s_tir=True)
    def implementation(a: T.Buffer((group,), a_dtype, offset_factor=1), b: T.Buffer((lanes, group), b_dtype, offset_factor=1),
                       c: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:group], b[0:lanes, 0:group])
            T.writes(c[0:lanes])
            # the `group` activation bytes as one int32, broadcast to every lane; operands typed as
            # the LLVM intrinsic declares them (x86: bytes since LLVM 22, int32 words before)
            a_word = T.reinterpret(a.vload([0], f"{a_dtype}x{group}"), dtype="int32")
            c[T.ramp(0, 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name), c.vload([0], f"int32x{lanes}"),
                T.reinterpret(T.broadcast(a_word, lanes), dtype=operand_types[0]),
                T.reinterpret(b.vload([0, 0], f"{b_dtype}x{lanes * group}"), dtype=operand_types[1]),
                dtype=f"int32x{lanes}")

    s_tir.TensorIntrin.register(name, description, implementation)
    _REGISTERED.add(name)
    return name


# A tile is rows x column vectors of accumulators; with one vector of B per column and one broadcast
# A element they must fit the vector registers (AVX2: 16; AVX-512 and AArch64 NEON: 32).
# Columns up to 8 vectors: a GEMV (MobileNetV2's 640x1000 classifier, 125 vectors of 8) with one
# accumulator waits on each FMA's latency; 5 of them: 0.186 -> 0.045 ms. Rows up to 16: a conv with
# one vector of output channels (DenseNet's 16-channel growth convs) had 4 accumulators, too few to
# cover the FMA / vpdpbusd latency; same-run A/B, 2 threads, Xeon: DenseNet-like float 1.28 -> 1.03
# ms, int8 0.79 -> 0.71; ResNet18-like float 0.98 -> 0.89; MobileNetV2 int8 0.45 -> 0.41.
ROW_CHOICES = (16, 12, 8, 6, 4, 3, 2, 1)
COLUMN_VECTOR_CHOICES = (8, 6, 5, 4, 3, 2, 1)


def vector_registers(features: frozenset[str]) -> int:
    return 32 if "avx512f" in features or "neon" in features else 16


STACK_ALLOCA_BYTES = 1024  # TVM's kMaxStackAlloca: smaller kernel intermediates live on the stack


def tile_shape(rows: int, column_vectors: int, registers: int, max_vectors: int = 0, more_rows: bool = False) -> tuple[int, int]:
    """The largest tile (rows, column vectors) that divides the output and fits the registers (and
    has at most `max_vectors` accumulators, when given); among equals, the one with more columns (a
    wider run of each B row), or with `more_rows` the one with more rows (more outputs per weight
    vector loaded)."""
    fits = [(r * c, r if more_rows else c, r, c) for r in (ROW_CHOICES if rows else (1,)) for c in COLUMN_VECTOR_CHOICES
            if rows % r == 0 and column_vectors % c == 0 and r * c + c + 1 <= registers and (not max_vectors or r * c <= max_vectors)]
    _, _, r, c = max(fits)
    return r, c


def schedule_gemm(sch: Any, block_rv: Any, gemm: GemmShape, lanes: int, features: frozenset[str], parallel: bool,
                  parallel_min_work: int) -> tuple[dict[str, int], dict[int, Relayout], set[str]]:
    """Schedules the matmul block and its elementwise consumers (already inlined into as few blocks as
    they allow) as register tiles; returns stats, the weight's compile-time relayout and the names
    of the blocks it scheduled."""
    stats = {"gemm_kernels": 1, "dot_product_kernels": 0}
    relayout: dict[int, Relayout] = {}
    reduction = int(np.prod([loop_extent(sch, loop) for loop in gemm.reduce]))  # multiply-adds per output
    dot = dot_product_for(features, gemm)
    if dot is not None:
        lanes, group = dot[0], dot[1]
    tile_rows, column_vectors = tile_shape(gemm.m, gemm.n // lanes, vector_registers(features))
    if gemm.weight_param is not None:
        _pack_weight(sch, block_rv, gemm, lanes if dot is not None else lanes * column_vectors, group if dot is not None else 0, relayout)
    row_outer, row_inner = sch.split(gemm.row, factors=[None, tile_rows])
    col_outer, col_vector, col_lane = sch.split(gemm.column, factors=[None, column_vectors, lanes])
    # column panels outermost: one panel of B (k x the tile's columns) is read from cache by every
    # row tile (and every output row of a conv) before the next; rows outermost streamed all of B
    # (MiniLM's 2.4 MB FFN weights, more than a core's L2) once per row tile
    if dot is not None:
        k_outer, k_inner = sch.split(gemm.reduce[-1], factors=[None, group])
        sch.reorder(col_outer, *gemm.batch, row_outer, *gemm.reduce[:-1], k_outer, row_inner, col_vector, col_lane, k_inner)
    else:
        k_outer = gemm.reduce[-1]
        sch.reorder(col_outer, *gemm.batch, row_outer, *gemm.reduce[:-1], k_outer, row_inner, col_vector, col_lane)
    consumers = consumer_chain(sch, block_rv)
    if not consumers:  # the tile accumulates in registers all the same, and is written out once
        consumers = [sch.cache_write(block_rv, 0, "global")]  # "local" after tensorize (the intrinsic's buffers are global)
    for consumer in consumers:
        sch.reverse_compute_at(consumer, row_outer)
    # a symbolic extent counts as 1 (a dynamic batch is most often 1 at run time)
    batch = int(np.prod([loop_extent(sch, loop) or 1 for loop in gemm.batch]))
    rows = gemm.m or 1
    tiles = batch * (rows // tile_rows) * (gemm.n // (lanes * column_vectors))
    work = batch * rows * gemm.n * reduction
    if parallel and work >= parallel_min_work and tiles > 1:
        # before decompose_reduction: TVM parallelizes whole reductions only
        sch.parallel(sch.fuse(col_outer, *gemm.batch, row_outer))
        stats["parallel_loops"] = 1
    if dot is None:
        sch.vectorize(col_lane)  # before decompose_reduction, which leaves an update TVM will not vectorize
    init = sch.decompose_reduction(block_rv, ([*gemm.reduce[:-1], k_outer])[0])
    sch.vectorize(sch.get_loops(init)[-1])
    if dot is not None:
        sch.tensorize(col_lane, _dot_intrinsic(*dot))
        stats["dot_product_kernels"] = 1
    sch.unroll(col_vector)
    sch.unroll(row_inner)
    keep_tile_in_registers(sch, init, consumers, lanes)
    return stats, relayout, {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_loops(init)[0])}


def keep_tile_in_registers(sch: Any, init: Any, consumers: list[Any], lanes: int) -> None:
    """The tile (the reduction's init) compacted to the tile's shape and kept in registers
    ("local"); the epilogue run one vector of `lanes` at a time: every stage before the last is
    computed at the last stage's loop over vectors, so its intermediate is one vector. (A tile-sized
    intermediate of 1 KiB or more is no stack variable: TVM allocated it from the workspace pool
    inside the parallel loop, a call per tile and stage, and it lived in memory.)"""
    sch.set_scope(init, 0, "local")
    last = consumers[-1]
    inner = sch.get_loops(last)[-1]
    extent = loop_extent(sch, inner) or 0
    if extent < lanes or extent % lanes:
        for consumer in consumers[:-1]:
            sch.set_scope(consumer, 0, "local")
        return
    anchor = None
    if extent > lanes:
        anchor, inner = sch.split(inner, factors=[None, lanes])
    else:  # one vector per row: the loop over the tile's rows (a loop of the tile's, not one around it)
        loops = sch.get_loops(last)
        outer = {sch.get(loop) for loop in sch.get_loops(init)}
        if len(loops) >= 2 and sch.get(loops[-2]) not in outer:
            anchor = loops[-2]
    sch.vectorize(inner)
    for consumer in reversed(consumers[:-1]):
        if anchor is not None:
            sch.compute_at(consumer, anchor)
        sch.set_scope(consumer, 0, "local")
        sch.vectorize(sch.get_loops(consumer)[-1])


def _pack_weight(sch: Any, block_rv: Any, gemm: GemmShape, width: int, group: int, relayout: dict[int, Relayout]) -> None:
    """Lays the constant weight out tile by tile (the caller's constant is rearranged at compile
    time): `width` output channels contiguous for the whole reduction, and with a dot product
    (`group` > 0) its `group` reduction elements innermost, so one instruction's operand is one load.
    [k, n] -> [n / width, k, width] or [n / width, k / group, width, group];
    HWIO [kh, kw, c, f] -> [f / width, kh, kw, c, width] or [f / width, kh, kw, c / group, width, group]."""
    shape = gemm.weight_shape
    if len(shape) == 2 and group:
        sch.transform_layout(block_rv, ("read", 1), lambda k, n: (n // width, k // group, n % width, k % group))
        relayout[gemm.weight_param] = Relayout(permutation=(2, 0, 3, 1), shape=(shape[0] // group, group, shape[1] // width, width))
    elif len(shape) == 2:
        sch.transform_layout(block_rv, ("read", 1), lambda k, n: (n // width, k, n % width))
        relayout[gemm.weight_param] = Relayout(permutation=(1, 0, 2), shape=(shape[0], shape[1] // width, width))
    elif group:
        kh, kw, c, f = shape
        sch.transform_layout(block_rv, ("read", 1), lambda ry, rx, rc, rf: (rf // width, ry, rx, rc // group, rf % width, rc % group))
        relayout[gemm.weight_param] = Relayout(permutation=(4, 0, 1, 2, 5, 3), shape=(kh, kw, c // group, group, f // width, width))
    else:
        kh, kw, c, f = shape
        sch.transform_layout(block_rv, ("read", 1), lambda ry, rx, rc, rf: (rf // width, ry, rx, rc, rf % width))
        relayout[gemm.weight_param] = Relayout(permutation=(3, 0, 1, 2, 4), shape=(kh, kw, c, f // width, width))


def consumer_chain(sch: Any, block_rv: Any) -> list[Any]:
    """The elementwise blocks after the matmul, in order, each the one consumer of the block before
    it: they run on each tile while it is in registers. The chain ends before a reduction, or before
    a block that reads another block's output too; the last one in it writes a whole tensor."""
    from tvm import tirx

    chain = []
    current = block_rv
    while True:
        consumers = sch.get_consumers(current)
        if len(consumers) != 1:
            return chain
        block = sch.get(consumers[0])
        if any(iv.iter_type != tirx.IterVar.DataPar for iv in block.iter_vars) or len(sch.get_producers(consumers[0])) != 1:
            return chain
        current = consumers[0]
        chain.append(current)
