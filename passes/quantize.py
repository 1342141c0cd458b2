"""quantize: int8 post-training quantization, or int4 weight-only quantization, of `main`.

Runs after `fold-constants` (weights are constants) and before `fusion`. Off unless
`ctx.options["quantize"]` is "int8" or "int4-weight", or the model is already quantized in QDQ form
(QuantizeLinear/DequantizeLinear around its ops, as onnxruntime's quantize_static writes it): then
every conv2d/matmul fed by a per-tensor dequantize, with a weight exactly on a symmetric int8
per-channel grid, runs on the same integer kernels with the model's own scales and zero points.

int8 (calibrated). For each `conv2d(x, W)` (NCHW/OIHW or NHWC/HWIO) and `matmul(x, W)` with a constant
float32 weight:
    W  -> Wq = round(W / sw), int8, symmetric per output channel: sw[c] = max|W[c]| / 127
    x  -> xq = clip(round(x / sx) + zx), uint8 asymmetric or int8 symmetric (zx = 0); sx and zx
          come from the observer (`calibrate_method`) over streaming histograms of x on the
          calibration samples
    y  =  float(conv2d/matmul(xq, Wq, out_dtype=int32) - zx * sum(Wq over the reduction)) * (sx * sw)
The convolution or matmul runs in integer arithmetic with int32 accumulation (a nonzero zx pads
explicitly with zx, so the correction term is exact at the borders). What follows (rescale,
bias, activation) is float, and TVM's FuseOps fuses it with the next layer's quantize into the
producing kernel: a requantize, so tensors between quantized layers are stored as 8 bits. Where
a layer's output reaches the next quantize through only its bias and a ReLU/clip, and nothing
else takes it, that chain is one multiply-add and a clip (`requantize.float_requantize`; stat
`folded_requantizes`).
With `requantize="integer"` (the target's choice: units without float vectors, like HVX), a
layer whose output reaches the next quantize through only its bias and a ReLU/clip requantizes
in integer arithmetic instead (requantize.py): no float is left in that kernel.
Embedding lookups `take(T, ids, axis=0)` of a constant float table become int8 rows with a
per-row scale (weight-only). Matmuls of two activations (attention) and everything else stay
float; the stats list every candidate with its mode and, for float ones, the reason.

int4-weight (no calibration). Each `matmul(x, W[K, N])` with a constant weight becomes one TE
kernel  y[.., n] = sum_k x[.., k] * (q[k, n] - z) * s[k // G, n]  where q is 4 bits packed two
per byte along K, s is float16 per group of G (`group_size`) along K, and z is a per-group 4-bit
zero point (asymmetric, the default) or 8 (`weight_scheme="symmetric"`). Without calibration
data the codes are rounded to nearest; with it (`calibration`), matmul weights are rounded by
GPTQ (gptq.py) on the Gram matrices of their inputs over the samples. The dequantized weight is computed
inside the reduction: float weights are never materialized. Embedding tables become int4 rows
grouped the same way along the row, or int8 per row with `int8_embeddings`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import CompileContext, GraphPass, PassInputError
from .gemm import int8_column_multiple, int8_reduction_multiple
from .requantize import Dequantized, fence, fold_output_biases, resolve
from .stats import constant_bytes

SCHEMES = ("int8", "int4-weight")
ACTIVATION_DTYPES = ("uint8", "int8")
GROUP_SIZES = (32, 64, 128)
# int4 weights: codes q in 0..15 per group; symmetric w = (q - 8) * s, asymmetric w = (q - z) * s
# (z a 4-bit zero point), scale-min w = q * s + m (m a float16 minimum, llama.cpp's Q4_1 layout:
# 12 bits a group more than asymmetric, and exact on weights that came from a Q4_1 file)
WEIGHT_SCHEMES = ("symmetric", "asymmetric", "scale-min")
# int4 default: per-group zero points cost 4 bits a group and gain accuracy (MiniLM cosine 0.966 -> 0.973)
DEFAULT_WEIGHT_SCHEME = "asymmetric"
# Ops that give the same result on quantized data as on float data quantized after them
# (quantize is monotonic, these only select or move values).
QUANTIZE_COMMUTING_OPS = ("relax.nn.max_pool2d", "relax.reshape", "relax.permute_dims", "relax.flatten")
# Relax op -> the ONNX op types it is imported from (names come from the source in graph order).
# (data, kernel, output) layouts a conv2d is quantized in: the model's, and convert-layout's NHWC
CONV_LAYOUTS = (("NCHW", "OIHW", "NCHW"), ("NHWC", "HWIO", "NHWC"))
SOURCE_OPS = {"relax.nn.conv2d": ("Conv",), "relax.matmul": ("MatMul", "Gemm"), "relax.take": ("Gather",)}
OP_TYPE_ALIASES = {"Conv": {"conv", "conv2d"}, "MatMul": {"matmul", "gemm", "dense"}, "Gather": {"gather", "take", "embedding"}}


@dataclasses.dataclass
class Layer:
    """One op that quantization may rewrite."""

    name: str
    op_type: str  # Conv | MatMul | Gather
    call: Any
    mode: str = "candidate"  # then int8 | int8-weight | int4-weight | float
    reason: str = ""
    scale: float = 0.0
    zero_point: int = 0
    dynamic_zero_point: Any = None  # a scalar 8-bit var: the input's zero point, computed at run time
    quantized_input: Any = None  # a pre-quantized model's own 8-bit input tensor (QDQ form)
    levels: int = 127  # the largest weight code (a pre-quantized model's grid may use fewer); OWN_CODES
    int4: tuple[Any, ...] | None = None  # GPTQ's or the model's packed codes, scales, zero points
    group: int = 0  # the int4 group length when it is the model's own (MatMulNBits block_size)

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"name": self.name, "op_type": self.op_type, "mode": self.mode}
        if self.reason:
            record["reason"] = self.reason
        if self.mode == "int8":
            record["input_scale"] = self.scale
            record["input_zero_point"] = "dynamic" if self.dynamic_zero_point is not None else self.zero_point
        return record


class Quantize(GraphPass):
    """Quantizes conv2d/matmul/embedding weights (int8 per channel or int4 groups) and, for int8, calibrated activations, so those ops run in integer arithmetic."""

    name = "quantize"

    def run(self, mod: Any, ctx: CompileContext) -> tuple[Any, dict[str, Any]]:
        options = ctx.options
        scheme = options.get("quantize")
        if not scheme:
            return _prequantized(mod, ctx)
        if scheme not in SCHEMES:
            raise PassInputError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")
        main = mod["main"]
        layers = find_layers(main, ctx.source_nodes)
        _apply_exclusions(layers, options.get("exclude_op_type", ()), options.get("exclude_node", ()))
        stats: dict[str, Any] = {"scheme": scheme, "weights_bytes_float": constant_bytes(mod)}
        if scheme == "int8":
            stats.update(_plan_int8(mod, layers, ctx))
            if options.get("max_accuracy_drop") is not None:
                stats["sensitivity"] = _keep_sensitive_in_float(mod, layers, ctx, float(options["max_accuracy_drop"]))
        else:
            stats.update(_plan_int4(mod, layers, ctx))
        activation_dtype = options.get("activation_dtype") or "uint8"
        multiples = (int8_column_multiple(ctx.features, ctx.vector_bits, activation_dtype), int8_reduction_multiple(ctx.features, activation_dtype))
        return _rewrite(mod, layers, options, stats, multiples, requantize_kernel=_requantize_kernel(ctx))


def _requantize_kernel(ctx: CompileContext) -> bool:
    """Whether a folded requantize is one kernel stage rounding with `lrint` (`float_requantize`):
    where the vector unit does float and no accelerator partition must see the graph ops (with
    float vectors, lrint is one conversion; HVX without them called `lrintf` per element)."""
    return ctx.vector_float and not ctx.accelerator


def _rewrite(mod: Any, layers: list[Layer], options: dict[str, Any], stats: dict[str, Any],
             multiples: tuple[int, int] = (1, 1), requantize_kernel: bool = True) -> tuple[Any, dict[str, Any]]:
    from tvm import relax

    rewriter = _Rewriter(mod, {id_of(layer.call): layer for layer in layers if layer.mode != "float"}, options, multiples=multiples, requantize_kernel=requantize_kernel)
    mod = rewriter.rewrite()
    if rewriter.integer_requantize:
        mod, stats["integer_output_biases"] = fold_output_biases(mod, rewriter.dequantized, set(rewriter.offsets))
        stats["requantize"] = "integer"
        stats["integer_requantized"] = rewriter.requantized
        stats["integer_residual_adds"] = rewriter.residuals_requantized
        stats["integer_mean_pools"] = rewriter.pools_requantized
    else:
        stats["folded_requantizes"] = rewriter.folded
    stats["padded_matmul_columns"] = rewriter.padded_columns
    stats["padded_conv_channels"] = rewriter.padded_channels
    stats["split_matmul_columns"] = rewriter.split_columns  # columns of a dot-product matmul done by a plain tail matmul
    stats["split_conv_channels"] = rewriter.split_channels  # output channels of a dot-product conv done by a plain tail conv
    mod, stats["fenced_products"] = fence_products(mod)  # float multiplies an add takes, kept from fusing with it
    # CanonicalizeBindings: the integer-requantize path binds the dequantized output to the layer's
    # var through an alias (v = dequantized), which FuseOps would treat as a kernel boundary
    # (not with taps: they are aliases, which it would remove)
    mod = relax.transform.Normalize()(mod)
    if not rewriter.taps:
        mod = relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(mod))
    stats["weights_bytes"] = constant_bytes(mod)
    if rewriter.taps:
        stats["taps"] = rewriter.taps
    stats["layers_by_mode"] = dict(sorted(Counter(layer.mode for layer in layers).items()))
    stats["layers"] = [layer.to_json() for layer in layers]
    return mod, stats


def _keep_sensitive_in_float(mod: Any, layers: list[Layer], ctx: CompileContext, max_drop: float) -> dict[str, Any]:
    """Measures each int8 layer alone, then keeps the most sensitive ones in float until the
    calibration set's error (1 - cosine of the outputs against float) is within `max_drop`."""
    from tvm import relax

    from .sensitivity import Switchboard

    quantized = [layer for layer in layers if layer.mode == "int8"]
    flags = relax.Var("socc_layer_flags", relax.TensorType([len(quantized)], "bool"))
    switched = _Rewriter(mod, {id_of(layer.call): layer for layer in quantized}, ctx.options, switch=flags).rewrite()
    board = Switchboard(relax.transform.Normalize()(switched), len(quantized), ctx.calibration)
    alone = board.sqnr_alone()
    kept: list[Layer] = []
    on = [True] * len(quantized)
    drop = board.drop(on)
    steps = [{"float_layers": 0, "drop": drop}]
    for i in sorted(range(len(quantized)), key=lambda i: alone[i]):
        if drop <= max_drop:
            break
        on[i] = False
        kept.append(quantized[i])
        drop = board.drop(on)
        steps.append({"float_layers": len(kept), "drop": drop})
    for layer in kept:
        layer.mode = "float"
        layer.reason = f"kept in float by --max-accuracy-drop (alone: {alone[quantized.index(layer)]:.1f} dB SQNR)"
    return {"max_accuracy_drop": max_drop, "drop": drop, "met": drop <= max_drop, "steps": steps,
            "sqnr_db_alone": {layer.name: round(alone[i], 2) for i, layer in enumerate(quantized)}}


def _prequantized(mod: Any, ctx: CompileContext) -> tuple[Any, dict[str, Any]]:
    """A model quantized elsewhere in QDQ form (as onnxruntime's quantize_static writes it): each
    conv2d/matmul whose input is `dequantize(q, scale, zero_point)` of an 8-bit tensor (per-tensor)
    and whose folded weight lies exactly on a symmetric int8 per-channel grid runs on the integer
    kernels, taking `q` itself and the model's own scale and zero point. No calibration."""
    from tvm import relax

    mod, integer_matmuls = _integer_operand_matmuls(mod)
    names = list(ctx.source_nodes.get("MatMulInteger", ()))
    integer_layers = [{"name": names[i] if i < len(names) else f"MatMulInteger_{i}", "op_type": "MatMulInteger", "mode": "int8"}
                      for i in range(integer_matmuls)]
    main = mod["main"]
    bound = relax.analysis.get_var2val(main)
    layers = [layer for layer in find_layers(main, ctx.source_nodes) if _dtype(layer.call) != "int32"]  # not integer matmuls
    for layer in layers:
        if layer.op_type == "MatMul" and ctx.int4_weights and _from_matmul_nbits(layer, ctx.int4_weights):
            continue
        source = _dequantized_input(layer, bound)
        reason = _weight_reason(layer) if source is not None and layer.op_type != "Gather" else "input is not dequantized"
        levels = None if reason else _int8_grid(_const(layer.call.args[1]), axis=_weight_out_axis(layer))
        if not reason and levels is None:
            reason = "weight is not on a symmetric int8 per-channel grid"
        if not reason and not isinstance(source[2], int):
            reason = _dynamic_zero_point_reason(layer)
        if reason and source is not None and layer.op_type == "Conv":
            _refuse_inexact_integer_conv(layer, source[1], reason)
        if reason:
            layer.mode, layer.reason = "float", reason
        else:
            layer.mode, layer.quantized_input, layer.levels = "int8", source[0], levels
            layer.scale = source[1]
            if isinstance(source[2], int):
                layer.zero_point = source[2]
            else:
                layer.dynamic_zero_point = source[2]
    if not any(layer.mode in ("int8", "int4-weight") for layer in layers):
        if integer_matmuls:
            return mod, {"scheme": "matmul-integer", "integer_matmuls": integer_matmuls, "weight_scheme": "the model's own",
                         "layers_by_mode": {"int8": integer_matmuls}, "layers": integer_layers}
        return mod, {"scheme": "none"}
    layers = [layer for layer in layers if layer.mode != "float" or layer.op_type != "Gather"]
    stats = {"scheme": "qdq" if any(layer.mode == "int8" for layer in layers) else "matmul-nbits",
             "weights_bytes_float": constant_bytes(mod), "weight_scheme": "the model's own"}
    mod, stats = _rewrite(mod, layers, ctx.options, stats, requantize_kernel=_requantize_kernel(ctx))
    if integer_matmuls:
        stats["integer_matmuls"] = integer_matmuls
        stats["layers"] += integer_layers
        stats["layers_by_mode"]["int8"] = stats["layers_by_mode"].get("int8", 0) + integer_matmuls
    return mod, stats


def _integer_operand_matmuls(mod: Any) -> tuple[Any, int]:
    """onnxruntime's dynamic quantization (DynamicQuantizeLinear + MatMulInteger): TVM imports
    MatMulInteger as an int32 x int32 matmul of `int32(a) - a_zero_point` and the widened int8
    weight. Where the weight is a constant on the int8 range (zero point 0), the matmul takes the
    8-bit `a` and the int8 weight instead (our uint8/int8 x int8 -> int32 kernel) and subtracts
    `a_zero_point * column sums`: the same integers, from 8-bit operands."""
    from tvm import relax

    main = mod["main"]
    bound = relax.analysis.get_var2val(main)
    rewritten = 0

    @relax.expr_functor.mutator
    class Narrow(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            nonlocal rewritten
            call = self.visit_expr_post_order(call)
            if getattr(call.op, "name", "") != "relax.matmul" or str(call.attrs.out_dtype) != "int32":
                return call
            weight = _constant_integers(call.args[1], bound)
            operand = _widened_operand(call.args[0], bound)
            if weight is None or weight.ndim != 2 or weight.min() < -128 or weight.max() > 127 or operand is None:
                return call
            data, zero_point = operand
            acc = relax.op.matmul(data, relax.const(weight.astype(np.int8)), out_dtype="int32")
            if zero_point is not None:
                column_sums = relax.const(weight.astype(np.int64).sum(axis=0).astype(np.int32))
                acc = relax.op.subtract(acc, relax.op.multiply(zero_point, column_sums))
            rewritten += 1
            return acc

    mutator = Narrow(mod)
    mutator.builder_.update_func(mod.get_global_var("main"), mutator.visit_expr(main))
    result = mutator.builder_.get()
    return (relax.transform.DeadCodeElimination()(relax.transform.Normalize()(result)) if rewritten else mod), rewritten


def _widened_operand(expr: Any, bound: Any) -> tuple[Any, Any] | None:
    """(8-bit a, int32 zero point or None) when expr is `int32(a) - zero_point` or `int32(a)`."""
    value = bound.get(expr, expr)
    zero_point = None
    if getattr(getattr(value, "op", None), "name", "") == "relax.subtract":
        zero_point = value.args[1]
        if _dtype(zero_point) != "int32" or len(zero_point.ty.shape) != 0:
            return None
        value = bound.get(value.args[0], value.args[0])
    if getattr(getattr(value, "op", None), "name", "") != "relax.astype" or _dtype(value.args[0]) not in ("uint8", "int8"):
        return None
    return value.args[0], zero_point


def _constant_integers(expr: Any, bound: Any) -> np.ndarray | None:
    """The value of a constant integer expression (constants through astype, add, subtract), else None."""
    import tvm

    value = bound.get(expr, expr)
    if isinstance(value, tvm.ir.expr.Constant):
        array = value.value.numpy()
        return array.astype(np.int64) if np.issubdtype(array.dtype, np.integer) else None
    name = getattr(getattr(value, "op", None), "name", "")
    if name == "relax.astype":
        return _constant_integers(value.args[0], bound)
    if name in ("relax.add", "relax.subtract"):
        lhs, rhs = _constant_integers(value.args[0], bound), _constant_integers(value.args[1], bound)
        if lhs is None or rhs is None:
            return None
        return lhs + rhs if name == "relax.add" else lhs - rhs
    return None


def _from_matmul_nbits(layer: Layer, table: Any) -> bool:
    """A matmul whose constant weight is a MatMulNBits weight: it takes the model's own 4-bit codes."""
    import hashlib

    weight = _const(layer.call.args[1])
    entry = None if weight is None else table.get(hashlib.sha256(np.ascontiguousarray(weight).tobytes()).hexdigest())
    if entry is None:
        return False
    packed, scales, zeros, layer.group = entry
    layer.int4, layer.mode = (packed, scales, zeros), "int4-weight"
    return True


def _dequantized_input(layer: Layer, bound: Any) -> tuple[Any, float, Any] | None:
    """(8-bit tensor, scale, zero point) when the layer's input is a per-tensor dequantize of it with
    a constant scale. The zero point is an int, or a scalar 8-bit var when it is computed at run
    time (DynamicQuantizeLinear's, as onnxruntime's quantize_dynamic feeds ConvInteger)."""
    import tvm
    from tvm import relax

    value = bound.get(layer.call.args[0])
    permute = None  # convert-layout's transpose between the dequantize and an NHWC conv
    if value is not None and getattr(value.op, "name", "") == "relax.permute_dims":
        permute, value = value, bound.get(value.args[0])
    if value is None or not isinstance(value.op, tvm.ir.Op) or value.op.name != "relax.dequantize":
        return None
    codes, scale, zero_expr = value.args[0], _const(value.args[1]), value.args[2]
    zero = _const(zero_expr)
    if _dtype(codes) not in ("uint8", "int8") or scale is None or scale.size != 1:
        return None
    if permute is not None:  # per tensor, so the transpose commutes with the dequantize: it moves to the codes
        codes = relax.Call(permute.op, [codes], permute.attrs)
    if zero is None:
        dynamic = _dtype(zero_expr) == _dtype(value.args[0]) and len(zero_expr.ty.shape) == 0
        return (codes, float(scale.reshape(())), zero_expr) if dynamic else None
    return (codes, float(scale.reshape(())), int(zero.reshape(()))) if zero.size == 1 else None


def _dynamic_zero_point_reason(layer: Layer) -> str:
    """Why a layer whose input zero point is computed at run time stays float ("" when it need not):
    a padded conv's correction depends on the output position, computed for fixed spatial dims."""
    if layer.op_type != "Conv" or not any(int(p) for p in layer.call.attrs.padding):
        return ""
    data_layout = str(layer.call.attrs.data_layout)
    dims = [layer.call.args[0].ty.shape[data_layout.index(axis)] for axis in "HW"]
    return "" if all(isinstance(_int_or_none(d), int) for d in dims) else "padded conv with a run-time zero point and dynamic spatial dims"


def _refuse_inexact_integer_conv(layer: Layer, input_scale: float, reason: str) -> None:
    """A conv of integers (ConvInteger's expansion: input scale 1, integer weight codes) left in
    float must keep every sum under 2^24, or its float32 sums would round: refused, naming it."""
    weight = _const(layer.call.args[1])
    if input_scale != 1.0 or weight is None or not np.all(weight == np.rint(weight)):
        return
    bound = _acc_bound(weight, _weight_out_axis(layer), layer)
    if bound >= FLOAT_EXACT:
        raise PassInputError(f"ConvInteger node {layer.name!r}: sums up to {bound} stay in float ({reason}), "
                             f"over 2^24, where float32 would round them")


def _int_or_none(dim: Any) -> int | None:
    try:
        return int(dim)
    except (TypeError, ValueError):
        return None


# The largest weight code of symmetric int8 schemes: full range, and onnxruntime's reduce_range (7 bits).
GRID_LEVELS = (127, 63, 64)
FLOAT_EXACT = 1 << 24  # float32 holds every integer up to this
OWN_CODES = 0  # `levels` of a weight whose values are int8 codes themselves (ConvInteger's): scale 1


def _int8_grid(weight: np.ndarray, axis: int) -> int | None:
    """The `levels` for which weight == q * s exactly (int8 q, a scale per channel along `axis`), if any."""
    if np.all(weight == np.rint(weight)) and weight.min(initial=0) >= -128 and weight.max(initial=0) <= 127:
        return OWN_CODES
    shape = [1] * weight.ndim
    shape[axis] = -1
    for levels in GRID_LEVELS:
        wq, scale = quantize_per_channel(weight, axis, levels)
        error = np.max(np.abs(wq.astype(np.float64) * scale.reshape(shape) - weight))
        if error <= 1e-6 * max(float(np.max(np.abs(weight))), 1e-30):
            return levels
    return None


# --------------------------------------------------------------------------------- finding layers

def id_of(expr: Any) -> int:
    """A stable identity for an IR node across Python wrappers."""
    return expr.__hash__()


def find_layers(main: Any, source_nodes: Any) -> list[Layer]:
    """conv2d, matmul and take calls of `main` in program order, named after their source nodes."""
    import tvm
    from tvm import relax

    found: list[tuple[str, Any]] = []
    for block in main.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name in SOURCE_OPS:
                found.append((value.op.name, value))
    totals = Counter(op_name for op_name, _ in found)
    seen: Counter[str] = Counter()
    layers = []
    for op_name, call in found:
        op_type = SOURCE_OPS[op_name][0]
        names = source_nodes.get(op_type, ())
        i = seen[op_name]
        seen[op_name] += 1
        # when the importer added or folded some, the source names no longer line up: number them
        layers.append(Layer(names[i] if len(names) == totals[op_name] else f"{op_type}#{i}", op_type, call))
    return layers


def _apply_exclusions(layers: list[Layer], op_types: Sequence[str], node_names: Sequence[str]) -> None:
    wanted_types = {t.lower() for t in op_types}
    known_types = set().union(*OP_TYPE_ALIASES.values())
    unknown = sorted(wanted_types - known_types)
    if unknown:
        raise PassInputError(f"--exclude-op-type {unknown[0]!r} is not a quantizable op type; known: Conv, MatMul, Gemm, Gather")
    names = {layer.name for layer in layers}
    missing = [n for n in node_names if n not in names]
    if missing:
        raise PassInputError(f"--exclude-node {missing[0]!r}: no quantizable layer has that name (see the quantization report)")
    for layer in layers:
        if OP_TYPE_ALIASES[layer.op_type] & wanted_types:
            layer.mode, layer.reason = "float", "excluded by --exclude-op-type"
        elif layer.name in node_names:
            layer.mode, layer.reason = "float", "excluded by --exclude-node"


def _const(expr: Any) -> np.ndarray | None:
    import tvm

    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def _dtype(expr: Any) -> str:
    return str(getattr(expr.ty, "dtype", ""))


def _weight_reason(layer: Layer) -> str:
    """Why this layer's weight cannot be quantized ("" if it can)."""
    call = layer.call
    weight = _const(call.args[1] if layer.op_type != "Gather" else call.args[0])
    if weight is None:
        return "both operands are activations" if layer.op_type == "MatMul" else "weight is not a constant"
    if weight.dtype != np.float32:
        return f"weight dtype is {weight.dtype}, not float32"
    if layer.op_type == "Conv":
        attrs = call.attrs
        layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
        if layouts not in CONV_LAYOUTS:
            return f"layout {'/'.join(layouts)} (quantized only in {', '.join('/'.join(pair) for pair in CONV_LAYOUTS)})"
        if str(attrs.out_dtype) not in ("", "None", "float32"):
            return f"output dtype {attrs.out_dtype}"
    elif weight.ndim != 2:
        return f"{weight.ndim}-D weight (quantized only 2-D)"
    elif layer.op_type == "Gather" and int(call.attrs.axis) != 0:
        return "gather along an axis other than rows"
    return ""


def _weight_out_axis(layer: Layer) -> int:
    """The axis of a conv/matmul weight that runs along the output channels."""
    return str(layer.call.attrs.kernel_layout).index("O") if layer.op_type == "Conv" else 1


def _distinct_inputs(layers: list[Layer]) -> tuple[list[Any], dict[int, int]]:
    """The layers' input tensors, each once (Q, K and V share one), and each tensor's index."""
    taps: list[Any] = []
    index: dict[int, int] = {}
    for layer in layers:
        x = layer.call.args[0]
        if id_of(x) not in index:
            index[id_of(x)] = len(taps)
            taps.append(x)
    return taps, index


def _option(options: dict[str, Any], name: str, default: Any, allowed: tuple[Any, ...], what: str) -> Any:
    """A user option, its default when unset; a value outside `allowed` is a one-line error."""
    value = options.get(name) or default
    if value not in allowed:
        raise PassInputError(f"{what} must be one of {', '.join(map(str, allowed))}, not {value!r}")
    return value


def _plan_int8(mod: Any, layers: list[Layer], ctx: CompileContext) -> dict[str, Any]:
    from .calibrate import collect_histograms
    from .observers import DEFAULT_OBSERVER, OBSERVERS, qparams

    method = _option(ctx.options, "calibrate_method", DEFAULT_OBSERVER, tuple(OBSERVERS), "calibration method")
    act_dtype = _option(ctx.options, "activation_dtype", "uint8", ACTIVATION_DTYPES, "activation dtype")
    for layer in layers:
        if layer.mode == "float":
            continue
        reason = _weight_reason(layer)
        if not reason and layer.op_type != "Gather" and _dtype(layer.call.args[0]) != "float32":
            reason = f"input dtype is {_dtype(layer.call.args[0])}"
        if reason:
            layer.mode, layer.reason = "float", reason
        else:
            layer.mode = "int8-weight" if layer.op_type == "Gather" else "int8"
    taps, tap_of = _distinct_inputs([layer for layer in layers if layer.mode == "int8"])
    if taps and ctx.calibration is None:
        raise PassInputError("int8 quantization needs calibration data (--calibration PATH, or calibration= in the API)")
    histograms, samples = collect_histograms(mod, taps, ctx.calibration) if taps else ([], 0)
    symmetric = act_dtype == "int8"
    for layer in layers:
        if layer.mode == "int8":
            lo, hi = OBSERVERS[method](histograms[tap_of[id_of(layer.call.args[0])]], symmetric)
            layer.scale, layer.zero_point = qparams(lo, hi, act_dtype)
    return {"activation_dtype": act_dtype, "observer": method, "calibration_samples": samples,
            "weight_scheme": "symmetric int8 per output channel"}


def _plan_int4(mod: Any, layers: list[Layer], ctx: CompileContext) -> dict[str, Any]:
    options = ctx.options
    group = int(_option(options, "group_size", 32, GROUP_SIZES, "group size"))
    weight_scheme = _option(options, "weight_scheme", DEFAULT_WEIGHT_SCHEME, WEIGHT_SCHEMES, "weight scheme")
    for layer in layers:
        if layer.mode == "float":
            continue
        if layer.op_type == "Conv":
            layer.mode, layer.reason = "float", "int4-weight quantizes matmuls and embeddings only"
            continue
        reason = _weight_reason(layer)
        if not reason:
            weight = _const(layer.call.args[1] if layer.op_type == "MatMul" else layer.call.args[0])
            reduction = weight.shape[0] if layer.op_type == "MatMul" else weight.shape[1]
            if reduction % group:
                reason = f"{'reduction' if layer.op_type == 'MatMul' else 'row'} length {reduction} is not a multiple of the group size {group}"
        if reason:
            layer.mode, layer.reason = "float", reason
        elif layer.op_type == "Gather" and options.get("int8_embeddings"):
            layer.mode = "int8-weight"
        else:
            layer.mode = "int4-weight"
    tied = _tie_to_int8_tables(layers) if options.get("int8_embeddings") else 0
    stats = {"group_size": group, "weight_scheme": f"{weight_scheme} int4, float16 scales per {group} along the reduction",
             "int8_embeddings": bool(options.get("int8_embeddings")), "tied_int8_matmuls": tied,
             "rounding": "nearest (range search + refit)" if weight_scheme != "scale-min" else "nearest (group range + refit)"}
    if ctx.calibration is not None and weight_scheme == "scale-min":
        raise PassInputError("GPTQ (int4-weight with calibration) rounds to the symmetric or asymmetric scheme, not scale-min")
    if ctx.calibration is not None:
        stats.update(_gptq(mod, [layer for layer in layers if layer.mode == "int4-weight" and layer.op_type == "MatMul"],
                           ctx, group, weight_scheme == "symmetric"))
    return stats


def _tie_to_int8_tables(layers: list[Layer]) -> int:
    """Matmuls whose weight is the transpose of an int8 embedding table (a tied classifier, as in
    Llama-style models) become int8-weight too and share the table's int8 rows; how many."""
    int8_tables = [_const(layer.call.args[0]) for layer in layers if layer.op_type == "Gather" and layer.mode == "int8-weight"]
    tables, shapes = {_digest(table) for table in int8_tables}, {table.shape for table in int8_tables}
    tied = 0
    for layer in layers:
        if layer.op_type == "MatMul" and layer.mode == "int4-weight":
            weight = _const(layer.call.args[1])
            if weight.shape[::-1] in shapes and _digest(np.ascontiguousarray(weight.T)) in tables:
                layer.mode, tied = "int8-weight", tied + 1
    return tied


def _gptq(mod: Any, layers: list[Layer], ctx: CompileContext, group: int, symmetric: bool) -> dict[str, Any]:
    """With calibration data, int4 matmul weights are rounded by GPTQ on the inputs' Gram matrices."""
    from .calibrate import Gram, collect
    from .gptq import gptq_int4

    taps, tap_of = _distinct_inputs(layers)
    grams, samples = collect(mod, taps, ctx.calibration, Gram)
    for layer in layers:
        gram = grams[tap_of[id_of(layer.call.args[0])]].matrix
        codes, scales, zeros = gptq_int4(_const(layer.call.args[1]), gram, group, symmetric)
        layer.int4 = pack_int4(codes, scales, zeros, symmetric)
    return {"rounding": "gptq", "calibration_samples": samples}


# --------------------------------------------------------------------------------- weight packing

def quantize_per_channel(weight: np.ndarray, axis: int, levels: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 along `axis` (the output channel), the largest magnitude at +-`levels`:
    (int8 values, float32 scale per channel). OWN_CODES: the weight's own integers, scale 1."""
    if levels == OWN_CODES:
        return weight.astype(np.int8), np.ones(weight.shape[axis], np.float32)
    reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
    peak = np.max(np.abs(weight.astype(np.float64)), axis=reduce_axes)
    scale = np.where(peak > 0, peak / levels, 1.0)
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.clip(np.rint(weight / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


# Shrink factors of a group's range tried by the int4 scale search (1.0 = the plain min/max range).
INT4_RANGE_FACTORS = np.linspace(1.0, 0.6, 17)
# Rounds of least-squares scale refits after that search (each kept per group only if it helps).
INT4_REFIT_ROUNDS = 4


def int4_group_params(w: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float16) and zero point (float32 holding 0..15) of each group of w [groups, G, N].

    Each group's range is shrunk by each of INT4_RANGE_FACTORS and the one with the least squared
    error after rounding and clipping wins (outliers clip, the rest gain resolution); then each
    scale is refit by least squares to its codes and the group re-rounded, a few rounds, keeping
    what lowers the error. Symmetric codes are q - 8 in [-8, 7]; asymmetric ones q - z.
    """
    w = w.astype(np.float32)
    if symmetric:
        peak = np.max(np.abs(w), axis=1)
        base_scale, base_zero = peak / 7.5, np.full(peak.shape, 8.0, np.float32)
    else:
        lo, hi = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
        base_scale, base_zero = (hi - lo) / 15.0, None
    best_err = np.full(base_scale.shape, np.inf, np.float32)
    best_scale = np.ones(base_scale.shape, np.float16)
    best_zero = np.full(base_scale.shape, 8.0, np.float32)
    for factor in INT4_RANGE_FACTORS:
        scale = (base_scale * factor).astype(np.float16)
        scale = np.where(scale > 0, scale, np.float16(1.0))
        s32 = scale.astype(np.float32)
        zero = base_zero if symmetric else np.clip(np.rint(-lo * factor / s32), 0, 15)
        err = _group_error(w, s32, zero)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
    for _ in range(INT4_REFIT_ROUNDS):  # least-squares refit of each scale to its codes, then re-round
        codes = _codes(w, best_scale.astype(np.float32), best_zero) - best_zero[:, None, :]
        energy = np.sum(codes * codes, axis=1)
        fitted = np.where(energy > 0, np.sum(codes * w, axis=1) / np.maximum(energy, 1e-30),
                          best_scale.astype(np.float32)).astype(np.float16)
        scale = np.where(fitted > 0, fitted, best_scale)
        err = _group_error(w, scale.astype(np.float32), best_zero)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
    return best_scale, best_zero


def _codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """4-bit codes 0..15 of w [groups, G, N] for per-group scale and zero point [groups, N]."""
    return np.clip(np.rint(w / scale[:, None, :]) + zero[:, None, :], 0, 15)


def _group_error(w: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    return np.sum((w - (_codes(w, scale, zero) - zero[:, None, :]) * scale[:, None, :]) ** 2, axis=1)


def quantize_int4_groups(weight: np.ndarray, group: int, scheme: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round-to-nearest 4-bit groups of `group` along axis 0 of a 2-D [K, N] weight (int4_group_params;
    scale-min: int4_scale_min_params).

    Returns (packed uint8 [K/2, N]: row 2j in the low nibble, 2j+1 in the high one; float16 scales
    [K/G, N]; asymmetric: zero points packed the same way along N, [K/G, ceil(N/2)]; scale-min:
    float16 minimums [K/G, N]; symmetric: None).
    """
    k, n = weight.shape
    w = weight.astype(np.float32).reshape(k // group, group, n)
    if scheme == "scale-min":
        scale, minimum = int4_scale_min_params(w)
        q = _scale_min_codes(w, scale.astype(np.float32), minimum.astype(np.float32)).astype(np.uint8).reshape(k, n)
        return pack_nibbles(q, axis=0), scale, minimum
    scale, zero = int4_group_params(w, scheme == "symmetric")
    q = _codes(w, scale.astype(np.float32), zero).astype(np.uint8).reshape(k, n)
    return pack_int4(q, scale, zero, scheme == "symmetric")


def int4_scale_min_params(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale and minimum (float16) of each group of w [groups, G, N] for codes 0..15: the group's own
    range (w = q * s + m spans [min, max]; on a Q4_1 grid this finds the grid exactly), then
    least-squares refits of (s, m) to the codes, each kept per group only if it lowers the error."""
    lo, hi = w.min(axis=1), w.max(axis=1)
    scale = ((hi - lo) / 15.0).astype(np.float16)
    scale = np.where(scale > 0, scale, np.float16(1.0))
    minimum = lo.astype(np.float16)
    best_err = _scale_min_error(w, scale, minimum)
    for _ in range(INT4_REFIT_ROUNDS):
        codes = _scale_min_codes(w, scale.astype(np.float32), minimum.astype(np.float32))
        mean_q, mean_w = codes.mean(axis=1), w.mean(axis=1)
        spread = np.sum((codes - mean_q[:, None]) ** 2, axis=1)
        fitted = np.where(spread > 0, np.sum((codes - mean_q[:, None]) * (w - mean_w[:, None]), axis=1) / np.maximum(spread, 1e-30), 0)
        new_scale = np.where(fitted > 0, fitted, scale.astype(np.float32)).astype(np.float16)
        new_minimum = (mean_w - new_scale.astype(np.float32) * mean_q).astype(np.float16)
        err = _scale_min_error(w, new_scale, new_minimum)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        scale, minimum = np.where(better, new_scale, scale), np.where(better, new_minimum, minimum)
    return scale, minimum


def _scale_min_codes(w: np.ndarray, scale: np.ndarray, minimum: np.ndarray) -> np.ndarray:
    return np.clip(np.rint((w - minimum[:, None, :]) / scale[:, None, :]), 0, 15)


def _scale_min_error(w: np.ndarray, scale: np.ndarray, minimum: np.ndarray) -> np.ndarray:
    s32, m32 = scale.astype(np.float32), minimum.astype(np.float32)
    return np.sum((w - (_scale_min_codes(w, s32, m32) * s32[:, None, :] + m32[:, None, :])) ** 2, axis=1)


def pack_int4(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Codes [K, N] 0..15, scales and zero points [K/G, N] -> the kernel's packed arrays."""
    return pack_nibbles(q, axis=0), scale, None if symmetric else pack_nibbles(zero.astype(np.uint8), axis=1)


def pack_nibbles(values: np.ndarray, axis: int) -> np.ndarray:
    """4-bit values, two per byte along `axis` (even index in the low nibble); an odd length pads with 0."""
    values = np.moveaxis(values.astype(np.uint8), axis, 0)
    if values.shape[0] % 2:
        values = np.concatenate([values, np.zeros_like(values[:1])])
    return np.ascontiguousarray(np.moveaxis(values[0::2] | (values[1::2] << 4), 0, axis))


def unpack_nibbles(packed: np.ndarray, axis: int, length: int) -> np.ndarray:
    """The inverse of pack_nibbles: `length` 4-bit values along `axis`."""
    packed = np.moveaxis(packed, axis, 0)
    values = np.empty((packed.shape[0] * 2, *packed.shape[1:]), np.uint8)
    values[0::2], values[1::2] = packed & 15, packed >> 4
    return np.ascontiguousarray(np.moveaxis(values[:length], 0, axis))


# ------------------------------------------------------------------------------------- rewriting

def _quantize_expr(x: Any, scale: float, zero_point: int, dtype: str) -> Any:
    from tvm import relax

    op = relax.op
    q = op.round(op.multiply(x, relax.const(np.float32(1.0 / scale))))
    if zero_point:
        q = op.add(q, relax.const(np.float32(zero_point)))
    lo, hi = (0, 255) if dtype == "uint8" else (-127, 127)
    return op.astype(op.clip(q, lo, hi), dtype)


def _nibble(byte: Any, index: Any) -> Any:
    """The 4-bit value `index` % 2 of a packed byte, as float32."""
    from tvm import tirx

    value = tirx.if_then_else(index % 2 == 0, byte & tirx.const(15, "uint8"), byte >> tirx.const(4, "uint8"))
    return value.astype("float32")


def _acc_bound(wq: np.ndarray, out_axis: int, layer: Layer) -> int:
    """The largest |accumulator| of 8-bit inputs (|code| <= 255) times these weight codes (twice
    that with a run-time zero point's correction already subtracted)."""
    magnitudes = np.abs(wq.astype(np.int64)).sum(axis=tuple(i for i in range(wq.ndim) if i != out_axis))
    return 255 * int(magnitudes.max(initial=0)) * (1 if layer.dynamic_zero_point is None else 2)


def _window_sums(wq: np.ndarray, call: Any, padding: list[int]) -> np.ndarray:
    """Per output channel and position, the sum of the weights that fall inside the (unpadded)
    input: what a conv of all-ones input with zero padding gives. Shaped like the conv's output
    without its batch axis (a leading 1)."""
    attrs = call.attrs
    data_layout, kernel_layout = str(attrs.data_layout), str(attrs.kernel_layout)
    weight = np.transpose(wq.astype(np.int64), [kernel_layout.index(axis) for axis in "OIHW"]).sum(axis=1)  # [O, KH, KW]
    inside = []
    for axis, (before, _after) in zip("HW", ((padding[0], padding[2]), (padding[1], padding[3]))):
        size = int(call.args[0].ty.shape[data_layout.index(axis)])
        stride, dilation = int(attrs.strides["HW".index(axis)]), int(attrs.dilation["HW".index(axis)])
        out_size = int(call.ty.shape[str(attrs.out_layout).index(axis)])
        position = (np.arange(out_size)[:, None] * stride - before + np.arange(weight.shape[1 + "HW".index(axis)])[None, :] * dilation)
        inside.append(((position >= 0) & (position < size)).astype(np.int64))  # [out, k]
    sums = np.einsum("okl,hk,wl->ohw", weight, inside[0], inside[1])  # [O, OH, OW]
    order = [axis for axis in data_layout if axis != "N"]
    return np.transpose(sums, ["CHW".index(axis) for axis in order])[None]


def _dequantize(values: Any, scales: Any) -> Any:
    """float(values) * scales, fenced from the bias add that follows (`requantize.fence`)."""
    from tvm import relax

    return fence(relax.op.multiply(relax.op.astype(values, "float32"), scales))


def fence_products(mod: Any) -> tuple[Any, int]:
    """Every float multiply that an add or subtract of `main` takes goes through `requantize.fence` (the
    float ops an int8 build keeps, e.g. a pre-activation batch norm's scale and shift); returns
    the module and how many products were fenced."""
    from tvm import relax

    main = mod["main"]
    bound = relax.analysis.get_var2val(main)
    rebuild = {"relax.add": relax.op.add, "relax.subtract": relax.op.subtract}
    fenced = 0

    def is_float_product(var: Any) -> bool:
        value = bound.get(var) if isinstance(var, relax.Var) else None
        return isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.multiply" and _dtype(value).startswith("float")

    @relax.expr_functor.mutator
    class Fence(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            nonlocal fenced
            new = self.visit_expr_post_order(call)
            name = getattr(call.op, "name", "")
            products = [is_float_product(arg) for arg in call.args]
            if name not in rebuild or not any(products):
                return new
            fenced += sum(products)
            return rebuild[name](*[fence(arg) if product else arg for arg, product in zip(new.args, products)])

    mutator = Fence(mod)
    mutator.builder_.update_func(mod.get_global_var("main"), mutator.visit_expr(main))
    return (relax.transform.Normalize()(mutator.builder_.get()) if fenced else mod), fenced


def _q4_matmul_te(x: Any, packed: Any, scales: Any, *zeros: Any, group: int) -> Any:
    from tvm import te, tirx

    k_len = packed.shape[0] * 2
    n_len = packed.shape[1]
    k = te.reduce_axis((0, k_len), "k")

    def weight(kk: Any, n: Any) -> Any:
        code, scale = _nibble(packed[kk // 2, n], kk), scales[kk // group, n].astype("float32")
        if zeros and zeros[0].dtype == "float16":  # scale-min
            return code * scale + zeros[0][kk // group, n].astype("float32")
        zero = _nibble(zeros[0][kk // group, n // 2], n) if zeros else tirx.const(8.0, "float32")
        return (code - zero) * scale

    def body(*index: Any) -> Any:
        return te.sum(x[(*index[:-1], k)] * weight(k, index[-1]), axis=k)

    return te.compute((*x.shape[:-1], n_len), body, name="q4_matmul")


def _int8_rows_matmul_te(x: Any, rows: Any, row_scale: Any) -> Any:
    """x [..., K] times the transpose of int8 rows [N, K], each output scaled by its row's scale."""
    from tvm import te

    k = te.reduce_axis((0, rows.shape[1]), "k")
    total = te.compute((*x.shape[:-1], rows.shape[0]),
                       lambda *i: te.sum(x[(*i[:-1], k)] * rows[i[-1], k].astype("float32"), axis=k), name="int8_rows_matmul")
    return te.compute(total.shape, lambda *i: total[i] * row_scale[i[-1], 0], name="int8_rows_scale")


def _digest(array: np.ndarray) -> str:
    """The identity of a constant's value: shape, dtype and the SHA-256 of its bytes."""
    return f"{array.shape}{array.dtype}" + hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _q4_take_te(indices: Any, packed: Any, scales: Any, *zeros: Any, group: int) -> Any:
    from tvm import te, tirx

    width = packed.shape[1] * 2

    def body(*index: Any) -> Any:
        row, col = indices[index[:-1]], index[-1]
        code, scale = _nibble(packed[row, col // 2], col), scales[row, col // group].astype("float32")
        if zeros and zeros[0].dtype == "float16":  # scale-min
            return code * scale + zeros[0][row, col // group].astype("float32")
        zero = _nibble(zeros[0][row, col // group // 2], col // group) if zeros else tirx.const(8.0, "float32")
        return (code - zero) * scale

    return te.compute((*indices.shape, width), body, name="q4_take")


class _Rewriter:
    """Rewrites the planned calls of `main`; shares one quantize per (activation, scale, zero point)."""

    def __init__(self, mod: Any, plans: dict[int, Layer], options: dict[str, Any], switch: Any = None,
                 multiples: tuple[int, int] = (1, 1), requantize_kernel: bool = True) -> None:
        from tvm import relax

        self.mod = mod
        # int8 matmul weights get zero columns up to a multiple of the first, conv inputs zero channels up to the second
        self.column_multiple, self.channel_multiple = multiples
        self.padded_columns = 0
        self.padded_channels = 0
        self.split_columns = 0
        self.split_channels = 0
        self.plans = plans
        # With `switch` (a bool vector var), layer i computes where(switch[i], quantized, float):
        # one module measures any subset of quantized layers (see sensitivity.py).
        self.switch = switch
        self.order = {key: i for i, key in enumerate(plans)}
        self.act_dtype = options.get("activation_dtype") or "uint8"
        self.group = int(options.get("group_size") or 32)
        self.weight_scheme = options.get("weight_scheme") or DEFAULT_WEIGHT_SCHEME
        self.int8_rows: dict[str, tuple[Any, Any]] = {}  # table digest -> (int8 rows, row scales) constants
        self.integer_requantize = options.get("requantize") == "integer"
        self.dequantized: dict[int, Dequantized] = {}  # by the dequantized output var
        self.offsets: dict[int, tuple[Any, np.ndarray]] = {}  # shifted output var -> (dequantized var, offset)
        self.model_biases: dict[int, np.ndarray] = {}  # by offset + bias constant: that bias
        self.requantized = 0
        self.folded = 0  # float requantizes folded to one multiply-add (`folded_requantize`)
        self.requantize_kernel = requantize_kernel  # folds as one lrint kernel stage, else Relax ops (`_requantize_kernel`)
        # the given main's var -> value, and each var's uses (`sole_consumer`)
        self.bound = relax.analysis.get_var2val(mod["main"])
        self.uses: Counter = Counter()
        relax.analysis.post_order_visit(mod["main"].body, lambda e: self.uses.update([e]) if isinstance(e, relax.Var) else None)
        self.residuals_requantized = 0
        self.pools_requantized = 0
        # `tap_layers` (per-layer verify): every layer's output keeps a var of its own and its offset stays unfolded
        self.tap_layers = bool(options.get("tap_layers"))
        self.taps: dict[str, str] = {}  # layer name -> its output var's name

    def rewrite(self) -> Any:
        from tvm import relax

        outer = self

        @relax.expr_functor.mutator
        class Mutator(relax.PyExprMutator):
            def __init__(self, mod: Any) -> None:
                super().__init__(mod)
                self.quantized: dict[tuple[int, float, int], Any] = {}
                self.integer_features: dict[int, Any] = {}  # int8 layers' outputs as int32 values (requantize.py)

            def visit_call_(self, call: Any) -> Any:
                layer = outer.plans.get(id_of(call))
                new = self.visit_expr_post_order(call)
                if layer is None:
                    folded = outer.fold_offset(new, self)
                    return new if folded is None else folded
                lowered = outer.lower(layer, new, self)
                if outer.tap_layers:  # a var of a name of its own: per-layer verify taps it
                    outer.taps[layer.name] = f"socc_layer_{len(outer.taps)}"
                    lowered = self.builder_.emit(lowered, name_hint=outer.taps[layer.name])
                if outer.switch is None:
                    return lowered
                flag = relax.op.take(outer.switch, relax.const(outer.order[id_of(call)], "int64"), axis=0)
                return relax.op.where(flag, lowered, new)

        mutator = Mutator(self.mod)
        for gv, func in self.mod.functions_items():
            if gv.name_hint == "main":
                new_main = mutator.visit_expr(func)
                if self.switch is not None:
                    num_input = int(func.attrs["num_input"]) if "num_input" in func.attrs else len(func.params)
                    new_main = relax.Function([*new_main.params[:num_input], self.switch, *new_main.params[num_input:]],
                                              new_main.body, new_main.ret_ty, new_main.is_pure,
                                              new_main.attrs).with_attr("num_input", num_input + 1)
                mutator.builder_.update_func(gv, new_main)
        return mutator.builder_.get()

    def activation(self, mutator: Any, x: Any, layer: Layer, direct: bool = True) -> Any:
        """x quantized. Through max-pooling and layout ops, which commute exactly with a monotonic
        quantize, the quantize moves to their input, so they run on 8-bit data too. `direct`: x is
        the layer's own input (not one a commuting op takes)."""
        from tvm import relax

        if layer.quantized_input is not None:
            return mutator.visit_expr(layer.quantized_input)
        key = (id_of(x), layer.scale, layer.zero_point)
        if key not in mutator.quantized:
            source = mutator.lookup_binding(x) if isinstance(x, relax.Var) else None
            if isinstance(source, relax.Call) and getattr(source.op, "name", "") in QUANTIZE_COMMUTING_OPS:
                inner = self.activation(mutator, source.args[0], layer, direct=False)
                expr = relax.Call(source.op, [inner, *source.args[1:]], source.attrs, source.ty_args)
            else:
                expr = None
                if self.integer_requantize:
                    expr = self.requantize_expr(mutator, x, layer)
                elif direct and self.sole_consumer(layer.call.args[0]):
                    expr = self.folded_requantize(mutator, x, layer)
                if expr is None:
                    expr = _quantize_expr(x, layer.scale, layer.zero_point, self.act_dtype)
            mutator.quantized[key] = mutator.builder_.emit(expr)
        return mutator.quantized[key]

    def sole_consumer(self, var: Any) -> bool:
        """In the model as given, `var` comes from a planned int8 layer through ops of one var
        operand each (bias, activation), and each value on the way, `var` included, has one use:
        quantizing it leaves the float chain dead. (ResNet's stem output also feeds a residual add:
        folding its quantize split the conv, the float epilogue and the requantize into three kernels.)"""
        from tvm import relax

        for _ in range(8):  # (a bias, an activation, the importer's max/min pair: a few ops at most)
            value = self.bound.get(var) if isinstance(var, relax.Var) else None
            if value is None or self.uses[var] != 1:
                return False
            if id_of(value) in self.plans:
                return True
            operands = [a for arg in getattr(value, "args", []) for a in (arg.fields if isinstance(arg, relax.Tuple) else [arg])]
            inputs = [a for a in operands if isinstance(a, relax.Var)]
            if len(inputs) != 1:
                return False
            var = inputs[0]
        return False

    def folded_requantize(self, mutator: Any, x: Any, layer: Layer) -> Any:
        """x quantized for `layer` in one float multiply-add from the accumulator of the int8 layer
        that made it (`float_requantize`), when x is that layer's output through its bias and a
        ReLU/clip, if any; None otherwise."""
        from .requantize import float_requantize, trace_epilogue

        found = trace_epilogue(mutator, x, self.dequantized, self.model_biases, through_affine=False)
        if found is None:
            return None
        self.folded += 1
        return float_requantize(mutator, found, layer.scale, layer.zero_point, self.act_dtype, as_kernel=self.requantize_kernel)

    def requantize_expr(self, mutator: Any, x: Any, layer: Layer) -> Any:
        """x quantized for `layer` in integer arithmetic from the accumulator of the int8 layer that
        made it, when x is that layer's dequantized output plus a constant bias, through a ReLU or
        clip; None otherwise (the float quantize is used)."""
        from .requantize import (Skip, integer_dual_residual_requantize, integer_mean_requantize, integer_requantize,
                                 integer_residual_requantize, trace_epilogue, trace_mean, trace_residual)

        found = trace_epilogue(mutator, x, self.dequantized, self.model_biases)
        if found is not None:
            expr = integer_requantize(mutator, found, layer.scale, layer.zero_point, self.act_dtype)
            self.requantized += expr is not None
            return expr

        def quantized(skip: Any) -> Skip | None:  # skip as some layer's quantize already made it
            for (tensor, scale, zero_point), codes in mutator.quantized.items():
                if tensor == id_of(skip):
                    return Skip(codes, scale, zero_point)
            return None

        pooled = trace_mean(mutator, x, self.dequantized, self.model_biases, quantized)
        if pooled is not None:
            expr = integer_mean_requantize(mutator, *pooled, layer.scale, layer.zero_point, self.act_dtype)
            self.pools_requantized += expr is not None
            return expr

        residual = trace_residual(mutator, x, self.dequantized, self.model_biases, quantized)
        if residual is None:
            return None
        epilogue, skip = residual
        requantize = integer_residual_requantize if isinstance(skip, Skip) else integer_dual_residual_requantize
        expr = requantize(mutator, epilogue, skip, layer.scale, layer.zero_point, self.act_dtype)
        self.residuals_requantized += expr is not None
        return expr

    def dequantize(self, acc: Any, rescale: np.ndarray, correction: np.ndarray, acc_bound: int, mutator: Any) -> Any:
        """float(acc - correction) * rescale, computed as float(acc) * rescale + offset with the
        per-channel offset -correction * rescale, so that the float bias add which usually follows
        takes the offset into its own constant (`fold_offset`) and the correction costs no bytes;
        with integer requantize on, the correction goes into the requantize's int32 bias instead.
        Only where float(acc) is exact (`acc_bound`, the largest |acc|, under 2^24); otherwise
        the correction is subtracted in int32 first."""
        from tvm import relax

        op = relax.op
        if correction.any() and acc_bound >= FLOAT_EXACT:
            acc, correction = op.subtract(acc, relax.const(correction.astype(np.int32))), np.zeros_like(correction)
            acc_bound *= 2
        acc_var = mutator.builder_.emit(acc)
        dequantized = mutator.builder_.emit(_dequantize(acc_var, relax.const(rescale)))
        record = Dequantized(acc_var, acc_bound, rescale, correction.astype(np.int32))
        self.dequantized[id_of(dequantized)] = record
        if not correction.any():
            return dequantized
        offset = (-correction.astype(np.float64) * rescale).astype(np.float32)
        shifted = mutator.builder_.emit(op.add(dequantized, self.offset_constant(offset, np.zeros_like(offset))))
        self.offsets[id_of(shifted)] = (dequantized, offset)
        self.dequantized[id_of(shifted)] = record
        return shifted

    def offset_constant(self, offset: np.ndarray, bias: np.ndarray) -> Any:
        """The constant offset + bias, its model bias remembered for the integer requantize's trace."""
        from tvm import relax

        constant = relax.const(offset + bias)
        self.model_biases[id_of(constant)] = bias
        return constant

    def fold_offset(self, call: Any, mutator: Any) -> Any:
        """add(shifted, bias) -> add(dequantized, offset + bias) when `shifted` is a layer's
        dequantized output plus its zero-point offset and `bias` a float32 constant along the same
        channel axis (or a scalar); None otherwise. The model's bias is kept for integer requantize,
        which folds the correction into its int32 bias exactly."""
        from tvm import relax
        from tvm.ir.expr import Constant

        if self.tap_layers or not self.offsets or getattr(call.op, "name", "") != "relax.add":
            return None
        lhs, rhs = call.args
        if isinstance(lhs, Constant):
            lhs, rhs = rhs, lhs
        found = resolve(mutator, lhs)
        if found is None or not isinstance(rhs, Constant) or id_of(found[0]) not in self.offsets:
            return None
        dequantized, offset = self.offsets[id_of(found[0])]
        bias = rhs.value.numpy()
        if bias.dtype != np.float32 or bias.size not in (1, offset.size) or bias.ndim > offset.ndim:
            return None  # (a size-1 bias of more dims would broadcast the output to more dims)
        if bias.size > 1 and np.broadcast_shapes(bias.shape, offset.shape) != offset.shape:
            return None  # not along the offset's channel axis
        bias = np.broadcast_to(bias.reshape(offset.shape if bias.size > 1 else ()), offset.shape).copy()
        return relax.op.add(dequantized, self.offset_constant(offset, bias))

    def lower(self, layer: Layer, call: Any, mutator: Any) -> Any:
        if layer.mode == "int8":
            return self.conv_int8(layer, call, mutator) if layer.op_type == "Conv" else self.matmul_int8(layer, call, mutator)
        if layer.mode == "int8-weight":
            return self.take_int8(call) if layer.op_type == "Gather" else self.matmul_int8_rows(call, mutator)
        if layer.op_type == "MatMul":
            return self.matmul_int4(layer, call, mutator)
        return self.take_int4(call, mutator)

    def conv_int8(self, layer: Layer, call: Any, mutator: Any) -> Any:
        from tvm import relax

        op, attrs = relax.op, call.attrs
        data_layout, kernel_layout = str(attrs.data_layout), str(attrs.kernel_layout)
        out_axis = _weight_out_axis(layer)
        wq, w_scale = quantize_per_channel(_const(call.args[1]), axis=out_axis, levels=layer.levels)
        xq = self.activation(mutator, call.args[0], layer)
        padding = [int(p) for p in attrs.padding]
        sides: dict[str, list[int]] = {}
        if layer.zero_point and any(padding):  # pad with the zero point: real 0, as the float conv pads
            top, left, bottom, right = padding
            sides = {"H": [top, bottom], "W": [left, right]}
            padding = [0, 0, 0, 0]
        extra = -wq.shape[kernel_layout.index("I")] % self.channel_multiple if int(attrs.groups) == 1 else 0
        if extra:  # zero weights for the extra input channels: what they hold does not count
            sides["C"] = [0, extra]
            wq = np.pad(wq, [(0, extra if axis == "I" else 0) for axis in kernel_layout])
            self.padded_channels += extra
        if sides:
            xq = op.nn.pad(xq, [width for axis in data_layout for width in sides.get(axis, [0, 0])], pad_value=float(layer.zero_point))
        acc = self.split_conv(xq, wq, attrs, padding, out_axis)
        channel_shape = [-1 if axis == "C" else 1 for axis in data_layout]  # one value per output channel
        sums = wq.astype(np.int64).sum(axis=tuple(i for i in range(wq.ndim) if i != out_axis))
        rescale = (np.float64(layer.scale) * w_scale).astype(np.float32).reshape(channel_shape)
        if layer.dynamic_zero_point is not None:  # zero padding, then zero point x the weights inside each window
            window_sums = _window_sums(wq, layer.call, padding) if any(padding) else sums.reshape(channel_shape)
            acc = op.subtract(acc, op.multiply(op.astype(layer.dynamic_zero_point, "int32"), relax.const(window_sums.astype(np.int32))))
        return self.dequantize(acc, rescale, layer.zero_point * sums.reshape(channel_shape), _acc_bound(wq, out_axis, layer), mutator)

    def matmul_int8(self, layer: Layer, call: Any, mutator: Any) -> Any:
        from tvm import relax

        op = relax.op
        wq, w_scale = quantize_per_channel(_const(call.args[1]), axis=1, levels=layer.levels)
        acc = self.padded_matmul(self.activation(mutator, call.args[0], layer), wq)
        if layer.dynamic_zero_point is not None:
            column_sums = relax.const(wq.astype(np.int64).sum(axis=0).astype(np.int32))
            acc = op.subtract(acc, op.multiply(op.astype(layer.dynamic_zero_point, "int32"), column_sums))
        rescale = (np.float64(layer.scale) * w_scale).astype(np.float32)
        return self.dequantize(acc, rescale, layer.zero_point * wq.astype(np.int64).sum(axis=0), _acc_bound(wq, 1, layer), mutator)

    def padded_matmul(self, data: Any, wq: np.ndarray) -> Any:
        """matmul(data, wq) in int32, shaped for the target's int8 dot product (`column_multiple`
        lanes, when `channel_multiple` > 1 says there is one). Fewer columns than the multiple (a
        10-way head: no vector at all): wq with zero columns up to it, sliced back. More columns but
        no multiple of it (MobileNet's 1000 classes, VNNI's 16): two matmuls, the dot product on the
        largest multiple and a plain one on the rest, concatenated; padding instead would ship zero
        columns (1000 -> 1008 took int8 weights from 25.9% to 26.05% of float)."""
        from tvm import relax

        op = relax.op
        columns = wq.shape[1]
        multiple = self.column_multiple
        if columns < multiple:
            self.padded_columns += multiple - columns
            acc = op.matmul(data, relax.const(np.pad(wq, [(0, 0), (0, multiple - columns)])), out_dtype="int32")
            return op.strided_slice(acc, axes=[data.ty.ndim - 1], begin=[0], end=[columns])
        main = self.dot_product_part(columns)
        if main is None:
            return op.matmul(data, relax.const(wq), out_dtype="int32")
        self.split_columns += columns - main
        parts = [op.matmul(data, relax.const(np.ascontiguousarray(w)), out_dtype="int32") for w in (wq[:, :main], wq[:, main:])]
        return op.concat(parts, axis=-1)

    def dot_product_part(self, outputs: int) -> int | None:
        """How many of `outputs` channels (a matmul's columns, a conv's filters) the int8 dot product
        takes when the rest go to a plain tail (the largest multiple of its lanes); None when there is
        no dot product, no tail, or not one whole multiple."""
        main = outputs - outputs % self.column_multiple
        return main if self.channel_multiple > 1 and 0 < main < outputs else None

    def split_conv(self, xq: Any, wq: np.ndarray, attrs: Any, padding: list[int], out_axis: int) -> Any:
        """conv2d(xq, wq) in int32; a dense conv with more output channels than the dot product's
        lanes but no multiple of them (DenseNet's 144 -> 72 transition, VNNI's 16) is two convs, the
        dot product on the largest multiple of channels and a plain one on the rest, concatenated
        along the channels (as `padded_matmul`: the whole conv had been plain int8 vector code)."""
        from tvm import relax

        op = relax.op
        data_layout, kernel_layout = str(attrs.data_layout), str(attrs.kernel_layout)
        filters = wq.shape[out_axis]
        main = self.dot_product_part(filters) if int(attrs.groups) == 1 else None
        pieces = [wq]
        if main is not None:
            self.split_channels += filters - main
            pieces = [np.ascontiguousarray(np.take(wq, np.arange(lo, hi), axis=out_axis)) for lo, hi in ((0, main), (main, filters))]
        accs = [op.nn.conv2d(xq, relax.const(w), strides=attrs.strides, padding=padding, dilation=attrs.dilation, groups=int(attrs.groups),
                             data_layout=data_layout, kernel_layout=kernel_layout, out_dtype="int32") for w in pieces]
        return accs[0] if len(accs) == 1 else op.concat(accs, axis=data_layout.index("C"))

    def take_int8(self, call: Any) -> Any:
        from tvm import relax

        op, attrs = relax.op, call.attrs
        table, row_scale = self.int8_table(_const(call.args[0]))
        rows = op.take(table, call.args[1], axis=0, mode=str(attrs.mode))
        scales = op.take(row_scale, call.args[1], axis=0, mode=str(attrs.mode))
        return _dequantize(rows, scales)

    def matmul_int8_rows(self, call: Any, mutator: Any) -> Any:
        """x @ W with W the transpose of an embedding table (tied weights): the table's int8 rows serve both."""
        table, row_scale = self.int8_table(np.ascontiguousarray(_const(call.args[1]).T))
        return mutator.builder_.call_te(_int8_rows_matmul_te, call.args[0], table, row_scale, primfunc_name_hint="int8_rows_matmul")

    def int8_table(self, table: np.ndarray) -> tuple[Any, Any]:
        """A float table's int8 rows and per-row scales [rows, 1], as constants shared by every call
        on an equal table (stored once in the artifact)."""
        from tvm import relax

        key = _digest(table)
        if key not in self.int8_rows:
            tq, row_scale = quantize_per_channel(table, axis=0)
            self.int8_rows[key] = relax.const(tq), relax.const(row_scale.reshape(-1, 1))
        return self.int8_rows[key]

    def matmul_int4(self, layer: Layer, call: Any, mutator: Any) -> Any:
        from tvm import relax

        packed, scales, zeros = layer.int4 or quantize_int4_groups(_const(call.args[1]), self.group, self.weight_scheme)
        extra = [] if zeros is None else [relax.const(zeros)]
        return mutator.builder_.call_te(_q4_matmul_te, call.args[0], relax.const(packed), relax.const(scales), *extra,
                                        group=layer.group or self.group, primfunc_name_hint="q4_matmul")

    def take_int4(self, call: Any, mutator: Any) -> Any:
        from tvm import relax

        # rows of the table are the groups' home: quantize the transposed view so groups run along a row
        packed_t, scales_t, zeros_t = quantize_int4_groups(_const(call.args[0]).T, self.group, self.weight_scheme)
        if zeros_t is None:
            extra = []
        elif zeros_t.dtype == np.float16:  # scale-min: one minimum per group, like the scales
            extra = [relax.const(np.ascontiguousarray(zeros_t.T))]
        else:  # zero points come packed along the table's rows (axis 1 of the transposed view): repack along groups
            extra = [relax.const(pack_nibbles(unpack_nibbles(zeros_t, axis=1, length=scales_t.shape[1]).T, axis=1))]
        return mutator.builder_.call_te(_q4_take_te, call.args[1], relax.const(np.ascontiguousarray(packed_t.T)),
                                        relax.const(np.ascontiguousarray(scales_t.T)), *extra,
                                        group=self.group, primfunc_name_hint="q4_take")
