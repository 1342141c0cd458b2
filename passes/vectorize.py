"""vectorize: vector code for targets with a vector unit (HVX, NEON), by a schedule on each TIR kernel."""

from __future__ import annotations

from typing import Any

from .base import CompileContext, GraphPass


def _has_float_math(block: Any) -> bool:
    """True when the block computes in floating point: a float buffer, cast or constant in it."""
    regions = [*block.reads, *block.writes]
    if any(str(region.source.dtype).startswith(("float", "bfloat")) for region in regions):
        return True
    return "float" in block.body.script()  # casts and constants inside the expression (no Python TIR visitor in 0.27)


def _write_bits(block: Any) -> int:
    import tvm

    return max((int(region.source.dtype.bits) for region in block.writes), default=32)


def _is_reduction(block: Any) -> bool:
    from tvm import tirx

    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in block.iter_vars)


def _inline_elementwise(sch: Any) -> int:
    """Inlines every integer block that only feeds others (padding, casts) into its consumers.

    Float blocks stay apart: inlined, `a * b + c` becomes one expression that LLVM contracts to a
    fused multiply-add on some targets and not others, and int8 builds must agree bit for bit."""
    inlined = 0
    changed = True
    while changed:
        changed = False
        root = sch.get_sblock("root")
        outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
        for block_rv in sch.get_child_blocks(root):
            block = sch.get(block_rv)
            if _is_reduction(block) or block.name_hint in outputs or _has_float_math(block):
                continue
            try:
                sch.compute_inline(block_rv)
            except Exception:  # noqa: BLE001 - not inlinable (e.g. read twice at different points): keep it
                continue
            inlined += 1
            changed = True
            break
    return inlined


def _extent(sch: Any, loop_rv: Any) -> int | None:
    from tvm import tirx

    extent = sch.get(loop_rv).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _vectorize_innermost(sch: Any, loop_rv: Any, lanes: int, outer_anchor: Any = None) -> bool:
    """Splits `loop_rv` into vectors of `lanes` (or half that when it divides the extent) and vectorizes them.

    A loop shorter than half a vector stays scalar: LLVM's Hexagon backend lowers vectors under 64
    bytes to scalar code anyway."""
    extent = _extent(sch, loop_rv)
    if extent is None or extent < max(lanes // 2, 2):
        return False
    widths = [w for w in (lanes, lanes // 2) if w >= 2 and extent % w == 0]
    if not widths:
        return False  # whole or half vectors only: odd widths (24 x i32) gave wrong int8 results under qemu-hexagon
    width = widths[0]
    if extent > width:
        outer, inner = sch.split(loop_rv, factors=[None, width])
        if outer_anchor is not None:
            sch.reorder(outer, *outer_anchor, inner)
        loop_rv = inner
    sch.vectorize(loop_rv)
    return True


def schedule_kernel(func: Any, vector_bits: int, vector_float: bool) -> tuple[Any, dict[str, int]]:
    """The kernel with elementwise producers inlined and its innermost contiguous loops vectorized."""
    from tvm import s_tir, tirx

    stats = {"inlined": 0, "vectorized_loops": 0, "scalar_float_blocks": 0}
    sch = s_tir.Schedule(func)
    stats["inlined"] = _inline_elementwise(sch)
    for block_rv in sch.get_child_blocks(sch.get_sblock("root")):
        block = sch.get(block_rv)
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
            if len(spatial) >= 2 and window and all(e == 1 for e in window) and (_extent(sch, spatial[-1]) or 0) < lanes:
                # a 1x1 convolution: its rows are contiguous too, so one loop over the image is a vector loop
                spatial = [*spatial[:-2], sch.fuse(spatial[-2], spatial[-1])]
            innermost = spatial[-1]
            sch.reorder(*spatial[:-1], *reduce, innermost)
            if _vectorize_innermost(sch, innermost, lanes, outer_anchor=reduce):
                stats["vectorized_loops"] += 1
            sch.decompose_reduction(block_rv, sch.get_loops(block_rv)[len(spatial) - 1])
        else:
            fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            if _vectorize_innermost(sch, fused, lanes):
                stats["vectorized_loops"] += 1
    return sch.mod["main"], stats


class Vectorize(GraphPass):
    """For targets with a vector unit (`vector_bits` in the profile), schedules every TIR kernel: inlines integer elementwise producers (padding, casts) into their consumers, moves each reduction's loops outside its innermost spatial loop (init hoisted) and vectorizes that loop by the vector width for the accumulator type (HVX 1024 bits: 32 x int32); elementwise kernels are fused to one loop and vectorized. Blocks with float math stay scalar where the target vectorizes no float (Hexagon under qemu)."""

    name = "vectorize"

    def run(self, mod: Any, ctx: CompileContext) -> tuple[Any, dict[str, Any]]:
        from tvm import tirx

        totals = {"kernels": 0, "kernels_vectorized": 0, "vectorized_loops": 0, "inlined": 0, "scalar_float_blocks": 0, "failed": 0}
        if ctx.vector_bits <= 0:
            return mod, {**totals, "skipped": "the target profile gives no vector width"}
        result = mod.clone()
        for gvar, func in mod.functions.items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            totals["kernels"] += 1
            try:
                scheduled, stats = schedule_kernel(func, ctx.vector_bits, ctx.vector_float)
            except Exception:  # noqa: BLE001 - a kernel the schedule cannot handle keeps TVM's default
                totals["failed"] += 1
                continue
            for key, value in stats.items():
                totals[key] += value
            totals["kernels_vectorized"] += int(stats["vectorized_loops"] > 0)
            result.update_func(gvar, scheduled)
        return result, totals
