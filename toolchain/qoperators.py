"""Pre-quantized ONNX in operator form, rewritten to the QDQ form TVM's importer reads.

onnxruntime's `quantize_static(..., quant_format=QOperator)` writes QLinearConv, QLinearMatMul and
QGemm (com.microsoft). Each becomes DequantizeLinear(input) -> Conv / MatMul / Gemm with its weight
and bias as float initializers ((q - zero_point) * scale, exact in float64 then float32) ->
QuantizeLinear(output). The `quantize` pass then finds these layers like any QDQ model's and runs
them on its integer kernels with the model's own scales (the weights lie on their int8 grid).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import UserError

QOPERATORS = ("QLinearConv", "QLinearMatMul", "QGemm")


def expand_qoperators(model: onnx.ModelProto) -> int:
    """Rewrites QLinearConv / QLinearMatMul / QGemm nodes in place; returns how many."""
    graph = model.graph
    if not any(node.op_type in QOPERATORS for node in graph.node):
        return 0
    constants = {t.name: t for t in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    expanded = 0
    for node in graph.node:
        if node.op_type not in QOPERATORS:
            nodes.append(node)
            continue
        nodes += _expand(node, constants, graph)
        expanded += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return expanded


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


def _expand(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
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
