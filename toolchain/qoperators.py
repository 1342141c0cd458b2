"""Pre-quantized ONNX in operator form, rewritten to forms TVM's importer reads.

onnxruntime's `quantize_static(..., quant_format=QOperator)` writes QLinearConv, QLinearMatMul and
QGemm (com.microsoft). Each becomes DequantizeLinear(input) -> Conv / MatMul / Gemm with its weight
and bias as float initializers ((q - zero_point) * scale, exact in float64 then float32) ->
QuantizeLinear(output). The `quantize` pass then finds these layers like any QDQ model's and runs
them on its integer kernels with the model's own scales (the weights lie on their int8 grid).
MatMulNBits (4-bit blockwise) becomes a MatMul with the exactly dequantized weight, and its codes
go to the `quantize` pass by the hash of that weight (see `expand_matmul_nbits`). ConvInteger
(onnxruntime's quantize_dynamic) becomes a float Conv of its integers (`_expand_conv_integer`),
which the `quantize` pass runs on the int8 conv kernel with the run-time zero point.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import UserError

QOPERATORS = ("QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger")
# A ConvInteger whose int32 output is used as such, or whose shifted weight leaves the int8 range,
# passes through float: exact while every partial sum stays under 2^24 (float32's integer range).
FLOAT_EXACT = 1 << 24


def expand_qoperators(model: onnx.ModelProto) -> int:
    """Rewrites QLinearConv / QLinearMatMul / QGemm nodes in place; returns how many."""
    graph = model.graph
    if not any(node.op_type in QOPERATORS for node in graph.node):
        return 0
    constants = {t.name: t for t in graph.initializer}
    float_casts = _sole_float_casts(graph)
    nodes: list[onnx.NodeProto] = []
    expanded = 0
    for node in graph.node:
        if node.op_type == "Cast" and node.input[0] in float_casts:
            continue  # its ConvInteger writes the float output itself
        if node.op_type not in QOPERATORS:
            nodes.append(node)
            continue
        nodes += _expand(node, constants, graph, float_casts.get(node.output[0]))
        expanded += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return expanded


def _sole_float_casts(graph: onnx.GraphProto) -> dict[str, str]:
    """By ConvInteger output name: the output of the Cast to float that is its only consumer
    (quantize_dynamic's Cast before the scale multiply), which the float Conv then writes."""
    outputs = {o.name for o in graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = {}
    for node in graph.node:
        if node.op_type != "ConvInteger" or node.output[0] in outputs:
            continue
        users = consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Cast":
            continue
        if {a.name: helper.get_attribute_value(a) for a in users[0].attribute}.get("to") == onnx.TensorProto.FLOAT:
            found[node.output[0]] = users[0].output[0]
    return found


def _value(name: str, constants: dict[str, onnx.TensorProto], node: onnx.NodeProto) -> np.ndarray:
    if name not in constants:
        raise UserError(f"{node.op_type} node {node.name or node.output[0]!r}: input {name!r} must be a constant (initializer)")
    return numpy_helper.to_array(constants[name])


def _dequantized(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int) -> np.ndarray:
    """(q - zero) * scale with per-axis scale/zero broadcast along `axis`."""
    shape = [1] * q.ndim
    if scale.size > 1:
        shape[axis] = -1
    zero_value = zero.astype(np.float64).reshape(shape) if zero is not None and zero.size else 0.0
    return ((q.astype(np.float64) - zero_value) * scale.astype(np.float64).reshape(shape)).astype(np.float32)


def _expand(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto], graph: onnx.GraphProto,
            float_output: str | None) -> list[onnx.NodeProto]:
    if node.op_type == "ConvInteger":
        return _expand_conv_integer(node, constants, graph, float_output)
    inputs = list(node.input) + [""] * (9 - len(node.input))
    prefix = (node.name or node.output[0]) + "_socc"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def add_constant(suffix: str, array: np.ndarray) -> str:
        name = f"{prefix}_{suffix}"
        graph.initializer.append(numpy_helper.from_array(array, name))
        constants[name] = graph.initializer[-1]
        return name

    x_scale, x_zero = inputs[1], inputs[2]
    w_q, w_scale, w_zero = (_value(inputs[i], constants, node) if inputs[i] else None for i in (3, 4, 5))
    if node.op_type == "QLinearConv":
        weight_axis, op_type, y_scale, y_zero, bias = 0, "Conv", inputs[6], inputs[7], inputs[8]
    elif node.op_type == "QLinearMatMul":
        weight_axis, op_type, y_scale, y_zero, bias = 1, "MatMul", inputs[6], inputs[7], ""
    else:  # QGemm: A, a_scale, a_zp, B, b_scale, b_zp, C, y_scale, y_zp
        weight_axis = 0 if attrs.get("transB", 0) else 1
        op_type, bias, y_scale, y_zero = "Gemm", inputs[6], inputs[7], inputs[8]
    weight = add_constant("weight", _dequantized(w_q, w_scale, w_zero, weight_axis))
    x_float = f"{prefix}_x"
    nodes = [helper.make_node("DequantizeLinear", [inputs[0], x_scale, x_zero] if x_zero else [inputs[0], x_scale], [x_float],
                              name=f"{prefix}_dequantize")]
    op_inputs = [x_float, weight]
    if bias:  # int32 with scale x_scale * w_scale (per output channel)
        scale = _value(x_scale, constants, node).astype(np.float64) * w_scale.astype(np.float64)
        op_inputs.append(add_constant("bias", _dequantized(_value(bias, constants, node), scale.ravel(), None, 0)))
    op_attrs = {k: v for k, v in attrs.items() if k not in ("domain",)}
    out = node.output[0]
    op_out = f"{prefix}_y" if y_scale else out
    nodes.append(helper.make_node(op_type, op_inputs, [op_out], name=node.name or prefix, **op_attrs))
    if y_scale:
        nodes.append(helper.make_node("QuantizeLinear", [op_out, y_scale, y_zero] if y_zero else [op_out, y_scale], [out],
                                      name=f"{prefix}_quantize"))
    return nodes


def _expand_conv_integer(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto], graph: onnx.GraphProto,
                         float_output: str | None) -> list[onnx.NodeProto]:
    """ConvInteger(x, w, x_zero_point, w_zero_point) -> int32 (onnxruntime's quantize_dynamic writes
    it, x from a DynamicQuantizeLinear): Cast(Conv(DequantizeLinear(x, 1, x_zero_point), w - w_zero_point), int32),
    without the Cast when the node's only consumer casts it to float (`float_output`, that Cast's
    output). The weight must be a constant. With w - w_zero_point on the int8 range, the quantize
    pass runs the conv on 8-bit codes in int32 (the float output then rounds exactly as a cast of
    the int32 does); a reduction whose sums could pass FLOAT_EXACT on a float path is refused."""
    inputs = list(node.input) + [""] * (4 - len(node.input))
    prefix = (node.name or node.output[0]) + "_socc"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    weight = _value(inputs[1], constants, node).astype(np.int64)
    w_zero = _value(inputs[3], constants, node).astype(np.int64) if inputs[3] else np.zeros(1, np.int64)
    shifted = weight - (w_zero.reshape(-1, 1, 1, 1) if w_zero.size > 1 else w_zero.reshape(()))
    reduction = int(np.prod(weight.shape[1:]))
    on_int8 = shifted.min() >= -128 and shifted.max() <= 127
    limit = FLOAT_EXACT // (255 * int(max(np.abs(shifted).max(), 1)))
    # the quantize pass takes 2-D convs only (and refuses the ones it must leave float, see
    # quantize._exact_integer_reason); a 1-D or 3-D one stays a float conv
    if reduction > limit and not (on_int8 and float_output and weight.ndim == 4):
        raise UserError(f"ConvInteger node {node.name or node.output[0]!r}: reduction of {reduction} products per output is "
                        f"over {limit} (ConvInteger-10), where socc's float form of it would round")
    weight_name = f"{prefix}_weight"
    graph.initializer.append(numpy_helper.from_array(shifted.astype(np.float32), weight_name))
    scale_name = f"{prefix}_one"
    graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), scale_name))
    x_float, y_float = f"{prefix}_x", f"{prefix}_y"
    x_inputs = [inputs[0], scale_name] + ([inputs[2]] if inputs[2] else [])
    return [helper.make_node("DequantizeLinear", x_inputs, [x_float], name=f"{prefix}_dequantize"),
            helper.make_node("Conv", [x_float, weight_name], [float_output or y_float], name=node.name or prefix, **attrs),
            *([] if float_output else [helper.make_node("Cast", [y_float], [node.output[0]], name=f"{prefix}_cast", to=onnx.TensorProto.INT32)])]


def expand_matmul_nbits(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None, int]]:
    """Rewrites com.microsoft MatMulNBits (4 bits, blockwise; onnxruntime's MatMulNBitsQuantizer)
    to MatMul with the exactly dequantized float weight, in place.

    Returns, by the SHA-256 of that float weight's bytes, the model's own codes in the layout of
    socc's int4 kernel: (packed [K/2, N], scales [K/G, N], zero points packed along N or None, G).
    The `quantize` pass finds the weight again by its bytes and runs the kernel on these codes.
    """
    import hashlib

    from .passes.quantize import pack_nibbles, unpack_nibbles

    graph = model.graph
    if not any(node.op_type == "MatMulNBits" for node in graph.node):
        return {}
    constants = {t.name: t for t in graph.initializer}
    table: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None, int]] = {}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, block = int(attrs["K"]), int(attrs["N"]), int(attrs["block_size"])
        inputs = list(node.input) + [""] * (6 - len(node.input))
        where = f"MatMulNBits node {node.name or node.output[0]!r}"
        if int(attrs.get("bits", 4)) != 4 or k % block or inputs[4]:
            raise UserError(f"{where}: only 4 bits, K a multiple of block_size and no g_idx are supported")
        blocks = k // block
        codes = unpack_nibbles(_value(inputs[1], constants, node).reshape(n, k // 2), axis=1, length=k)
        scales = _value(inputs[2], constants, node).reshape(n, blocks).astype(np.float32)
        zeros = unpack_nibbles(_value(inputs[3], constants, node).reshape(n, -1), axis=1, length=blocks) if inputs[3] else None
        zero = zeros.astype(np.float32)[:, :, None] if zeros is not None else np.float32(8.0)
        weight = ((codes.reshape(n, blocks, block).astype(np.float32) - zero) * scales[:, :, None]).reshape(n, k).T
        weight = np.ascontiguousarray(weight, dtype=np.float32)  # what the kernel computes, in float32
        name = f"{node.name or node.output[0]}_socc_weight"
        graph.initializer.append(numpy_helper.from_array(weight, name))
        table[hashlib.sha256(weight.tobytes()).hexdigest()] = (
            pack_nibbles(np.ascontiguousarray(codes.T), axis=0), np.ascontiguousarray(scales.T),
            None if zeros is None else pack_nibbles(np.ascontiguousarray(zeros.T), axis=1), block)
        if inputs[5]:
            matmul_out = f"{node.output[0]}_socc_matmul"
            nodes.append(helper.make_node("MatMul", [inputs[0], name], [matmul_out], name=node.name))
            nodes.append(helper.make_node("Add", [matmul_out, inputs[5]], [node.output[0]], name=f"{node.name}_bias"))
        else:
            nodes.append(helper.make_node("MatMul", [inputs[0], name], [node.output[0]], name=node.name))
    del graph.node[:]
    graph.node.extend(nodes)
    return table
