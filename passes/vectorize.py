"""vectorize: vector code for targets with a vector unit (HVX, NEON), by a schedule on each TIR kernel."""

from __future__ import annotations

import math
import re
from typing import Any

from .apply_tuning import is_scheduled
from .base import CompileContext, GraphPass
from .depthwise import match_depthwise, schedule_depthwise
from .gemm import COLUMN_VECTOR_CHOICES, STACK_ALLOCA_BYTES, Relayout, match, schedule_gemm
from .gemm import loop_extent as _extent
from .requantize import REQUANTIZE_STAGES
from .winograd import schedule_transforms


def _has_float_math(block: Any) -> bool:
    """True when the block computes in floating point: a float buffer, cast or constant in it."""
    regions = [*block.reads, *block.writes]
    if any(str(region.source.dtype).startswith(("float", "bfloat")) for region in regions):
        return True
    return "float" in block.body.script()  # casts and constants inside the expression (no Python TIR visitor in 0.27)


def _write_bits(block: Any) -> int:
    return max((int(region.source.dtype.bits) for region in block.writes), default=32)


def _is_reduction(block: Any) -> bool:
    from tvm import tirx

    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in block.iter_vars)


def _inline_elementwise(sch: Any, keep: set[str] = frozenset()) -> int:
    """Inlines every block that only feeds others (padding, casts, the float chains, the requantize
    chain) into its consumers, so an elementwise chain is one pass over memory.

    Float multiplies inline too: where an int8 build needs `a * b + c` kept from becoming a fused
    multiply-add (bit-identical results across targets), quantize put max(a * b, -FLT_MAX) between
    them at the graph level (`fence_products`); a float build lets LLVM contract them."""
    inlined = 0
    changed = True
    while changed:
        changed = False
        root = sch.get_sblock("root")
        outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
        for block_rv in sch.get_child_blocks(root):
            block = sch.get(block_rv)
            if _is_reduction(block) or block.name_hint in outputs or block.name_hint in keep or _kept_stage(block):
                continue
            try:
                sch.compute_inline(block_rv)
            except Exception:  # noqa: BLE001 - not inlinable (e.g. read twice at different points): keep it
                continue
            inlined += 1
            changed = True
            break
    return inlined


def _read_bits(block: Any) -> int:
    """The narrowest element a reduction reads (its int8 operands): vectors of that many lanes load
    whole (128 x int8 on HVX) and LLVM widens them to as many int32 accumulator vectors as needed."""
    return min((int(region.source.dtype.bits) for region in block.reads if region.source not in [w.source for w in block.writes]), default=32)


def _index_vars(region: Any) -> set[Any]:
    """The variables a buffer region's indices use."""
    from tvm import tirx

    return {var for rng in region.region for var in tirx.analysis.undefined_vars(rng.min, [])}


def _strided_row(block: Any, spatial_vars: list[Any]) -> bool:
    """The reduction reads its first operand with a stride along the innermost spatial axis
    (a stride-2 conv): row vectors would be gathers, which LLVM builds lane by lane."""

    if not block.reads or not spatial_vars:
        return False
    index = str(block.reads[0].region[-1].min)
    name = re.escape(str(spatial_vars[-1].name))
    return re.search(rf"\b{name} \* T\.int64\(\d+\)|\b{name} \* \d+", index) is not None


def _gathers(block: Any) -> bool:
    """Some read or write of the elementwise block, vectorized over its innermost var, would be a
    gather or scatter: it uses that var, but not as its innermost index (a transposed access, e.g.
    a channels-last accumulator read in NCHW order). LLVM builds those lane by lane (scalar loads,
    inserts, byte stores): slower and larger than the scalar loop, so such a block stays scalar.
    A read that does not use the var (a per-channel constant) is a broadcast."""
    from tvm import tirx

    innermost = block.iter_vars[-1].var
    for region in [*block.reads, *block.writes]:
        if not any(innermost.same_as(u) for u in _index_vars(region)):
            continue
        last = tirx.analysis.undefined_vars(region.region[-1].min, [])
        if not any(innermost.same_as(u) for u in last):
            return True
    return False


def _fusable_accesses(block: Any, extents: list[int]) -> bool | None:
    """Whether loops fused over this elementwise block keep every access vectorizable: each buffer
    is indexed by all the block's vars in order (a tensor of the block's own shape: flattened,
    `(f // C) * C + f % C` is f again, a contiguous run) or by its innermost var alone (a
    per-channel vector p[f % C], periodic: split at multiples of C, each vector of the period is the
    same on every pass, which LLVM builds once, outside the loop). None when some access is neither;
    else True when a per-channel access is among them."""
    from tvm import tirx

    names = [iv.var for iv in block.iter_vars]
    channel_read = False
    for region in [*block.reads, *block.writes]:
        starts = [rng.min for rng in region.region]
        if any(not isinstance(rng.extent, tirx.IntImm) or int(rng.extent) != 1 for rng in region.region):
            return None
        if any(not isinstance(d, tirx.IntImm) for d in region.source.shape):
            return None  # a symbolic dim (a dynamic batch)
        shape = [int(d) for d in region.source.shape]
        own = len(starts) == len(names) and all(start.same_as(var) for start, var in zip(starts, names)) and shape == extents
        channel = len(starts) == 1 and starts[0].same_as(names[-1]) and shape == extents[-1:]
        if not (own or channel):
            return None
        channel_read = channel_read or channel
    return channel_read


MAX_PERIOD_VECTORS = 4  # a per-channel period longer than this many vectors stays scalar (unrolled code grows)


def _vectorize_fused_rows(sch: Any, block_rv: Any, loops: list[Any], lanes: int, smallest: int = 0) -> bool:
    """An elementwise block whose channel count no vector width divides (NHWC, 16 or 48 channels):
    its two innermost loops (pixel, channel) are fused and split into vectors (`_vector_width`), at
    multiples of lcm(channels, width) when it reads a per-channel vector, when its accesses allow
    (_fusable_accesses). Only two: with three fused, TVM's flattened index no longer simplifies to
    a run and every lane is loaded on its own."""
    import math

    extents = [_extent(sch, loop) for loop in loops]
    if len(loops) < 2 or None in extents:
        return False
    per_channel = _fusable_accesses(sch.get(block_rv), extents)
    if per_channel is None:
        return False
    run = extents[-2] * extents[-1]
    width = lanes
    while width >= max(smallest or lanes // 2, 2):
        period = math.lcm(extents[-1], width) if per_channel else width
        if run % period == 0 and period // width <= MAX_PERIOD_VECTORS:
            fused = sch.fuse(loops[-2], loops[-1])
            if period == width:
                _, vector = sch.split(fused, factors=[None, width])
            else:
                _, repeat, vector = sch.split(fused, factors=[None, period // width, width])
                sch.unroll(repeat)
            sch.vectorize(vector)
            return True
        width //= 2
    return False


def _kept_stage(block: Any) -> bool:
    """The int32 stages of an integer requantize (requantize.py) stay blocks of their own: inlined,
    their int32 x int32 -> int64 product becomes a full 64-bit multiply, and the 8-bit cast's 128
    lanes would carry 128 int64 products, which LLVM splits apart; as blocks they are vectorized
    by 32 x int32 (the product a multiply-high pair) and the cast by 128 x uint8."""
    return block.name_hint.startswith(REQUANTIZE_STAGES)


def _vector_width(extent: int, lanes: int, smallest: int = 0) -> int:
    """The widest of `lanes`, lanes/2, ... down to `smallest` (default: half of `lanes`) that divides
    `extent`; 0 when none does.

    Odd widths (24 x i32) gave wrong int8 results under qemu-hexagon, and LLVM's Hexagon backend
    lowers vectors under 64 bytes to scalar code anyway."""
    smallest = max(smallest or lanes // 2, 2)
    width = lanes
    while width >= smallest:
        if extent >= width and extent % width == 0:
            return width
        width //= 2
    return 0


def _tail_width(extent: int, lanes: int, smallest: int = 0) -> int:
    """For an extent no vector width divides: the widest of `lanes`, lanes/2, ... down to `smallest`
    that leaves a tail shorter than `smallest` (vectors over the rest, the tail scalar); 0 when the
    extent is shorter than one such vector."""
    smallest = max(smallest or lanes // 2, 2)
    width = lanes
    while width >= smallest:
        if extent > width and extent % width < smallest:
            return width
        width //= 2
    return 0


def _vectorize_innermost(sch: Any, loop_rv: Any, lanes: int, outer_anchor: Any = None, smallest: int = 0, tails: list[Any] | None = None) -> bool:
    """Splits `loop_rv` into vectors of `_vector_width` lanes and vectorizes them; False when no width fits.

    With `tails` (a list), an extent that no width divides is split anyway (`_tail_width`): the last
    vector's lanes past the end are predicated off, and the loop over vectors goes into `tails`, for
    `_peel_tails` to split its last iteration off once the block is scheduled."""
    extent = _extent(sch, loop_rv)
    width = _vector_width(extent or 0, lanes, smallest)
    peel = False
    if width == 0 and tails is not None and extent:
        width, peel = _tail_width(extent, lanes, smallest), True
    if width == 0:
        return False
    if extent > width:
        outer, inner = sch.split(loop_rv, factors=[None, width])
        if peel:
            tails.append((outer, extent // width))
        if outer_anchor is not None:
            sch.reorder(outer, *outer_anchor, inner)
        loop_rv = inner
    sch.vectorize(loop_rv)
    return True


def _vectorize_with_tail(sch: Any, loop_rv: Any, lanes: int, smallest: int, tail_smallest: int) -> bool:
    """An elementwise loop no vector width divides (80 channels): partitioned into whole vectors
    (`_tail_width`) and the rest, which is one vector of its own when its length is a power of two
    of at least `tail_smallest` (0: never: a requantize stage's int64 products on part of a vector
    would be scalar anyway), else scalar. False when not even one vector fits."""
    extent = _extent(sch, loop_rv) or 0
    width = _tail_width(extent, lanes, smallest)
    if width == 0:
        return False
    body, rest = sch.loop_partition(loop_rv, [extent - extent % width, None])
    _, inner = sch.split(body, factors=[None, width])
    sch.vectorize(inner)
    rest_extent = extent % width
    # a power of two only: odd widths (24 x i32) gave wrong int8 results under qemu-hexagon
    if tail_smallest and rest_extent >= tail_smallest and rest_extent & (rest_extent - 1) == 0:
        sch.vectorize(rest)
    return True


def _concat_cuts(block: Any) -> list[int] | None:
    """Where a concatenation block (TOPI's: nested if_then_else(k <= v, piece, ...) on its innermost
    var) switches pieces, in order; None for any other block."""
    body = block.body.script()
    innermost = block.iter_vars[-1].var.name
    found = re.findall(r"T\.if_then_else\((?:T\.int(?:32|64)\()?(\d+)\)? <= (\w+),", body)
    if not found or body.count("T.if_then_else(") != len(found) or any(var != innermost for _, var in found):
        return None
    return sorted({int(k) for k, _ in found})


MAX_CONCAT_PARTITIONS = 32  # each is a block of code of its own (DenseNet's 200 channels: 7 at 32 lanes)


def _vectorize_pieces(sch: Any, loop_rv: Any, cuts: list[int], lanes: int) -> bool:
    """A concatenation's innermost loop partitioned at its pieces' bounds and, within each piece,
    into vectors (`lanes`, then powers of two for the rest): each partition reads one piece, so
    its condition simplifies away and it is a plain vector copy (vectorized whole, the
    if_then_else's lanes would be scalarized). Partitions under a quarter vector stay scalar."""
    extent = _extent(sch, loop_rv)
    if not extent or cuts[-1] >= extent:
        return False
    chunks = []
    for low, high in zip([0, *cuts], [*cuts, extent]):
        while high > low:
            width = lanes if high - low >= lanes else 1 << ((high - low).bit_length() - 1)
            chunks.append(width)
            low += width
    if len(chunks) > MAX_CONCAT_PARTITIONS:
        return False  # (a long concatenation along its innermost axis: blocks of code without end)
    parts = sch.loop_partition(loop_rv, [*chunks[:-1], None]) if len(chunks) > 1 else [loop_rv]
    smallest = max(lanes // 4, 2)
    for part, width in zip(parts, chunks):
        if width >= smallest:
            sch.vectorize(part)
    return any(width >= smallest for width in chunks)


def _peel_tails(sch: Any, tails: list[tuple[Any, int]]) -> int:
    """Splits each loop over vectors with a predicated last vector into the whole vectors and that
    last one (`loop_partition`): the first loop's predicate is then always true and simplifies away,
    so its vectors stay vectors (a vector loop with a condition is scalarized whole by TVM's
    VectorizeLoop); the tail runs scalar. Returns how many were split."""
    peeled = 0
    for outer, whole in tails:
        try:
            sch.loop_partition(outer, [whole, None])
        except Exception:  # noqa: BLE001 - e.g. fused into a parallel loop since: the loop stays as it is (scalar)
            continue
        peeled += 1
    return peeled



def _on_stack(sch: Any, buffer: Any) -> bool:
    """The buffer is an intermediate of the kernel (not a parameter) under STACK_ALLOCA_BYTES."""
    from tvm import tirx

    func = sch.mod["main"]
    if any(buffer.same_as(p) for p in func.params) or not all(isinstance(d, tirx.IntImm) for d in buffer.shape):
        return False
    return math.prod(int(d) for d in buffer.shape) * int(buffer.dtype.bits) // 8 < STACK_ALLOCA_BYTES


def _work(sch: Any, loops: list[Any]) -> int:
    """The iterations of a loop nest (a reduction's multiply-adds); 0 when an extent is symbolic."""
    total = 1
    for loop in loops:
        extent = _extent(sch, loop)
        if extent is None:
            return 0
        total *= extent
    return total


def _parallel_outer(sch: Any, outer: list[Any], work: int, min_work: int = 0) -> bool:
    """Fuses the given outer spatial loops into one and runs it on the thread pool, when the nest has
    `min_work` (default `PARALLEL_MIN_WORK`) iterations and the fused loop more than one (before
    decompose_reduction: TVM parallelizes a loop over a whole reduction block, not over its
    separated update)."""
    if work < (min_work or PARALLEL_MIN_WORK) or not outer or _work(sch, outer) < 2:
        return False
    try:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    except Exception:  # noqa: BLE001 - e.g. another block between the loops: they stay serial
        return False
    return True


WEIGHT_TO_CHANNELS_LAST = Relayout(permutation=(1, 2, 3, 0))  # [f, c, kh, kw] -> [c, kh, kw, f]


def _vectorize_channels(sch: Any, block_rv: Any, lanes: int, smallest: int, constant_params: frozenset[int], relayout: dict[int, Relayout],
                        parallel_work: int = 0, stats: dict[str, int] | None = None) -> bool:
    """A conv2d (NCHW) on a small image: vectors over the output channels instead of the image row.

    The weights are laid out [c, kh, kw, f] and the int32 accumulator [n, y, x, f], so both are
    contiguous along f; the input element is a broadcast scalar (a depthwise conv's input, which
    varies with f, is first copied to [n, h, w, c]; a conv writing the kernel's output writes a
    channels-last copy of it first). When every call passes the weights
    as a constant, the kernel takes them in that layout (`relayout` records the parameter, and the
    caller's constants are transposed at compile time); otherwise the kernel copies them at its start.
    With `parallel_work` (the conv's multiply-adds), its n, y, x and channel-vector loops run in parallel."""
    block = sch.get(block_rv)
    loops = sch.get_loops(block_rv)
    depthwise = block.name_hint.startswith("group_conv2d_nchw")
    if not (block.name_hint.startswith("conv2d_nchw") or depthwise) or len(loops) != 7 or len(block.reads) != 2:
        return False
    channels = _extent(sch, loops[1])
    weight = block.reads[1].source
    if channels is None or len(weight.shape) != 4 or int(weight.shape[0]) != channels:
        return False
    data = block.reads[0].source
    if depthwise and (_extent(sch, loops[4]) != 1 or int(data.shape[1]) != channels):
        return False  # a depthwise conv (one input channel per output channel) reads data[n, f, ...]
    width = _vector_width(channels or 0, lanes, smallest)
    if width == 0:
        return False
    if block.name_hint in {sch.get(b).name_hint for b in sch.get_output_blocks(sch.get_sblock("root"))}:
        sch.cache_write(block_rv, 0, "global")  # the output's layout is the caller's: a (scalar) copy writes it
    func = sch.mod["main"]
    param = next((i for i, p in enumerate(func.params) if p.same_as(weight)), None)
    if param is not None and param in constant_params:
        sch.transform_layout(block_rv, ("read", 1), lambda f, c, kh, kw: (c, kh, kw, f))
        relayout[param] = WEIGHT_TO_CHANNELS_LAST
    else:
        cache = sch.cache_read(block_rv, 1, "global")
        sch.transform_layout(cache, ("write", 0), lambda f, c, kh, kw: (c, kh, kw, f))
    if depthwise:  # its input element varies with f too: read it from an [n, h, w, c] copy
        copy = sch.cache_read(block_rv, 0, "global")
        sch.transform_layout(copy, ("write", 0), lambda n, c, h, w: (n, h, w, c))
    sch.transform_layout(block_rv, ("write", 0), lambda n, f, y, x: (n, y, x, f))
    _channels_last_stages(sch, block_rv)
    n, f, y, x, rc, ry, rx = sch.get_loops(block_rv)
    f_outer, f_inner = sch.split(f, factors=[None, width])
    sch.reorder(n, y, x, f_outer, rc, ry, rx, f_inner)
    sch.vectorize(f_inner)
    if parallel_work and _parallel_outer(sch, [n, y, x, f_outer], parallel_work) and stats is not None:
        stats["parallel_loops"] += 1
    sch.decompose_reduction(block_rv, rc)
    return True


def _channels_last_stages(sch: Any, block_rv: Any) -> None:
    """The requantize stages reading a channels-last accumulator go channels-last too (buffer and
    iteration order), so they read it contiguously and vectorize over channels; only the final
    8-bit cast reads across the layouts."""
    consumers = [c for c in sch.get_consumers(block_rv) if _kept_stage(sch.get(c))]
    for consumer in consumers:
        if len(sch.get(consumer).iter_vars) != 4:
            continue
        sch.transform_layout(consumer, ("write", 0), lambda n, f, y, x: (n, y, x, f))
        sch.transform_block_layout(consumer, lambda n, f, y, x: (n, y, x, f))
        _channels_last_stages(sch, consumer)


# A reduction with at least this many multiply-adds runs its outer spatial loops on the thread
# pool: below it, waking the pool costs more than the work it shares.
PARALLEL_MIN_WORK = 1 << 16
SCALAR_ELEMENT_COST = 8  # an element of a block left scalar costs about as much as this many vector lanes


def schedule_kernel(func: Any, vector_bits: int, vector_float: bool, constant_params: frozenset[int] = frozenset(),
                    parallel: bool = False, features: frozenset[str] = frozenset()) -> tuple[Any, dict[str, int], dict[int, Relayout]]:
    """The kernel with elementwise producers inlined and its innermost contiguous loops vectorized;
    with `parallel` (a runtime with a thread pool), each large reduction's outer spatial loops fused
    into one parallel loop.

    Also returns the parameters (among `constant_params`) whose layout it changed, with the permutation
    the caller's constant must get."""
    from tvm import s_tir, tirx

    stats = {"inlined": 0, "vectorized_loops": 0, "scalar_float_blocks": 0, "gathers_left_scalar": 0, "rows_left_scalar": 0,
             "fused_row_blocks": 0, "parallel_loops": 0, "gemm_kernels": 0, "dot_product_kernels": 0, "depthwise_kernels": 0, "tails_peeled": 0, "concat_blocks": 0}
    relayout: dict[int, Relayout] = {}
    tails: list[tuple[Any, int]] = []
    sch = s_tir.Schedule(func)
    # Hexagon (no float vectors) keeps the schedule below: HVX wants whole 128-byte int8 vectors
    gemms = _gemm_blocks(sch, constant_params) if vector_float else []
    matmuls = [name for name in gemms if match(sch, sch.get_sblock(name), constant_params) is not None]
    # the Winograd transforms first: generic inlining would fold the output transform into its bias add
    winograd = schedule_transforms(sch, max(vector_bits // 32, 1), PARALLEL_MIN_WORK if parallel else None) if vector_float else set()
    stats["vectorized_loops"] += len(winograd)
    stats["inlined"] = _inline_elementwise(sch, keep=_operand_producers(sch, matmuls, constant_params, vector_bits) | winograd)
    sch, tiled = _tile_gemms(sch, gemms, vector_bits, constant_params, parallel, features, stats, relayout)
    tiled |= winograd
    for block_rv in sch.get_child_blocks(sch.get_sblock("root")):
        block = sch.get(block_rv)
        if block.name_hint in tiled:
            continue
        if not vector_float and _has_float_math(block):
            stats["scalar_float_blocks"] += 1
            continue
        lanes = max(vector_bits // _write_bits(block), 1)
        loops = sch.get_loops(block_rv)
        kinds = [iv.iter_type for iv in block.iter_vars]
        if len(loops) != len(kinds):
            continue
        if _is_reduction(block):
            spatial = [loop for loop, kind in zip(loops, kinds) if kind == tirx.IterVar.DataPar]
            reduce = [loop for loop, kind in zip(loops, kinds) if kind == tirx.IterVar.CommReduce]
            if not spatial or not reduce:
                continue
            window = [_extent(sch, loop) for loop in reduce[1:]]
            pointwise = len(spatial) >= 2 and bool(window) and all(e == 1 for e in window) and (_extent(sch, spatial[-1]) or 0) < lanes
            # vectors as wide as the narrow operands load whole (128 x int8 on HVX), down to half an accumulator vector
            wide, smallest = max(vector_bits // _read_bits(block), lanes), max(lanes // 2, 2)
            if _on_stack(sch, block.writes[0].source):
                # a sum into a small intermediate (TVM puts it on the stack) takes whole vectors
                # only: half-vector accumulations there gave wrong sums under qemu-hexagon (the
                # 16 and 48-channel pools of a DenseNet block's end)
                smallest = lanes
            strided = _strided_row(block, spatial_vars=[iv.var for iv, kind in zip(block.iter_vars, kinds) if kind == tirx.IterVar.DataPar])
            # a row that no vector width divides, or a strided one, would make gathers (a vector over a
            # fused y*x loop crossing rows has `// W` indices, which TVM vectorizes lane by lane): vectors
            # over the output channels instead, when the conv allows
            short = _vector_width(_extent(sch, spatial[-1]) or 0, wide, smallest) == 0
            work = _work(sch, loops)
            if (strided or short) and _vectorize_channels(sch, block_rv, wide, smallest, constant_params, relayout,
                                                          parallel_work=work if parallel else 0, stats=stats):
                stats["vectorized_loops"] += 1
                continue
            if pointwise:  # a 1x1 convolution: its rows are contiguous too, so one loop over the image
                spatial = [*spatial[:-2], sch.fuse(spatial[-2], spatial[-1])]
            innermost = spatial[-1]
            sch.reorder(*spatial[:-1], *reduce, innermost)
            tailed = len(tails)
            if _vectorize_innermost(sch, innermost, wide, outer_anchor=reduce, smallest=smallest, tails=tails):
                stats["vectorized_loops"] += 1
            outer = len(spatial) - 1  # the spatial loops around the reduction (and its init), but the vectorized one
            if parallel and _parallel_outer(sch, sch.get_loops(block_rv)[:outer], work):
                stats["parallel_loops"] += 1
                outer = 1  # fused into one
            init = sch.decompose_reduction(block_rv, sch.get_loops(block_rv)[outer])
            if len(tails) > tailed:  # the init's copy of the loop over vectors has the same tail
                tails.append((sch.get_loops(init)[-2], tails[-1][1]))
        else:
            cuts = _concat_cuts(block)
            if cuts is not None:
                # the loops outside the one the pieces partition run parallel (a large one), fused first
                if parallel and _parallel_outer(sch, loops[:-1], _work(sch, loops)):
                    stats["parallel_loops"] += 1
                if _vectorize_pieces(sch, loops[-1], cuts, lanes):
                    stats["vectorized_loops"] += 1
                    stats["concat_blocks"] += 1
                continue
            if _gathers(block):
                stats["gathers_left_scalar"] += 1
                if parallel and _parallel_elementwise(sch, block_rv, PARALLEL_MIN_WORK // SCALAR_ELEMENT_COST, scalar=True):
                    stats["parallel_loops"] += 1
                continue
            # a requantize stage's int64 products on half a vector: LLVM splits them into scalar
            # 64-bit multiplies (the 16-channel stem: 4620 instructions, 20% HVX); whole vectors only
            smallest = lanes if _kept_stage(block) else 0
            # a quantize (float math stored as 8-bit) may take vectors down to one float register
            # when the channels are no whole number of 8-bit vectors and rows cannot fuse (80
            # channels: 5 x 16 lanes, not 64 + a peeled 16 off the thread pool); fused rows first:
            # 16 channels as 16 x uint8 vectors ran 9x slower than 64-lane fused rows (LLVM gathers)
            float_register = max(vector_bits // 32, 2) if not smallest and _write_bits(block) < 32 and _has_float_math(block) else 0
            scalar = False
            # the innermost loop alone, when a vector width divides it: fused with the loops around
            # it, a vector crosses rows and TVM vectorizes its `fused // W` indices lane by lane;
            # except (pixel, channel) of a block whose accesses stay runs when fused (_vectorize_fused_rows)
            if not _vector_width(_extent(sch, loops[-1]) or 0, lanes, smallest):
                if _vectorize_fused_rows(sch, block_rv, loops, lanes, smallest):
                    stats["vectorized_loops"] += 1
                    stats["fused_row_blocks"] += 1
                elif float_register and _vectorize_innermost(sch, loops[-1], lanes, smallest=float_register):
                    stats["vectorized_loops"] += 1
                elif _vectorize_with_tail(sch, loops[-1], lanes, smallest, 0 if 'T.Cast("int64"' in block.body.script() else lanes // 2):
                    stats["vectorized_loops"] += 1
                    stats["tails_peeled"] += 1
                    continue  # (the partition made blocks of their own: no parallel loop over them)
                else:
                    stats["rows_left_scalar"] += 1
                    scalar = True
            elif _vectorize_innermost(sch, loops[-1], lanes, smallest=smallest):
                stats["vectorized_loops"] += 1
            # a large elementwise pass shares the thread pool too; a scalar one from fewer elements
            # (the int8 CNNs' input quantize + NCHW -> NHWC + pad, 38K bytes: 17.6 us on one thread)
            if parallel and _parallel_elementwise(sch, block_rv, PARALLEL_MIN_WORK // SCALAR_ELEMENT_COST if scalar else 0, scalar):
                stats["parallel_loops"] += 1
    stats["tails_peeled"] += _peel_tails(sch, tails)
    return sch.mod["main"], stats, relayout


def _parallel_elementwise(sch: Any, block_rv: Any, min_work: int = 0, scalar: bool = False) -> bool:
    """An elementwise block of at least `min_work` (default PARALLEL_MIN_WORK) elements: its loops
    outside the vector (and unrolled) ones fused into one parallel loop; a scalar block's outside
    its two innermost (one fused loop over every element pays a division per element)."""
    from tvm import tirx

    loops = sch.get_loops(block_rv)
    outer = []
    for loop in loops[:-2] if scalar and len(loops) > 2 else loops:
        if sch.get(loop).kind != tirx.ForKind.SERIAL:
            break
        outer.append(loop)
    return _parallel_outer(sch, outer, _work(sch, loops), min_work)


def _gemm_blocks(sch: Any, constant_params: frozenset[int]) -> list[str]:
    """The names of the kernel's matmul-shaped reductions (gemm.py) and depthwise convs (depthwise.py)."""
    return [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))
            if _is_reduction(sch.get(b)) and (match(sch, b, constant_params) is not None or match_depthwise(sch, b) is not None)]


def _operand_producers(sch: Any, names: list[str], constant_params: frozenset[int], vector_bits: int) -> set[str]:
    """The blocks that write the matmuls' operands (an attention's head transposes, a conv's pad): kept
    as copies, so each matmul reads plain [.., m, k] and [.., k, n] tensors, not gathers through the
    transposes or padding conditions. Except a plain copy (a 1x1 conv's `pad_temp`, which pads
    nothing) of an operand the tiles read once (one column tile, no conv window): inlined, so the
    matmul reads the copy's source and the pass over memory is gone; what writes that source (a
    BatchNorm + ReLU) is kept in its place, as the matmul must read a plain tensor."""
    keep = set()
    for name in names:
        block_rv = sch.get_sblock(name)
        gemm = match(sch, block_rv, constant_params)
        read_once = (gemm is not None and gemm.n <= max(vector_bits // 32, 1) * max(COLUMN_VECTOR_CHOICES)
                     and _work(sch, gemm.reduce) == gemm.k)
        for producer in sch.get_producers(block_rv):
            block = sch.get(producer)
            copy = len(block.reads) == 1 and _fusable_accesses(block, [_extent(sch, loop) for loop in sch.get_loops(producer)]) is False
            if read_once and copy and block.writes[0].source.same_as(sch.get(block_rv).reads[0].source):
                keep |= {sch.get(p).name_hint for p in sch.get_producers(producer)}
            else:
                keep.add(block.name_hint)
    return keep


def _tile_gemms(sch: Any, names: list[str], vector_bits: int, constant_params: frozenset[int], parallel: bool, features: frozenset[str],
                stats: dict[str, int], relayout: dict[int, Relayout]) -> tuple[Any, set[str]]:
    """Each matmul or depthwise conv of the kernel in register tiles with its elementwise epilogue
    (gemm.py, depthwise.py). Returns the schedule and the names of the blocks it scheduled; a block
    the tiles do not fit is left to the generic schedule."""
    done: set[str] = set()
    lanes = max(vector_bits // 32, 1)
    # 512-bit vectors (AVX-512) fall back to 256-bit ones for a matmul whose columns only those divide
    # (MobileNetV2's 1000 classes: 0.18 ms generic, 0.064 ms tiled on 8 lanes)
    widths = (lanes, lanes // 2) if vector_bits >= 512 else (lanes,)
    for name in names:
        tiled = next((t for t in (_tiled(sch, name, width, constant_params, parallel, features) for width in widths) if t), None)
        if tiled is None:  # a shape the tiles do not fit: the generic schedule
            continue
        sch, gemm_stats, gemm_relayout, scheduled = tiled
        for key, value in gemm_stats.items():
            stats[key] = stats.get(key, 0) + value
        stats["vectorized_loops"] += 1
        relayout.update(gemm_relayout)
        done |= scheduled
    return sch, done


def _tiled(sch: Any, name: str, lanes: int, constant_params: frozenset[int], parallel: bool,
           features: frozenset[str]) -> tuple[Any, dict[str, int], dict[int, Relayout], set[str]] | None:
    """A copy of the schedule with block `name` (a matmul or a depthwise conv) in register tiles of
    `lanes`-wide vectors, with the stats, weight relayout and scheduled block names; None when the
    tiles do not fit."""
    trial = sch.copy()
    block_rv = trial.get_sblock(name)
    gemm = match(trial, block_rv, constant_params)  # again: inlining may have changed the block
    depthwise = match_depthwise(trial, block_rv) if gemm is None else None
    if gemm is not None and gemm.b_dtype == "decoded" and lanes > 8:
        return None  # int4 codes decoded into 16 lanes: LLVM's shuffles made MiniLM int4-weight 41 -> 237 ms
    try:
        if gemm is not None:
            return (trial, *schedule_gemm(trial, block_rv, gemm, lanes, features, parallel, PARALLEL_MIN_WORK))
        if depthwise is not None:
            stats, scheduled = schedule_depthwise(trial, block_rv, depthwise, lanes, features, parallel, PARALLEL_MIN_WORK)
            return trial, stats, {}, scheduled
    except Exception:  # noqa: BLE001 - a shape the tiles do not fit
        return None
    return None


class Vectorize(GraphPass):
    """For targets with a vector unit (`vector_bits` in the profile), schedules every TIR kernel: inlines elementwise producers (padding, casts, float chains, the requantize chain; the integer requantize's int32 stages stay blocks) into their consumers; vectorizes each reduction's innermost contiguous spatial loop by whole vectors of its narrowest operand (HVX: 128 x int8) down to half an accumulator vector, or a conv's output channels when its rows are strided or no width divides them (weights relaid channels-last at compile time); vectorizes an elementwise block's innermost loop when a width divides it and no access would be a gather, else its fused (pixel, channel) loops when every access stays a run or a per-channel vector. Blocks with float math stay scalar where the target vectorizes no float (Hexagon under qemu)."""

    name = "vectorize"

    def run(self, mod: Any, ctx: CompileContext) -> tuple[Any, dict[str, Any]]:
        from tvm import tirx

        totals = {"vector_bits": ctx.vector_bits, "parallel": ctx.parallel, "parallel_loops": 0, "kernels": 0, "kernels_vectorized": 0, "vectorized_loops": 0, "inlined": 0, "scalar_float_blocks": 0,
                  "gathers_left_scalar": 0, "gemm_kernels": 0, "dot_product_kernels": 0, "depthwise_kernels": 0, "rows_left_scalar": 0, "fused_row_blocks": 0, "tails_peeled": 0, "concat_blocks": 0,
                  "failed": 0}
        if ctx.vector_bits <= 0:
            return mod, {**totals, "skipped": "the target profile gives no vector width"}
        result = mod.clone()
        constants = _constant_params(mod)
        relayouts: dict[Any, dict[int, Relayout]] = {}
        for gvar, func in mod.functions.items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            totals["kernels"] += 1
            if is_scheduled(func):  # tuned: its recorded schedule stays as measured
                totals["tuned_kept"] = totals.get("tuned_kept", 0) + 1
                continue
            try:
                scheduled, stats, relayout = schedule_kernel(func, ctx.vector_bits, ctx.vector_float, constants.get(gvar, frozenset()),
                                                             parallel=ctx.parallel, features=frozenset(ctx.features))
            except Exception:  # noqa: BLE001 - a kernel the schedule cannot handle keeps TVM's default
                totals["failed"] += 1
                continue
            for key, value in stats.items():
                totals[key] += value
            totals["kernels_vectorized"] += int(stats["vectorized_loops"] > 0)
            result.update_func(gvar, scheduled)
            if relayout:
                relayouts[gvar] = relayout
        totals["weights_relaid"] = sum(len(r) for r in relayouts.values())
        return (_with_relaid_weights(result, relayouts) if relayouts else result), totals


def default_schedule(mod: Any, name: str, ctx: CompileContext) -> Any:
    """Kernel `name` of `mod` as this pass builds it when no tuning record schedules it: what `socc
    tune` times a record against. Unchanged when the target has no vector width or the schedule fails."""
    func = mod[name]
    if ctx.vector_bits <= 0:
        return func
    try:
        return schedule_kernel(func, ctx.vector_bits, ctx.vector_float, _constant_params(mod).get(mod.get_global_var(name), frozenset()),
                               parallel=ctx.parallel, features=frozenset(ctx.features))[0]
    except Exception:  # noqa: BLE001 - as in the pass: the kernel keeps TVM's default
        return func


def _with_relaid_weights(mod: Any, relayouts: dict[Any, dict[int, Relayout]]) -> Any:
    """The module with each relaid kernel under a fresh GlobalVar of its new signature, and main
    calling it with its constant arguments transposed to match."""
    import tvm
    from tvm import relax

    renamed = {}
    for gvar in relayouts:
        fresh = tvm.ir.GlobalVar(gvar.name_hint)
        relax.expr._update_type(fresh, mod[gvar].ty)  # what BlockBuilder.add_func does (no public API)
        renamed[gvar] = fresh
    result = tvm.IRModule({}, attrs=mod.attrs, global_infos=mod.global_infos)
    for gvar, func in mod.functions_items():
        if gvar in renamed:
            result[renamed[gvar]] = func
        elif gvar.name_hint == "main":
            result[gvar] = _transpose_constants(func, relayouts, renamed)
        else:
            result[gvar] = func
    return result


def _call_tir_sites(func: Any) -> list[Any]:
    from tvm import relax

    call_tir = _op("relax.call_tir")
    return [b.value for block in func.body.blocks for b in block.bindings
            if isinstance(b.value, relax.Call) and b.value.op.same_as(call_tir)]


def _op(name: str) -> Any:
    import tvm

    return tvm.ir.Op.get(name)


def _constant_params(mod: Any) -> dict[Any, frozenset[int]]:
    """Per kernel, the parameters that every call in main passes as a constant."""
    from tvm.ir.expr import Constant

    found: dict[Any, frozenset[int]] = {}
    for call in _call_tir_sites(mod["main"]):
        gvar, args = call.args[0], call.args[1].fields
        constant = frozenset(i for i, arg in enumerate(args) if isinstance(arg, Constant))
        found[gvar] = found[gvar] & constant if gvar in found else constant
    return found


def _transpose_constants(main: Any, relayouts: dict[Any, dict[int, Relayout]], renamed: dict[Any, Any]) -> Any:
    """main calling each relaid kernel by its new GlobalVar, its constant arguments transposed as the new parameter layout says."""
    from tvm import relax

    call_tir = _op("relax.call_tir")

    @relax.expr_functor.mutator
    class Transposer(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = self.visit_expr_post_order(call)
            if not call.op.same_as(call_tir) or call.args[0] not in relayouts:
                return call
            fields = list(call.args[1].fields)
            for index, relayout in relayouts[call.args[0]].items():
                fields[index] = relax.const(relayout.apply(fields[index].value.numpy()))
            return relax.Call(call.op, [renamed[call.args[0]], relax.Tuple(fields), *call.args[2:]], call.attrs, call.ty_args)

    return Transposer().visit_expr(main)
