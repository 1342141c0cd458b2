"""Protobuf-level mutations of real ONNX models: dims, dtypes, attributes, edges, opsets, initializers, names."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

Mutation = Callable[[onnx.ModelProto, np.random.Generator], str]
_ODD_INTS = [0, -1, 1, 2, 3, 7, 1 << 20, 1 << 31, (1 << 62), -(1 << 40)]


def _pick(rng: np.random.Generator, items: list) -> object:
    return items[int(rng.integers(len(items)))] if items else None


def mutate_dim(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    values = [v for v in [*model.graph.input, *model.graph.output, *model.graph.value_info] if v.type.tensor_type.shape.dim]
    value = _pick(rng, values)
    if value is None:
        return "no dims"
    dim = _pick(rng, list(value.type.tensor_type.shape.dim))
    choice = int(rng.integers(3))
    if choice == 0:
        dim.dim_value = int(_pick(rng, _ODD_INTS))
    elif choice == 1:
        dim.dim_param = _pick(rng, ["n", "", "batch", "a b", "x" * 300])
    else:
        value.type.tensor_type.shape.dim.add().dim_value = int(rng.integers(1, 5))
    return f"dim of {value.name}"


def mutate_dtype(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    value = _pick(rng, [*model.graph.input, *model.graph.output])
    new = int(_pick(rng, [0, 1, 2, 3, 6, 7, 9, 10, 11, 16, 8, 14, 99]))
    value.type.tensor_type.elem_type = new
    return f"dtype of {value.name} -> {new}"


def mutate_attribute(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    nodes = [n for n in model.graph.node if n.attribute]
    node = _pick(rng, nodes)
    if node is None:
        node = _pick(rng, list(model.graph.node))
        attr = node.attribute.add()
        attr.name, attr.type, attr.i = "axis", onnx.AttributeProto.INT, int(_pick(rng, _ODD_INTS))
        return f"added attribute to {node.name}"
    attr = _pick(rng, list(node.attribute))
    if attr.type == onnx.AttributeProto.INT:
        attr.i = int(_pick(rng, _ODD_INTS))
    elif attr.type == onnx.AttributeProto.INTS:
        attr.ints[:] = [int(_pick(rng, _ODD_INTS)) for _ in range(int(rng.integers(0, 6)))]
    elif attr.type == onnx.AttributeProto.FLOAT:
        attr.f = float(_pick(rng, [0.0, -1.0, float("nan"), float("inf"), 1e30]))
    else:
        attr.type = onnx.AttributeProto.INT
        attr.i = -1
    return f"attribute {attr.name} of {node.name}"


def mutate_edge(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    node = _pick(rng, list(model.graph.node))
    names = [i.name for i in model.graph.input] + [t.name for t in model.graph.initializer]
    names += [o for n in model.graph.node for o in n.output] + ["", "missing_tensor"]
    if node.input and rng.random() < 0.7:
        node.input[int(rng.integers(len(node.input)))] = str(_pick(rng, names))
    elif rng.random() < 0.5:
        node.input.append(str(_pick(rng, names)))
    else:
        node.output[0] = str(_pick(rng, names))
    return f"edge of {node.name}"


def mutate_opset(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    entry = model.opset_import[0]
    entry.version = int(_pick(rng, [0, 1, 6, 9, 11, 13, 21, 99, 1 << 30]))
    if rng.random() < 0.2:
        entry.domain = "ai.onnx.ml"
    return f"opset -> {entry.domain}:{entry.version}"


def mutate_initializer(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    tensor = _pick(rng, list(model.graph.initializer))
    if tensor is None:
        return "no initializer"
    choice = int(rng.integers(4))
    if choice == 0 and tensor.raw_data:
        tensor.raw_data = tensor.raw_data[: int(rng.integers(0, len(tensor.raw_data)))]
    elif choice == 1 and tensor.dims:
        tensor.dims[int(rng.integers(len(tensor.dims)))] = int(_pick(rng, _ODD_INTS))
    elif choice == 2:
        tensor.data_type = int(_pick(rng, [0, 2, 3, 7, 8, 10, 16, 99]))
    else:
        tensor.dims.append(int(rng.integers(1, 4)))
    return f"initializer {tensor.name}"


def mutate_name(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    node = _pick(rng, list(model.graph.node))
    choice = int(rng.integers(3))
    if choice == 0:
        node.op_type = str(_pick(rng, ["Conv", "MatMul", "Foo", "", "Add", "Softmax", "LSTM", "Loop"]))
    elif choice == 1:
        node.name = str(_pick(rng, ["", "n" * 1000, "\u00e9\u00e8", "../../x"]))
    else:
        node.domain = str(_pick(rng, ["", "com.microsoft", "custom.ops", "ai.onnx"]))
    return f"op/name of node {node.name[:20]}"


def mutate_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    corrupt = bytearray(data)
    for pos in rng.integers(0, len(corrupt), int(rng.integers(1, 16))):
        corrupt[pos] = int(rng.integers(0, 256))
    if rng.random() < 0.2:
        corrupt = corrupt[: int(rng.integers(1, len(corrupt)))]
    return bytes(corrupt)


MUTATIONS: list[Mutation] = [mutate_dim, mutate_dtype, mutate_attribute, mutate_edge, mutate_opset, mutate_initializer, mutate_name]


def make_case(seed_model: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One fuzz case: 1-3 structured mutations, or (1 in 8) raw byte corruption."""
    if rng.random() < 0.125:
        return mutate_bytes(seed_model, rng), "bytes"
    model = onnx.ModelProto()
    model.ParseFromString(seed_model)
    done = [MUTATIONS[int(rng.integers(len(MUTATIONS)))](model, rng) for _ in range(int(rng.integers(1, 4)))]
    return model.SerializeToString(), "; ".join(done)
