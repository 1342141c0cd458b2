"""winograd: 3x3 stride-1 float convolutions as Winograd F(4x4, 3x3) or F(2x2, 3x3) (Lavin & Gray, 2015).

Rewrites an NHWC/HWIO `conv2d(x, W)` (float32, 3x3, stride 1, no dilation, one group, constant W,
channels that whole vectors divide) into

    V = winograd_input(x)     [a^2, P, C]   each a x a input tile d (stride m, padding inside): B^T d B
    M = matmul(V, U)          [a^2, P, K]   U = G g G^T [a^2, C, K], transformed at compile time
    y = winograd_output(M)    [N, OH, OW, K]  each m x m output tile: A^T M A

with output tiles of m = 4 or 2 (a = m + 2), P = N * ceil(OH/m) * ceil(OW/m) tiles (a tile past
the edge is cropped). The matmuls do a^2 multiply-adds per tile and channel pair where the direct
conv does 9 m^2: F(4x4) 4x fewer, F(2x2) 2.25x fewer; the transforms are additions and small
constant multiplies. The weight grows a^2/9 (F(4x4): 4x), so each conv gets the transform whose
estimated time (multiply-adds plus weight bytes, WEIGHT_BYTE_COST) is least, and only when that is
at most MAX_COST_RATIO of the direct conv's: ResNet's small last stage stays direct.

The bias, activation and residual add that follow fuse into the output transform's kernel
(fuse-kernels); the input transform is a kernel of its own (it reads each input pixel up to
(a/m)^2 times), and vectorize gives both transforms their schedule (whole vectors along the
channels, the tile's elements unrolled). Float results differ from the direct conv by rounding:
F(2x2)'s constants are 0, +-1, +-1/2; F(4x4)'s reach 8 and 1/24 (measured against onnxruntime:
max relative error 4e-6 on the ResNet-class bench model, 2e-6 direct).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .base import CompileContext, GraphPass


@dataclasses.dataclass(frozen=True)
class Transform:
    """Winograd F(m x m, 3 x 3): an m x m output tile from an (m + 2) x (m + 2) input tile, y = A^T [(G g G^T) * (B^T d B)] A."""

    m: int
    b_t: np.ndarray  # [alpha, alpha]
    g: np.ndarray  # [alpha, 3]
    a_t: np.ndarray  # [m, alpha]

    @property
    def alpha(self) -> int:
        return self.m + 2

    def work(self, height: int, width: int) -> int:
        """Multiply-adds per (input, output) channel pair over an output of height x width."""
        return self.alpha * self.alpha * _tiles(height, self.m) * _tiles(width, self.m)

    def cost(self, batch: int, height: int, width: int) -> float:
        """Its time per channel pair in multiply-adds: the matmuls' plus the weight's bytes (alpha^2 floats)."""
        return batch * self.work(height, width) + self.alpha * self.alpha * 4 * WEIGHT_BYTE_COST


def direct_cost(batch: int, height: int, width: int) -> float:
    """The direct 3x3 conv's time per channel pair in multiply-adds (as Transform.cost)."""
    return batch * 9 * height * width + 9 * 4 * WEIGHT_BYTE_COST


F2 = Transform(2, np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64),
               np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64),
               np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64))
F4 = Transform(4, np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                            [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=np.float64),
               np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=np.float64),
               np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], dtype=np.float64))
TRANSFORMS = {2: F2, 4: F4}
DEFAULT_TILES = (2, 4)  # the output tile edges a conv may get (the one estimated fastest, below)
# The choice is by estimated time: multiply-adds, plus the weight's bytes, which stream from
# memory in every call once a model's weights outgrow the caches (a 2.36 MB 3x3 conv of ResNet's
# last stage: 0.051 ms with its weight in cache, 0.109 ms flushed, at ~100 G multiply-adds/s: a
# byte costs about 2.5 multiply-adds). F(4x4)'s weight is 4x the direct conv's, F(2x2)'s 16/9x: on
# a small output (ResNet's 3x3 last stage) the direct conv wins, as measured (F(2x2) 23% slower there).
WEIGHT_BYTE_COST = 2.5
# Rewritten only where the estimate is at most this fraction of the direct conv's (the transforms
# and two more kernel calls are not in it)
MAX_COST_RATIO = 0.8
INPUT_BLOCK, OUTPUT_BLOCK = "winograd_input", "winograd_output"
# TVM's fusion kinds: nothing fuses into the input transform's kernel; only elementwise consumers
# (bias, activation, residual add) join the output transform's (a DenseNet's concatenate stays its own)
OPAQUE, OUT_ELEMENTWISE_FUSABLE = 8, 4


def transformed_weight(weight_hwio: np.ndarray, transform: Transform = F2) -> np.ndarray:
    """G g G^T of each 3x3 filter: HWIO [3, 3, C, K] -> [alpha^2, C, K] (computed in float64)."""
    u = np.einsum("ar,rsck,bs->abck", transform.g, weight_hwio.astype(np.float64), transform.g)
    return np.ascontiguousarray(u.reshape(transform.alpha * transform.alpha, *weight_hwio.shape[2:]).astype(np.float32))


def _combine(terms: list[tuple[float, Any]]) -> Any:
    """sum(coefficient * term): additions and subtractions for +-1 (a positive term first, so no
    negation), a multiply for any other coefficient, no term for 0."""
    total = None
    for coefficient, term in sorted((t for t in terms if t[0] != 0), key=lambda t: t[0] < 0):
        if abs(coefficient) != 1:
            term = term * float(abs(coefficient))
        if total is None:
            total = term if coefficient > 0 else -term
        else:
            total = total + term if coefficient > 0 else total - term
    return total


def _select(index: Any, values: list[Any]) -> Any:
    """values[index] for a loop variable `index` (a chain of Selects; scheduled unrolled, each folds)."""
    from tvm import tirx

    result = values[-1]
    for position in range(len(values) - 2, -1, -1):
        result = tirx.Select(index == position, values[position], result)
    return result


def input_transform(x: Any, pad_top: int, pad_left: int, tiles_y: int, tiles_x: int, transform: Transform) -> Any:
    """TE: V[e, p, c] = (B^T d B)[e // alpha, e % alpha] of tile p's input d (zero outside the image).

    Outside the image the load is clamped to the edge and selected away (no branch): every load of
    a tile is then unconditional, and LLVM loads each input vector once for all alpha^2 outputs."""
    from tvm import te, tirx

    batch, height, width, channels = (int(d) for d in x.shape)
    alpha, m, b_t = transform.alpha, transform.m, transform.b_t

    def element(e: Any, p: Any, c: Any) -> Any:
        image, tile = p // (tiles_y * tiles_x), p % (tiles_y * tiles_x)
        top, left = tile // tiles_x * m - pad_top, tile % tiles_x * m - pad_left

        def pixel(i: int, j: int) -> Any:
            row, col = top + i, left + j
            inside = tirx.all(row >= 0, row < height, col >= 0, col < width)
            clamped = x[image, tirx.max(tirx.min(row, height - 1), 0), tirx.max(tirx.min(col, width - 1), 0), c]
            return tirx.Select(inside, clamped, tirx.const(0, x.dtype))

        d = [[pixel(i, j) for j in range(alpha)] for i in range(alpha)]
        rows = [[_combine([(b_t[a, i], d[i][j]) for i in range(alpha)]) for j in range(alpha)] for a in range(alpha)]
        values = [_combine([(b_t[b, j], rows[a][j]) for j in range(alpha)]) for a in range(alpha) for b in range(alpha)]
        return _select(e, values)

    return te.compute((alpha * alpha, batch * tiles_y * tiles_x, channels), element, name=INPUT_BLOCK)


def output_transform(m_tiles: Any, batch: int, height: int, width: int, transform: Transform) -> Any:
    """TE: y[n, r, s, k] = (A^T M A)[r % m, s % m] of output pixel (r, s)'s tile of M."""
    from tvm import te

    alpha, m, a_t = transform.alpha, transform.m, transform.a_t
    tiles_y, tiles_x = _tiles(height, m), _tiles(width, m)

    def element(n: Any, r: Any, s: Any, k: Any) -> Any:
        p = (n * tiles_y + r // m) * tiles_x + s // m
        tile = [[m_tiles[a * alpha + b, p, k] for b in range(alpha)] for a in range(alpha)]
        columns = [[_combine([(a_t[u, a], tile[a][b]) for a in range(alpha)]) for b in range(alpha)] for u in range(m)]
        values = [_combine([(a_t[v, b], columns[u][b]) for b in range(alpha)]) for u in range(m) for v in range(m)]
        return _select(r % m * m + s % m, values)

    return te.compute((batch, height, width, int(m_tiles.shape[2])), element, name=OUTPUT_BLOCK)


def _tiles(extent: int, m: int) -> int:
    """Output tiles of edge m along an edge (the last one cropped when m does not divide it)."""
    return -(-extent // m)


def _choice(call: Any, lanes: int) -> tuple[str, Transform | None]:
    """The transform (of DEFAULT_TILES' output tile edges) with the least estimated cost that rewrites
    this conv2d call, or why none does."""
    from tvm.ir.expr import Constant

    attrs = call.attrs
    x, w = call.args
    if str(attrs.data_layout) != "NHWC" or str(attrs.kernel_layout) != "HWIO":
        return "layout", None
    if str(x.ty.dtype) != "float32" or str(w.ty.dtype) != "float32" or str(attrs.out_dtype) not in ("None", "", "void", "float32"):
        return "dtype", None
    if not isinstance(w, Constant):
        return "weight_not_constant", None
    if [int(s) for s in attrs.strides] != [1, 1] or [int(d) for d in attrs.dilation] != [1, 1] or int(attrs.groups) != 1:
        return "stride_dilation_groups", None
    kh, kw, channels, filters = (int(d) for d in w.ty.shape.values)
    if (kh, kw) != (3, 3):
        return "kernel_not_3x3", None
    out = call.ty.shape.values
    if not all(isinstance(d, int) or hasattr(d, "value") for d in out):
        return "dynamic_shape", None
    batch, height, width, _ = (int(d) for d in out)
    if channels % lanes or filters % lanes:
        return "channels_not_vectors", None
    transform = min((TRANSFORMS[m] for m in DEFAULT_TILES), key=lambda t: (t.cost(batch, height, width), t.m))
    if transform.cost(batch, height, width) > MAX_COST_RATIO * direct_cost(batch, height, width):
        return "not_faster", None
    return "", transform


class Winograd(GraphPass):
    """Rewrites float 3x3 stride-1 NHWC convolutions into Winograd F(4x4, 3x3) or F(2x2, 3x3), whichever is estimated faster (and only where it beats the direct conv): an input transform, 36 or 16 batched matmuls against the compile-time transformed weight (4x or 2.25x fewer multiply-adds), an output transform that takes the bias and activation."""

    name = "winograd"

    def run(self, mod: Any, ctx: CompileContext) -> tuple[Any, dict[str, Any]]:
        from tvm import relax

        stats: dict[str, Any] = {"convs_rewritten": 0, "multiply_adds_before": 0, "multiply_adds_after": 0,
                                 "weight_bytes_before": 0, "weight_bytes_after": 0, "transforms": {}, "kept": {}}
        if not ctx.vector_float or ctx.vector_bits <= 0:
            return mod, {**stats, "skipped": "the target vectorizes no float (its kernels are scalar)"}
        lanes = ctx.vector_bits // 32
        kept: dict[str, int] = stats["kept"]
        by_tile: dict[str, int] = stats["transforms"]

        @relax.expr_functor.mutator
        class Rewriter(relax.PyExprMutator):
            def visit_call_(self, call: Any) -> Any:
                call = super().visit_call_(call)
                if getattr(call.op, "name", "") != "relax.nn.conv2d":
                    return call
                reason, transform = _choice(call, lanes)
                if transform is None:
                    kept[reason] = kept.get(reason, 0) + 1
                    return call
                return self._rewrite(call, transform)

            def _rewrite(self, call: Any, transform: Transform) -> Any:
                x, w = call.args
                weight = w.value.numpy()
                batch, height, width, filters = (int(d) for d in call.ty.shape.values)
                channels = weight.shape[2]
                pad_top, pad_left = (int(p) for p in call.attrs.padding[:2])
                u = transformed_weight(weight, transform)
                tiles_y, tiles_x = _tiles(height, transform.m), _tiles(width, transform.m)
                v = self.builder_.emit_te(lambda data: input_transform(data, pad_top, pad_left, tiles_y, tiles_x, transform), x,
                                          primfunc_name_hint=INPUT_BLOCK)
                m = self.builder_.emit(relax.op.matmul(v, relax.const(u)))
                stats["convs_rewritten"] += 1
                name = f"F{transform.m}x{transform.m}"
                by_tile[name] = by_tile.get(name, 0) + 1
                stats["multiply_adds_before"] += batch * height * width * 9 * channels * filters
                stats["multiply_adds_after"] += batch * transform.work(height, width) * channels * filters
                stats["weight_bytes_before"] += weight.nbytes
                stats["weight_bytes_after"] += u.nbytes
                return self.builder_.call_te(lambda tiles: output_transform(tiles, batch, height, width, transform), m,
                                             primfunc_name_hint=OUTPUT_BLOCK)

        rewriter = Rewriter(mod)
        for gvar, func in mod.functions.items():
            if isinstance(func, relax.Function) and not (func.attrs and func.attrs.get("Primitive")):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        result = rewriter.builder_.get()
        result = _mark_fusion_kind(result, {INPUT_BLOCK: OPAQUE, OUTPUT_BLOCK: OUT_ELEMENTWISE_FUSABLE})
        return relax.transform.DeadCodeElimination()(result), stats


def _mark_fusion_kind(mod: Any, kinds: dict[str, int]) -> Any:
    """The transforms' kernels with their TVM fusion kind (an `op_pattern` attribute, which the
    legalize pass's AnnotateTIROpPattern keeps): generic fusion would otherwise pull the ReLU before
    an input transform into its kernel (each input pixel then computed up to 4 times) and join a
    concatenate after an output transform."""
    from tvm import tirx

    for gvar, func in list(mod.functions.items()):
        kind = next((k for prefix, k in kinds.items() if gvar.name_hint.startswith(prefix)), None)
        if isinstance(func, tirx.PrimFunc) and kind is not None:
            mod[gvar] = func.with_attr("op_pattern", kind)
    return mod


def schedule_transforms(sch: Any, lanes: int, parallel_min_work: int | None) -> set[str]:
    """Schedules the Winograd transform blocks of a kernel (vectorize calls this first); returns the
    names of the blocks it scheduled. The output transform takes its elementwise consumers (bias,
    activation, residual add) in first; each transform then runs whole vectors along the channels
    with the tile's elements unrolled, so each input (or M) vector is loaded once per tile; the
    loop over tiles runs on the thread pool when `parallel_min_work` (None: no pool) elements or more
    are written."""
    from .gemm import consumer_chain

    done: set[str] = set()
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    for name in names:
        if name.startswith(OUTPUT_BLOCK):
            block_rv = sch.get_sblock(name)
            for consumer in consumer_chain(sch, block_rv):
                sch.reverse_compute_inline(consumer)
            tiles = next(r.source for r in sch.get(block_rv).reads if len(r.source.shape) == 3)  # M [alpha^2, P, K]
            alpha = math.isqrt(int(tiles.shape[0]))
            n, r, s, k = sch.get_loops(block_rv)
            r_outer, r_inner = sch.split(r, factors=[None, alpha - 2])
            s_outer, s_inner = sch.split(s, factors=[None, alpha - 2])
            k_outer, k_inner = sch.split(k, factors=[None, lanes])
            sch.reorder(n, r_outer, s_outer, k_outer, r_inner, s_inner, k_inner)
            sch.unroll(r_inner)
            sch.unroll(s_inner)
            sch.vectorize(k_inner)
            if _worth_parallel(sch, block_rv, parallel_min_work):
                sch.parallel(sch.fuse(n, r_outer))
            done.add(name)
        elif name.startswith(INPUT_BLOCK):
            block_rv = sch.get_sblock(name)
            e, p, c = sch.get_loops(block_rv)
            c_outer, c_inner = sch.split(c, factors=[None, lanes])
            sch.reorder(p, c_outer, e, c_inner)
            sch.unroll(e)
            sch.vectorize(c_inner)
            if _worth_parallel(sch, block_rv, parallel_min_work):
                sch.parallel(p)
            done.add(name)
    return done


def _worth_parallel(sch: Any, block_rv: Any, min_work: int | None) -> bool:
    if min_work is None:
        return False
    buffer = sch.get(block_rv).writes[0].source
    return int(np.prod([int(d) for d in buffer.shape])) >= min_work
