"""Integer requantize: an int8 layer's int32 accumulator to the next layer's 8-bit input, no float.

Used by the quantize pass when the target asks for it (`requantize = "integer"`). The float path
computes, per output channel c,

    q = clip(round(act(float(acc) * r[c] + b[c]) / s) + z, lo, hi)

(r = input scale x weight scale, b the bias, s/z the next layer's input scale and zero point,
act a ReLU or clip). The integer path computes

    q = clip(((int64(acc + B[c]) * M[c] + 2^(S-1)) >> S) + z, lo', hi')

with B[c] = round(b[c] / r[c]) - C[c] (C the layer's zero-point correction, folded here
instead of subtracted from the accumulator), M[c] = round(r[c] / s * 2^S) under 2^31 (one shift S per layer,
fixed by the largest multiplier) and the activation folded into the clip bounds (a ReLU clips at
z, clip(a, b) at z + round(a / s) and z + round(b / s)). acc + B stays int32 and the product is a
32 x 32 -> 64-bit multiply whose high half LLVM finds (HVX: vmpye/vmpyo).

A global average pool of such a layer's output (MobileNetV2's last conv, ReLU6, mean over the
image), quantized for the next layer, is integer too: each pixel's term goes to the output scale
with F fractional bits and is clipped to the activation's bounds there, the terms are summed over
the pooled axes in int32, and the sum is multiplied by 1 / (count x 2^F) (a multiply-high),

    t = clip(((acc + B[c]) * M[c]) >> S, lo_F, hi_F),   q = clip(((sum t) * M'' + 2^(S''-1)) >> S'' + z, lo', hi')

so the conv's epilogue and the pool run without float (on Hexagon: in HVX, not scalar float).

A residual add of such a layer's output (bias included, no activation of its own) and a tensor
already quantized for another layer (q', s', z': a block's input, which its first conv takes) is
requantized in integer too, as quantized runtimes add (TFLite, QNN): both terms go to the output
scale with F fractional bits (RESIDUAL_FRACTION_BITS at most), each by its own multiply-high,

    t = ((acc + B[c]) * M[c]) >> S,  t' = (((q' - z') << L) * M') >> S',
    q = clip(((t + t' + 2^(F-1)) >> F) + z, lo', hi')

(M[c] / 2^S = r[c] / s * 2^F, M' / 2^S' = s' / s * 2^(F-L), L = SKIP_LEFT_SHIFT). Every shift is at
least 33, so each product's rounding and shift fall on its high word (HVX: a multiply-high and
32-bit ops, no 64-bit arithmetic). The skip term takes the quantized q', not the float tensor:
the error of its 8-bit rounding is added, as in those runtimes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

INT32_LIMIT = 1 << 31


@dataclasses.dataclass
class Dequantized:
    """An int8 layer's float output float(acc - correction) * rescale, as the quantize pass emitted it."""

    acc: Any  # the int32 accumulator var (the correction not yet subtracted)
    acc_bound: int  # the largest |acc| the layer's codes can give
    rescale: np.ndarray  # float32, broadcast like the accumulator's channel axis
    correction: np.ndarray  # int32 per channel, same shape as rescale: input zero point x weight column sums


@dataclasses.dataclass
class Epilogue:
    """What lies between an int8 layer's accumulator and the next quantize."""

    source: Dequantized
    bias: np.ndarray  # float32, same shape as rescale
    low: float  # the activation's bounds in float (-inf/inf: none)
    high: float


def resolve(mutator: Any, var: Any) -> Any:
    """The value bound to `var`, through aliases (v1 = v0); None for a non-var or unbound var."""
    from tvm import relax

    value = var
    while isinstance(value, relax.Var):
        var, value = value, mutator.lookup_binding(value)
    return None if value is None or value is var else (var, value)


def trace_epilogue(mutator: Any, x: Any, dequantized: dict[int, Dequantized], model_biases: dict[int, np.ndarray],
                   through_affine: bool = True) -> Epilogue | None:
    """x's chain back to a dequantized accumulator: [relu | clip] (add(dequantized, bias constant) | dequantized),
    or (`through_affine`) [relu | clip] of an inference BatchNorm's affine over such outputs
    concatenated (`_affine_epilogue`, which emits the int32 concatenation).

    `dequantized`: by the hash of each dequantized output var (an IR node's identity);
    `model_biases`: by the hash of a bias constant that holds the model's bias minus the layer's
    zero-point correction x rescale, that model bias (exact, for the integer bias)."""
    found, low, high = _peel_activations(mutator, x, dequantized)
    if found is None:
        return None
    epilogue = _layer_output(mutator, found, dequantized, model_biases)
    if epilogue is None and through_affine:
        epilogue = _affine_epilogue(mutator, found, dequantized, model_biases)
    return None if epilogue is None else dataclasses.replace(epilogue, low=low, high=high)


def _is_op(value: Any, name: str) -> bool:
    from tvm import relax

    return isinstance(value, relax.Call) and getattr(value.op, "name", "") == name


def _var_and_constant(call: Any) -> tuple[Any, Any] | None:
    """(the var operand, the constant operand) of a binary call, either order; None otherwise."""
    from tvm import relax
    from tvm.ir.expr import Constant

    lhs, rhs = call.args
    if isinstance(rhs, relax.Var) and isinstance(lhs, Constant):
        lhs, rhs = rhs, lhs
    return (lhs, rhs) if isinstance(lhs, relax.Var) and isinstance(rhs, Constant) else None


def _layer_output(mutator: Any, found: tuple[Any, Any], dequantized: dict[int, Dequantized], model_biases: dict[int, np.ndarray]) -> Epilogue | None:
    """add(dequantized, bias constant) | dequantized, without activation bounds."""
    bias = bias_constant = None
    if _is_op(found[1], "relax.add"):
        operands = _var_and_constant(found[1])
        if operands is None:
            return None
        bias, bias_constant = operands[1].value.numpy(), operands[1]
        found = resolve(mutator, operands[0])
    if found is None or found[0].__hash__() not in dequantized:
        return None
    source = dequantized[found[0].__hash__()]
    rescale = source.rescale
    if bias_constant is not None and bias_constant.__hash__() in model_biases:
        bias = model_biases[bias_constant.__hash__()]
    if bias is None:
        bias = np.zeros_like(rescale)
    if bias.dtype != np.float32 or not _along_rescale(bias, rescale):
        return None  # not one value per output channel along the accumulator's channel axis
    return Epilogue(source, bias.reshape(rescale.shape), -math.inf, math.inf)


def _along_rescale(vector: np.ndarray, rescale: np.ndarray) -> bool:
    """One value per element of `rescale`, along its axes (it broadcasts to rescale's shape)."""
    return vector.size == rescale.size and np.broadcast_shapes(vector.shape, rescale.shape) == rescale.shape


def _affine_epilogue(mutator: Any, found: tuple[Any, Any], dequantized: dict[int, Dequantized],
                     model_biases: dict[int, np.ndarray]) -> Epilogue | None:
    """[add(., t)] [multiply(., s)] y, t and s per-channel constants (an inference BatchNorm after
    fold-batchnorm), y activation-free int8 layer outputs concatenated along their channel axis
    (DenseNet's features, `_concatenated`) or one such output: since each is float(acc) * r + b,
    the whole is float(acc) * (r * s) + (b * s + t) over the int32 accumulators concatenated, an
    epilogue like any layer's, which each consumer requantizes from the int32 values."""
    shift = scale = None
    result_shape = [str(d) for d in found[1].ty.shape]
    if _is_op(found[1], "relax.add"):
        operands = _var_and_constant(found[1])
        if operands is None or operands[1].__hash__() in model_biases:
            return None  # (a layer's own bias and zero-point offset: `_layer_output`'s)
        found, shift = resolve(mutator, operands[0]), operands[1].value.numpy().astype(np.float64)
    if found is not None and _is_op(found[1], "relax.multiply"):
        operands = _var_and_constant(found[1])
        if operands is None:
            return None
        found, scale = resolve(mutator, operands[0]), operands[1].value.numpy().astype(np.float64)
    if found is None:
        return None
    if shift is None and scale is None and not _is_op(found[1], "relax.concat"):
        return None
    base = _feature(mutator, found, dequantized, model_biases)
    if base is None or [str(d) for d in base.source.acc.ty.shape] != result_shape:
        return None  # (a constant of more dims would broadcast the result to them)
    rescale, bias = base.source.rescale.astype(np.float64), base.bias.astype(np.float64)
    scale = np.ones(()) if scale is None else scale
    shift = np.zeros(()) if shift is None else shift
    if any(vector.size > 1 and not _along_rescale(vector, rescale) for vector in (scale, shift)):
        return None  # not per channel along the accumulator's channel axis
    source = dataclasses.replace(base.source, rescale=rescale * scale.reshape(scale.shape if scale.size > 1 else ()))
    return Epilogue(source, (bias * scale + shift).reshape(rescale.shape), -math.inf, math.inf)


def _concatenated(mutator: Any, found: tuple[Any, Any], dequantized: dict[int, Dequantized],
                  model_biases: dict[int, np.ndarray]) -> Epilogue | None:
    """concat(y1, y2, ...) along the channel axis, each y an activation-free int8 layer output or
    such a concatenation: one epilogue over the accumulators concatenated in int32, its
    per-channel vectors concatenated."""
    from tvm import relax, tirx

    call = found[1]
    parts = call.args[0]
    if isinstance(parts, relax.Var):
        parts = mutator.lookup_binding(parts)
    if not isinstance(parts, relax.Tuple):
        return None
    rank = int(call.ty.ndim)
    axis = int(call.attrs.axis) % rank
    pieces = []
    for part in parts.fields:
        resolved = resolve(mutator, part) if isinstance(part, relax.Var) else None
        if resolved is None:
            return None
        piece = _feature(mutator, resolved, dequantized, model_biases)
        if piece is None or _channel_axis(piece) not in (axis, None) or str(piece.source.acc.ty.dtype) != "int32":
            return None
        channels = piece.source.acc.ty.shape[axis]
        if not isinstance(channels, tirx.IntImm):
            return None
        pieces.append((piece, int(channels)))

    def joined(vectors: list[np.ndarray]) -> np.ndarray:
        flat = [np.broadcast_to(v.reshape(-1) if v.size > 1 else v.reshape(()), (n,)) for v, (_, n) in zip(vectors, pieces)]
        shape = [1] * rank
        shape[axis] = -1
        return np.concatenate(flat).reshape(shape)

    acc = mutator.builder_.emit(relax.op.concat([piece.source.acc for piece, _ in pieces], axis=axis))
    source = Dequantized(acc, max(piece.source.acc_bound for piece, _ in pieces),
                         joined([piece.source.rescale.astype(np.float64) for piece, _ in pieces]),
                         joined([piece.source.correction for piece, _ in pieces]).astype(np.int32))
    return Epilogue(source, joined([piece.bias.astype(np.float64) for piece, _ in pieces]), -math.inf, math.inf)


def _feature(mutator: Any, found: tuple[Any, Any], dequantized: dict[int, Dequantized],
             model_biases: dict[int, np.ndarray]) -> Epilogue | None:
    """An activation-free int8 layer output (`_layer_output`), its average pool (`_pooled`) or a
    concatenation of such (`_concatenated`); the int32 values these emit are emitted once per var
    (memoized in `mutator.integer_features`: every consumer requantizes the same ones)."""
    memo: dict[int, Epilogue | None] = mutator.integer_features
    key = found[0].__hash__()
    if key not in memo:
        if _is_op(found[1], "relax.concat"):
            memo[key] = _concatenated(mutator, found, dequantized, model_biases)
        elif _is_op(found[1], "relax.nn.avg_pool2d"):
            memo[key] = _pooled(mutator, found, dequantized, model_biases)
        else:
            memo[key] = _layer_output(mutator, found, dequantized, model_biases)
    return memo[key]


def _pooled(mutator: Any, found: tuple[Any, Any], dequantized: dict[int, Dequantized],
            model_biases: dict[int, np.ndarray]) -> Epilogue | None:
    """avg_pool2d (no padding, no ceil mode, no dilation) of an activation-free int8 layer output
    (DenseNet's transition): the mean of float(acc) * r + b over a window of n is
    float(sum of acc) * (r / n) + b, so the pool sums the int32 accumulators (exact) instead."""
    from tvm import relax, tirx

    call = found[1]
    attrs = call.attrs
    if (any(int(p) for p in attrs.padding) or bool(attrs.ceil_mode) or any(int(d) != 1 for d in attrs.dilation)
            or str(attrs.layout) != str(attrs.out_layout) or not isinstance(call.args[0], relax.Var)):
        return None
    inner = resolve(mutator, call.args[0])
    base = None if inner is None else _feature(mutator, inner, dequantized, model_biases)
    layout = str(attrs.layout)
    if base is None or _channel_axis(base) not in (layout.index("C"), None) or sorted(layout) != sorted("NCHW"):
        return None
    if not all(isinstance(d, tirx.IntImm) for d in call.ty.shape):
        return None  # (a dynamic batch)
    window, strides = [int(k) for k in attrs.pool_size], [int(k) for k in attrs.strides]
    count = window[0] * window[1]
    if base.source.acc_bound * count >= INT32_LIMIT:
        return None
    summed = mutator.builder_.call_te(_sum_pool_te, base.source.acc, axes=(layout.index("H"), layout.index("W")), window=tuple(window),
                                      strides=tuple(strides), out_shape=[int(d) for d in call.ty.shape], primfunc_name_hint="sum_pool")
    source = Dequantized(mutator.builder_.emit(summed), base.source.acc_bound * count, base.source.rescale.astype(np.float64) / count,
                         (base.source.correction.astype(np.int64) * count).astype(np.int32))
    return Epilogue(source, base.bias, -math.inf, math.inf)


def _sum_pool_te(acc: Any, *, axes: tuple[int, int], window: tuple[int, int], strides: tuple[int, int], out_shape: list[int]) -> Any:
    """The int32 sum of acc over each pooling window (axes: the H and W axes)."""
    from tvm import te

    reduce = [te.reduce_axis((0, k), name=f"r{i}") for i, k in enumerate(window)]

    def window_sum(*index: Any) -> Any:
        source = list(index)
        for axis, stride, r in zip(axes, strides, reduce):
            source[axis] = index[axis] * stride + r
        return te.sum(acc[tuple(source)], axis=reduce)

    return te.compute(out_shape, window_sum, name="sum_pool")


def _activation_bounds(value: Any) -> tuple[float, float, Any] | None:
    """(low, high, input) when `value` clamps its input: relu, clip, or maximum/minimum with a constant
    scalar bound (Relax's ops, or a call of TVM's TE kernels as the ONNX importer writes a Clip)."""
    from tvm import relax

    if not isinstance(value, relax.Call):
        return None
    name = getattr(value.op, "name", "")
    if name == "relax.nn.relu":
        return 0.0, math.inf, value.args[0]
    if name == "relax.clip":
        return float(value.args[1].value), float(value.args[2].value), value.args[0]
    found = _clamp_operands(value)
    if found is None:
        return None
    kernel, data, bound = found
    limit = float(bound.value.numpy().reshape(()))
    return (limit, math.inf, data) if kernel == "maximum" else (-math.inf, limit, data)


def _clamp_operands(call: Any) -> tuple[str, Any, Any] | None:
    """("maximum" | "minimum", data, bound) when `call` takes the max/min of data and a one-element constant."""
    from tvm import relax
    from tvm.ir.expr import Constant

    name = getattr(call.op, "name", "")
    if name in ("relax.maximum", "relax.minimum"):
        kind, (data, bound) = name.removeprefix("relax."), call.args
    elif name == "relax.call_tir" and isinstance(call.args[1], relax.Tuple) and len(call.args[1].fields) == 2:
        kind, (data, bound) = call.args[0].name_hint.rstrip("0123456789"), call.args[1].fields
    else:
        return None
    if kind not in ("maximum", "minimum") or not isinstance(bound, Constant) or bound.value.numpy().size != 1:
        return None
    return kind, data, bound


@dataclasses.dataclass
class Skip:
    """The other operand of a residual add: a tensor already quantized for another layer."""

    codes: Any  # its 8-bit var
    scale: float
    zero_point: int


def _peel_activations(mutator: Any, x: Any, dequantized: dict[int, Dequantized]) -> tuple[Any, float, float]:
    """(x's binding under any relu/clip, their bounds in float); a layer's dequantized output ends
    the peel (its own max(., -FLT_MAX), which stops FMA fusion, is no activation)."""
    low, high = -math.inf, math.inf
    found = resolve(mutator, x)
    for _ in range(2):  # relu, clip, or the max/min pair TVM's importer makes of a Clip with input bounds
        at_layer = found is not None and found[0].__hash__() in dequantized
        bounds = _activation_bounds(found[1]) if found is not None and not at_layer else None
        if bounds is None:
            break
        low, high = max(low, bounds[0]), min(high, bounds[1])
        found = resolve(mutator, bounds[2])
    return found, low, high


def trace_residual(mutator: Any, x: Any, dequantized: dict[int, Dequantized], model_biases: dict[int, np.ndarray],
                   quantized: Any) -> tuple[Epilogue, Skip | Epilogue] | None:
    """x's chain back to [relu | clip] add(an int8 layer's output with its bias, skip), where
    `quantized(skip)` gives skip's 8-bit form (a Skip) or None; failing that, skip may be another
    int8 layer's output with its bias (an Epilogue). Neither layer's output may have an activation
    of its own; the epilogue returned carries the bounds of the one after the add."""
    from tvm import relax

    found, low, high = _peel_activations(mutator, x, dequantized)
    if found is None or not _is_op(found[1], "relax.add"):
        return None
    lhs, rhs = found[1].args
    for main, other in ((lhs, rhs), (rhs, lhs)):
        if not isinstance(other, relax.Var):
            continue
        epilogue = trace_epilogue(mutator, main, dequantized, model_biases)
        # the skip: 8-bit codes some layer's quantize made, else another int8 layer's output with
        # its bias and no activation (a downsample block's 1x1 conv)
        skip = quantized(other)
        if skip is None:
            skip = trace_epilogue(mutator, other, dequantized, model_biases)
            if skip is not None and (skip.low > -math.inf or skip.high < math.inf):
                skip = None
        if epilogue is None or epilogue.low > -math.inf or epilogue.high < math.inf or skip is None:
            continue
        skip_shape = skip.codes.ty.shape if isinstance(skip, Skip) else skip.source.acc.ty.shape
        if [str(d) for d in skip_shape] != [str(d) for d in epilogue.source.acc.ty.shape]:
            continue  # a broadcast add (dims compared as printed: a symbolic one has no int)
        if isinstance(skip, Epilogue) and _channel_axis(skip) != _channel_axis(epilogue):
            continue
        epilogue.low, epilogue.high = low, high
        return epilogue, skip
    return None


def fixed_point(multiplier: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-channel int32 multipliers M (< 2^31) and one shift S with M / 2^S ~= multiplier (all > 0)."""
    shift = int(min(62, max(1, 30 - math.floor(math.log2(float(multiplier.max()))))))
    return np.minimum(np.rint(multiplier * 2.0 ** shift), (1 << 31) - 1).astype(np.int32), shift


def _bias_codes(epilogue: Epilogue) -> np.ndarray | None:
    """B = round(b / r) - C, or None when the rescale is not positive or acc + B could overflow int32."""
    source = epilogue.source
    rescale = source.rescale.astype(np.float64)
    if not np.all(rescale > 0):
        return None
    bias_codes = np.rint(epilogue.bias.astype(np.float64) / rescale) - source.correction
    return None if source.acc_bound + np.abs(bias_codes).max(initial=0) >= INT32_LIMIT else bias_codes


def _clip_bounds(epilogue: Epilogue, scale: float, zero_point: int, dtype: str) -> tuple[int, int]:
    lo, hi = (0, 255) if dtype == "uint8" else (-127, 127)
    if epilogue.low > -math.inf:
        lo = max(lo, zero_point + int(np.clip(np.rint(epilogue.low / scale), -INT32_LIMIT, INT32_LIMIT)))
    if epilogue.high < math.inf:
        hi = min(hi, zero_point + int(np.clip(np.rint(epilogue.high / scale), -INT32_LIMIT, INT32_LIMIT)))
    return min(lo, hi), hi


def _channel_axis(epilogue: Epilogue) -> int | None:
    """The accumulator's axis the per-channel vectors run along; None when there is one value (a
    layer with one output channel, a per-tensor weight scale): every element reads element 0."""
    rescale = epilogue.source.rescale
    if rescale.size == 1:
        return None
    return len(epilogue.source.acc.ty.shape) - rescale.ndim + int(np.argmax(rescale.shape))


def _per_channel(vector: Any, index: tuple[Any, ...], axis: int | None) -> Any:
    """The element of a per-channel vector that the accumulator's element at `index` uses."""
    return vector[0] if axis is None else vector[index[axis]]


def integer_requantize(mutator: Any, epilogue: Epilogue, scale: float, zero_point: int, dtype: str) -> Any:
    """The Relax expression of the integer requantize (module docstring); None when it does not fit
    (a non-positive rescale, acc + bias that could overflow int32)."""
    from tvm import relax

    bias_codes = _bias_codes(epilogue)
    if bias_codes is None:
        return None
    multiplier, shift = fixed_point(epilogue.source.rescale.astype(np.float64) / scale)
    return mutator.builder_.call_te(_requantize_te, epilogue.source.acc, relax.const(bias_codes.astype(np.int32).reshape(-1)),
                                    relax.const(multiplier.reshape(-1)), axis=_channel_axis(epilogue), shift=shift, zero_point=zero_point,
                                    bounds=_clip_bounds(epilogue, scale, zero_point, dtype), dtype=dtype, primfunc_name_hint="requantize")


def fence(product: Any) -> Any:
    """max(product, -FLT_MAX): changes no finite value and keeps `product + c` from becoming a fused
    multiply-add. TVM's LLVM code generator always allows fusing float ops, so `x * s + b` becomes
    one wherever LLVM sees both in one expression, which depends on the target and on how the
    kernel was scheduled: results would differ by an ulp between host, ARM and Hexagon builds of
    the same int8 model, and an ulp moves a value across a rounding step of the next quantize."""
    from tvm import relax

    return relax.op.maximum(product, relax.const(np.float32(FLOAT_LOWEST)))


FLOAT_LOWEST = float(-np.finfo(np.float32).max)


def float_requantize(mutator: Any, epilogue: Epilogue, scale: float, zero_point: int, dtype: str, as_kernel: bool = True) -> Any:
    """The float requantize folded into one multiply-add per element,

        q = clip(lrint(fence(float(acc) * (r[c] / s)) + (b[c] - C[c] * r[c]) / s + z), lo', hi')

    in place of dequantize, bias, activation and quantize (float(acc) * r, + b - C * r, clip,
    * 1 / s, round, + z, clip: two multiplies and two clips more). The activation folds into the
    clip bounds as in the integer requantize (round is monotonic: clipping before or after it
    gives the same codes). Equal to the unfolded chain up to the rounding of its float steps: a
    code moves by one only where a value lies within an ulp of a rounding step.

    `lrint` rounds half to even as `round` does, in the conversion to int32 (x86: one `vcvtps2dq`
    for `vrndscaleps` + `vcvttps2dq`), and the clip is then on integers, which LLVM folds into the
    narrowing (uint8 from 0 to 255: `vpmaxsd` + `vpmovusdb` for two float clips and `vpmovdb`).
    Where the value could leave int32 (the layer's largest |acc| times the multiplier), the clip
    stays in float, before the conversion. Without `as_kernel` (no float vectors, where lrint is a
    libm call per element, or an accelerator partition that must see graph ops, not a kernel),
    the same sum as Relax ops, rounded and clipped in float."""
    from tvm import relax

    op, source = relax.op, epilogue.source
    rescale = source.rescale.astype(np.float64)
    multiplier = (rescale / scale).astype(np.float32)
    offset = ((epilogue.bias.astype(np.float64) - source.correction * rescale) / scale + zero_point).astype(np.float32)
    lo, hi = _clip_bounds(epilogue, scale, zero_point, dtype)
    if not as_kernel:
        product = fence(op.multiply(op.astype(source.acc, "float32"), relax.const(multiplier)))
        return op.astype(op.clip(op.round(op.add(product, relax.const(offset))), lo, hi), dtype)
    largest = float(source.acc_bound) * float(np.abs(multiplier).max()) + float(np.abs(offset).max())
    return mutator.builder_.call_te(_float_requantize_te, source.acc, relax.const(multiplier.reshape(-1)), relax.const(offset.reshape(-1)),
                                    axis=_channel_axis(epilogue), bounds=(lo, hi), clip_in_float=largest >= LRINT_SAFE, dtype=dtype, primfunc_name_hint="requantize")


LRINT_SAFE = float(1 << 30)  # |value| under this converts to int32 with room to spare


def _float_requantize_te(acc: Any, multiplier: Any, offset: Any, *, axis: int | None, bounds: tuple[int, int], clip_in_float: bool,
                         dtype: str) -> Any:
    """One stage: the fenced product, the offset, lrint to int32 and the clip (in float first where
    the value could leave int32), the cast to 8 bits."""
    from tvm import te, tirx

    lo, hi = bounds

    def code(*index: Any) -> Any:
        product = tirx.max(acc[index].astype("float32") * _per_channel(multiplier, index, axis), tirx.const(FLOAT_LOWEST, "float32"))
        value = product + _per_channel(offset, index, axis)
        if clip_in_float:
            value = tirx.max(tirx.min(value, tirx.const(hi, "float32")), tirx.const(lo, "float32"))
        rounded = tirx.call_llvm_pure_intrin("int32", "llvm.lrint", value)
        return tirx.max(tirx.min(rounded, hi), lo).astype(dtype)

    return te.compute(acc.shape, code, name="float_requantize")


RESIDUAL_FRACTION_BITS = 8
RESIDUAL_MIN_FRACTION_BITS = 4
# a pooled term's rounding error is at most 2^-(F+1) output steps and the pool averages them: F = 1
# already keeps the pool's error under the output's own rounding (measured: MobileNetV2's last layer)
POOL_MIN_FRACTION_BITS = 1
SKIP_LEFT_SHIFT = 20  # (q' - z') << 20 stays under 2^28
HIGH_WORD_SHIFT = 33  # the least shift whose rounding constant has no bit in the low word


def _fraction_bits(largest_multiplier: float) -> int:
    """F for terms at the output scale x 2^F: at most RESIDUAL_FRACTION_BITS, and fixed_point's shift
    for that multiplier x 2^F (30 - floor(log2(m)) - F) at least HIGH_WORD_SHIFT."""
    return min(RESIDUAL_FRACTION_BITS, 30 - math.floor(math.log2(largest_multiplier)) - HIGH_WORD_SHIFT)


def _term_bound(epilogue: Epilogue, bias_codes: np.ndarray, multiplier: np.ndarray, fraction: int) -> float:
    """The largest |((acc + B) * M) >> S| of a layer's term at the output scale x 2^F."""
    return (epilogue.source.acc_bound + np.abs(bias_codes).max(initial=0)) * multiplier.max() * 2.0 ** fraction


def integer_residual_requantize(mutator: Any, epilogue: Epilogue, skip: Skip, scale: float, zero_point: int, dtype: str) -> Any:
    """The residual add's integer requantize (module docstring); None when a term could overflow
    int32, or the layer's multiplier is too large for F >= RESIDUAL_MIN_FRACTION_BITS with a
    high-word shift."""
    from tvm import relax

    bias_codes = _bias_codes(epilogue)
    if bias_codes is None:
        return None
    main_multiplier = epilogue.source.rescale.astype(np.float64) / scale
    # fixed_point's shift for m * 2^F is 30 - floor(log2(m)) - F: at least HIGH_WORD_SHIFT
    fraction = _fraction_bits(float(main_multiplier.max()))
    if fraction < RESIDUAL_MIN_FRACTION_BITS:
        return None
    multiplier, shift = fixed_point(main_multiplier * 2.0 ** fraction)
    skip_fixed, skip_shift = fixed_point(np.array([skip.scale / scale * 2.0 ** (fraction - SKIP_LEFT_SHIFT)]))
    main_bound = _term_bound(epilogue, bias_codes, main_multiplier, fraction)
    skip_bound = 255 * skip.scale / scale * 2.0 ** fraction
    if skip_shift < HIGH_WORD_SHIFT or main_bound + skip_bound + 2.0 ** fraction >= INT32_LIMIT / 2:
        return None
    return mutator.builder_.call_te(_residual_requantize_te, epilogue.source.acc, relax.const(bias_codes.astype(np.int32).reshape(-1)),
                                    relax.const(multiplier.reshape(-1)), skip.codes, axis=_channel_axis(epilogue),
                                    shifts=(shift, skip_shift, fraction), skip_multiplier=int(skip_fixed[0]),
                                    zero_points=(skip.zero_point, zero_point), bounds=_clip_bounds(epilogue, scale, zero_point, dtype),
                                    dtype=dtype, primfunc_name_hint="requantize_residual")


def trace_mean(mutator: Any, x: Any, dequantized: dict[int, Dequantized], model_biases: dict[int, np.ndarray],
               quantized: Any) -> tuple[Epilogue, Skip | Epilogue | None, list[int], bool] | None:
    """x's chain back to mean(y) over axes other than the channel axis, y an int8 layer's epilogue
    or a residual add (`trace_residual`): (the epilogue, the residual's skip or None, the pooled
    axes, keepdims); None otherwise."""
    found = resolve(mutator, x)
    if found is None or not _is_op(found[1], "relax.mean"):
        return None
    call = found[1]
    epilogue, skip = trace_epilogue(mutator, call.args[0], dequantized, model_biases), None
    if epilogue is None:
        epilogue, skip = trace_residual(mutator, call.args[0], dequantized, model_biases, quantized) or (None, None)
    if epilogue is None or call.attrs.axis is None:
        return None
    rank = len(epilogue.source.acc.ty.shape)
    axes = sorted(int(a) % rank for a in call.attrs.axis)
    if _channel_axis(epilogue) in axes:
        return None
    return epilogue, skip, axes, bool(call.attrs.keepdims)


def integer_mean_requantize(mutator: Any, epilogue: Epilogue, skip: Skip | Epilogue | None, axes: list[int], keepdims: bool,
                            scale: float, zero_point: int, dtype: str) -> Any:
    """The pool's integer requantize (module docstring), of a layer's output or of a residual add
    (each pixel's term is then the sum of both terms, as in the residual requantize); None when a
    pooled dim is symbolic, the multipliers leave fewer than POOL_MIN_FRACTION_BITS with high-word
    shifts, or the sum could overflow int32."""
    from tvm import relax, tirx

    dims = [epilogue.source.acc.ty.shape[a] for a in axes]
    layers = [epilogue] if not isinstance(skip, Epilogue) else [epilogue, skip]
    biases = [_bias_codes(e) for e in layers]
    if any(b is None for b in biases) or not all(isinstance(d, tirx.IntImm) for d in dims):
        return None
    count = int(np.prod([int(d) for d in dims]))
    multipliers = [e.source.rescale.astype(np.float64) / scale for e in layers]
    fraction = _fraction_bits(max(float(m.max()) for m in multipliers))
    if fraction < POOL_MIN_FRACTION_BITS:
        return None
    fixed = [fixed_point(m * 2.0 ** fraction) for m in multipliers]
    unbounded = sum(_term_bound(e, b, m, fraction) for e, b, m in zip(layers, biases, multipliers))
    args = [value for e, b, (m, _) in zip(layers, biases, fixed)
            for value in (e.source.acc, relax.const(b.astype(np.int32).reshape(-1)), relax.const(m.reshape(-1)))]
    shifts = [shift for _, shift in fixed]
    codes = None
    if isinstance(skip, Skip):
        skip_fixed, skip_shift = fixed_point(np.array([skip.scale / scale * 2.0 ** (fraction - SKIP_LEFT_SHIFT)]))
        if skip_shift < HIGH_WORD_SHIFT:
            return None
        unbounded += 255 * skip.scale / scale * 2.0 ** fraction
        args.append(skip.codes)
        shifts.append(skip_shift)
        codes = (skip.zero_point, int(skip_fixed[0]))
    low, high = (-unbounded - 1 if epilogue.low == -math.inf else epilogue.low / scale * 2.0 ** fraction,
                 unbounded + 1 if epilogue.high == math.inf else epilogue.high / scale * 2.0 ** fraction)
    term_bounds = (int(np.clip(np.rint(low), -INT32_LIMIT + 1, INT32_LIMIT - 1)), int(np.clip(np.rint(high), -INT32_LIMIT + 1, INT32_LIMIT - 1)))
    if unbounded >= INT32_LIMIT // 4 or count * max(abs(term_bounds[0]), abs(term_bounds[1])) >= INT32_LIMIT // 2:
        return None
    pool_multiplier, pool_shift = fixed_point(np.array([1.0 / (count * 2.0 ** fraction)]))
    return mutator.builder_.call_te(_mean_requantize_te, *args, axis=_channel_axis(epilogue), pooled=tuple(axes), keepdims=keepdims,
                                    shifts=tuple(shifts), codes=codes, pool=(int(pool_multiplier[0]), pool_shift), term_bounds=term_bounds,
                                    zero_point=zero_point, bounds=_clip_bounds(epilogue, scale, zero_point, dtype), dtype=dtype,
                                    primfunc_name_hint="requantize_mean")


def fold_output_biases(mod: Any, dequantized: dict[int, Dequantized], shifted: set[int] = frozenset()) -> tuple[Any, int]:
    """Integer requantize's form for a layer whose float output is the model's output (a
    classifier's logits): `float(acc) * r` then `+ b` (and the max that keeps the two apart) becomes
    `float(acc + B) * r` with B = round(b / r) per channel in the accumulator, as quantized runtimes
    keep a bias: one int32 add and two float ops, where the float ones are scalar (Hexagon under
    qemu). Nothing follows the multiply in the model, so no fused multiply-add can form. Returns
    the module and how many outputs were folded. `shifted`: the vars that already add the layer's
    zero-point offset (a bias added to one of those is the model's alone: left as it is)."""
    from tvm import relax
    from tvm.ir.expr import Constant

    main = mod["main"]
    body = main.body
    returned = body.body.fields if isinstance(body.body, relax.Tuple) else [body.body]
    outputs = {v.__hash__() for v in returned if isinstance(v, relax.Var)}
    aliases = {b.var.__hash__(): b.value for block in body.blocks for b in block.bindings if isinstance(b.value, relax.Var)}
    folded = 0
    blocks = []
    for block in body.blocks:
        bindings = []
        for binding in block.bindings:
            value = binding.value
            if binding.var.__hash__() in outputs and _is_op(value, "relax.add"):
                lhs, rhs = value.args
                while lhs.__hash__() in aliases:  # v = dequantized
                    lhs = aliases[lhs.__hash__()]
                record = dequantized.get(lhs.__hash__()) if isinstance(rhs, Constant) and lhs.__hash__() not in shifted else None
                new = _folded_output(record, rhs.value.numpy()) if record is not None else None
                if new is not None:
                    value, folded = new, folded + 1
            bindings.append(binding if value.same_as(binding.value) else relax.VarBinding(binding.var, value))  # (MatchCasts kept)
        blocks.append(type(block)(bindings))
    if not folded:
        return mod, 0
    result = mod.clone()
    result["main"] = relax.Function(main.params, relax.SeqExpr(blocks, body.body), main.ret_ty, main.is_pure, main.attrs)
    return result, folded


def _folded_output(record: Dequantized, bias: np.ndarray) -> Any:
    """float(acc + round(bias / r)) * r, or None when the bias is not per channel of the record's
    rescale, a rescale is not positive, or acc + B could overflow int32."""
    from tvm import relax

    rescale = record.rescale.astype(np.float64)
    if bias.dtype != np.float32 or bias.size not in (1, rescale.size) or bias.ndim > rescale.ndim or not np.all(rescale > 0):
        return None  # (a size-1 bias of more dims would broadcast the output to more dims)
    if bias.size > 1 and np.broadcast_shapes(bias.shape, rescale.shape) != rescale.shape:
        return None
    codes = np.rint(np.broadcast_to(bias.reshape(rescale.shape if bias.size > 1 else ()), rescale.shape) / rescale)
    if record.acc_bound + np.abs(codes).max(initial=0) >= INT32_LIMIT:
        return None
    op = relax.op
    summed = op.add(record.acc, relax.const(codes.astype(np.int32)))
    return op.multiply(op.astype(summed, "float32"), relax.const(record.rescale))


def integer_dual_residual_requantize(mutator: Any, epilogue: Epilogue, other: Epilogue, scale: float, zero_point: int, dtype: str) -> Any:
    """A residual add of two int8 layers' outputs (with their biases), requantized in integer: each
    accumulator goes to the output scale with F fractional bits by its own multiply-high, then the
    rounded sum, zero point, clip. None when a term could overflow int32 or the multipliers leave
    fewer than RESIDUAL_MIN_FRACTION_BITS with high-word shifts."""
    from tvm import relax

    biases = _bias_codes(epilogue), _bias_codes(other)
    if biases[0] is None or biases[1] is None:
        return None
    multipliers = [e.source.rescale.astype(np.float64) / scale for e in (epilogue, other)]
    fraction = _fraction_bits(max(float(m.max()) for m in multipliers))
    if fraction < RESIDUAL_MIN_FRACTION_BITS:
        return None
    fixed = [fixed_point(m * 2.0 ** fraction) for m in multipliers]
    bound = sum(_term_bound(e, b, m, fraction) for e, b, m in zip((epilogue, other), biases, multipliers))
    if min(f[1] for f in fixed) < HIGH_WORD_SHIFT or bound + 2.0 ** fraction >= INT32_LIMIT / 2:
        return None
    return mutator.builder_.call_te(_dual_residual_requantize_te, epilogue.source.acc, relax.const(biases[0].astype(np.int32).reshape(-1)),
                                    relax.const(fixed[0][0].reshape(-1)), other.source.acc, relax.const(biases[1].astype(np.int32).reshape(-1)),
                                    relax.const(fixed[1][0].reshape(-1)), axis=_channel_axis(epilogue), shifts=(fixed[0][1], fixed[1][1], fraction),
                                    zero_point=zero_point, bounds=_clip_bounds(epilogue, scale, zero_point, dtype), dtype=dtype,
                                    primfunc_name_hint="requantize_residual")


# int32 stages that vectorize keeps as blocks of their own (names are prefixes)
REQUANTIZE_STAGES = ("requantize_sum", "requantize_code", "requantize_term", "requantize_skip")


def _requantize_te(acc: Any, bias_codes: Any, multiplier: Any, *, axis: int | None, shift: int, zero_point: int,
                   bounds: tuple[int, int], dtype: str) -> Any:
    """Three stages: acc + B (int32), the clipped int32 code, its cast to 8 bits. In one expression
    TVM widens `int64(acc + B)` to `int64(acc) + int64(B)`, and a product of that sum is a full
    64-bit multiply (HVX has none); as its own stage, the product is int32 x int32 -> int64, which
    LLVM makes a multiply-high (HVX vmpye/vmpyo)."""
    from tvm import te

    summed = te.compute(acc.shape, lambda *index: acc[index] + _per_channel(bias_codes, index, axis), name=REQUANTIZE_STAGES[0])
    return _code_and_cast(lambda *index: _rounding_shift(summed[index].astype("int64") * _per_channel(multiplier, index, axis).astype("int64"), shift),
                          acc.shape, zero_point, bounds, dtype)


def _rounding_shift(value: Any, shift: int) -> Any:
    """(int64 value + 2^(shift-1)) >> shift, as int32."""
    from tvm import tirx

    return ((value + tirx.const(1 << (shift - 1), "int64")) >> tirx.const(shift, "int64")).astype("int32")


def _layer_term(acc: Any, bias_codes: Any, multiplier: Any, shift: int, axis: int | None, name: str) -> Any:
    """((acc + B) * M) >> S per channel, as two stages (`<name>_sum`, `<name>_term`): the product a
    multiply-high of its own stage (in one expression TVM would widen the sum to 64 bits)."""
    from tvm import te

    summed = te.compute(acc.shape, lambda *index: acc[index] + _per_channel(bias_codes, index, axis), name=f"{name}_sum")
    return te.compute(acc.shape, lambda *index: _rounding_shift(
        summed[index].astype("int64") * _per_channel(multiplier, index, axis).astype("int64"), shift), name=f"{name}_term")


def _codes_term(codes: Any, zero_point: int, multiplier: int, shift: int) -> Any:
    """(((q' - z') << L) * M') >> S' for an 8-bit skip tensor, as two stages."""
    from tvm import te, tirx

    shifted = te.compute(codes.shape, lambda *index: (codes[index].astype("int32") - zero_point) << SKIP_LEFT_SHIFT, name="requantize_skip")
    return te.compute(codes.shape, lambda *index: _rounding_shift(
        shifted[index].astype("int64") * tirx.const(multiplier, "int64"), shift), name="requantize_skip_term")


def _code_and_cast(value: Any, shape: Any, zero_point: int, bounds: tuple[int, int], dtype: str) -> Any:
    """clip(value + z, lo, hi) as int32 (`requantize_code`), then its cast to 8 bits."""
    from tvm import te, tirx

    codes = te.compute(shape, lambda *index: tirx.max(tirx.min(value(*index) + zero_point, bounds[1]), bounds[0]), name="requantize_code")
    return te.compute(shape, lambda *index: codes[index].astype(dtype), name="requantize_cast")


def _residual_requantize_te(acc: Any, bias_codes: Any, multiplier: Any, skip: Any, *, axis: int | None, shifts: tuple[int, int, int],
                            skip_multiplier: int, zero_points: tuple[int, int], bounds: tuple[int, int], dtype: str) -> Any:
    """Stages as in _requantize_te, each product a multiply-high of its own stage (in one expression
    TVM would fold the zero point into a 64-bit constant): acc + B and its term, (q' - z') << L and
    its term, their rounded sum's clipped code, the cast."""
    main_shift, skip_shift, fraction = shifts
    skip_zero, zero_point = zero_points
    main = _layer_term(acc, bias_codes, multiplier, main_shift, axis, "requantize")
    other = _codes_term(skip, skip_zero, skip_multiplier, skip_shift)
    return _code_and_cast(lambda *index: (main[index] + other[index] + (1 << (fraction - 1))) >> fraction, acc.shape, zero_point, bounds, dtype)


def _dual_residual_requantize_te(acc: Any, bias_codes: Any, multiplier: Any, other: Any, other_bias: Any, other_multiplier: Any, *,
                                 axis: int | None, shifts: tuple[int, int, int], zero_point: int, bounds: tuple[int, int], dtype: str) -> Any:
    """Stages as in _residual_requantize_te, the skip's term from its own accumulator and bias."""
    main_shift, other_shift, fraction = shifts
    main = _layer_term(acc, bias_codes, multiplier, main_shift, axis, "requantize")
    skip = _layer_term(other, other_bias, other_multiplier, other_shift, axis, "requantize_skip")
    return _code_and_cast(lambda *index: (main[index] + skip[index] + (1 << (fraction - 1))) >> fraction, acc.shape, zero_point, bounds, dtype)


def _mean_requantize_te(acc: Any, bias_codes: Any, multiplier: Any, *skip: Any, axis: int | None, pooled: tuple[int, ...], keepdims: bool,
                        shifts: tuple[int, ...], codes: tuple[int, int] | None, pool: tuple[int, int], term_bounds: tuple[int, int],
                        zero_point: int, bounds: tuple[int, int], dtype: str) -> Any:
    """Stages: each pixel's term at the output scale x 2^F (a layer's, or a residual add's two terms
    summed) clipped to the activation's bounds there, their int32 sum over the pooled axes, its code
    (a multiply-high by 1 / (count x 2^F)), the cast."""
    from tvm import te, tirx

    terms = [_layer_term(acc, bias_codes, multiplier, shifts[0], axis, "requantize")]
    if codes is not None:
        terms.append(_codes_term(skip[0], codes[0], codes[1], shifts[1]))
    elif skip:
        terms.append(_layer_term(skip[0], skip[1], skip[2], shifts[1], axis, "requantize_skip"))
    term = te.compute(acc.shape, lambda *index: tirx.max(tirx.min(sum(t[index] for t in terms[1:]) + terms[0][index], term_bounds[1]),
                                                         term_bounds[0]), name="requantize_term_clip")
    reduce_axes = [te.reduce_axis((0, acc.shape[a]), name=f"r{a}") for a in pooled]
    kept = [a for a in range(len(acc.shape)) if a not in pooled]
    out_shape = [1 if a in pooled else acc.shape[a] for a in range(len(acc.shape))] if keepdims else [acc.shape[a] for a in kept]

    def source_index(index: tuple[Any, ...]) -> list[Any]:
        outer = iter(index if not keepdims else [index[a] for a in kept])
        inner = iter(reduce_axes)
        return [next(inner) if a in pooled else next(outer) for a in range(len(acc.shape))]

    total = te.compute(out_shape, lambda *index: te.sum(term[tuple(source_index(index))], axis=reduce_axes), name="requantize_pool")
    pool_multiplier, pool_shift = pool
    return _code_and_cast(lambda *index: _rounding_shift(total[index].astype("int64") * tirx.const(pool_multiplier, "int64"), pool_shift),
                          out_shape, zero_point, bounds, dtype)
