"""ONNX import: load and check the file, refuse what we cannot build, simplify, convert to Relax.

Order matters: every refusal (not a file, not ONNX, external data outside the model's folder,
unsupported ops, absurd shapes) happens before any expensive work, and each is one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import external_data_helper

from .errors import BuildError, UserError
from .progress import SILENT, Progress

MAX_MODEL_BYTES = 8 << 30  # weights included; beyond this a phone cannot hold the model anyway
MAX_TENSOR_ELEMENTS = 1 << 32  # any one input, output or initializer


@dataclasses.dataclass(frozen=True)
class Limits:
    """Size limits for untrusted models (`--max-model-size`, `--max-tensor-elements`)."""

    max_model_bytes: int = MAX_MODEL_BYTES  # the .onnx file plus its external data
    max_tensor_elements: int = MAX_TENSOR_ELEMENTS
# Op domains whose ops TVM's importer may know. Anything else is refused by name.
_KNOWN_DOMAINS = {"", "ai.onnx", "com.microsoft"}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A model input or output: shape entries are ints or symbolic dimension names."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> "TensorSpec":
        return TensorSpec(str(data["name"]), tuple(data["shape"]), str(data["dtype"]))


@dataclasses.dataclass
class ImportedModel:
    mod: Any  # tvm.IRModule with a Relax `main`
    onnx_model: onnx.ModelProto  # the simplified model the Relax module came from
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    source_sha256: str
    stats: dict[str, Any]
    # MatMulNBits codes by the SHA-256 of the dequantized weight (see qoperators.expand_matmul_nbits)
    int4_weights: dict[str, Any] = dataclasses.field(default_factory=dict)

    def nodes_by_op_type(self) -> dict[str, tuple[str, ...]]:
        """Node names per op type in graph order; MatMul and Gemm together (both import as matmul)."""
        names: dict[str, list[str]] = {}
        for i, node in enumerate(self.onnx_model.graph.node):
            op_type = "MatMul" if node.op_type == "Gemm" else node.op_type
            names.setdefault(op_type, []).append(node.name or f"{node.op_type}_{i}")
        return {op_type: tuple(found) for op_type, found in names.items()}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_shape_options(items: Sequence[str] | Mapping[str, Sequence[int]] | None, limits: Limits = Limits()) -> dict[str, list[int]]:
    """`["input_ids=1,128"]` (CLI form) or `{"input_ids": [1, 128]}` (API form) -> dict."""
    if not items:
        return {}
    if isinstance(items, Mapping):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items:
            name, sep, dims = str(item).partition("=")
            if not sep or not name:
                raise UserError(f"--shape {item!r}: expected NAME=D1,D2,... e.g. input_ids=1,128")
            pairs.append((name, dims.split(",")))
    shapes: dict[str, list[int]] = {}
    for name, dims in pairs:
        try:
            values = [int(d) for d in dims]
        except (TypeError, ValueError):
            raise UserError(f"--shape {name}: dimensions must be integers, got {list(dims)}") from None
        if any(v <= 0 for v in values) or int(np.prod(values, dtype=np.float64)) > limits.max_tensor_elements:
            raise UserError(f"--shape {name}={values}: each dimension must be >= 1 and the tensor at most {limits.max_tensor_elements} elements")
        shapes[name] = values
    return shapes


def parse_dim_values(items: Mapping[str, int] | Sequence[str] | None, flag: str) -> dict[str, int]:
    """`["sequence=128"]` (CLI form) or `{"sequence": 128}` (API form) -> {name: value >= 1}."""
    if not items:
        return {}
    pairs = items.items() if isinstance(items, Mapping) else [str(i).partition("=")[::2] for i in items]
    values = {}
    for name, value in pairs:
        if not name or not str(value).isdigit() or int(value) < 1:
            raise UserError(f"{flag} {name}={value}: expected NAME=N with N >= 1, e.g. sequence=128")
        values[str(name)] = int(value)
    return values


# ---------------------------------------------------------------- loading and checking


def _check_external_data(model: onnx.ModelProto, model_dir: Path, budget_bytes: int) -> None:
    """Refuse external-data locations that leave the model's folder (absolute, '..', symlinks),
    lengths that disagree with the tensor's shape or the file, and totals over the size limit."""
    root = model_dir.resolve()
    total = 0
    for tensor in external_data_helper._get_all_tensors(model):  # noqa: SLF001 - onnx's own walker
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            raise UserError(f"tensor {tensor.name!r}: external data location {location!r} is not a plain path inside the model's folder")
        target = (root / location).resolve()
        if root not in target.parents:
            raise UserError(f"tensor {tensor.name!r}: external data {location!r} resolves outside the model's folder")
        if not target.is_file():
            raise UserError(f"tensor {tensor.name!r}: external data file {location!r} not found next to the model")
        offset = int(info.get("offset", 0) or 0)
        length = int(info.get("length", 0) or 0)
        expected = _tensor_nbytes(tensor)
        if length and expected is not None and length != expected:
            raise UserError(f"tensor {tensor.name!r}: external data length {length} does not match its shape and type ({expected} bytes)")
        needed = offset + (length or expected or 0)
        if needed > target.stat().st_size:
            raise UserError(f"tensor {tensor.name!r}: external data {location!r} is shorter than the tensor needs ({needed} bytes)")
        total += length or expected or 0
        if total > budget_bytes:
            raise UserError(f"external data passes the {budget_bytes} byte model size limit at tensor {tensor.name!r}")


def _tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _check_initializer_sizes(model: onnx.ModelProto, limits: Limits) -> None:
    for tensor in model.graph.initializer:
        if any(d < 0 for d in tensor.dims) or int(np.prod(tensor.dims, dtype=np.float64)) > limits.max_tensor_elements:
            raise UserError(f"initializer {tensor.name!r}: absurd shape {list(tensor.dims)}")
        expected = _tensor_nbytes(tensor)
        if tensor.HasField("raw_data") and expected is not None and len(tensor.raw_data) != expected:
            raise UserError(f"initializer {tensor.name!r}: {len(tensor.raw_data)} bytes of data for shape {list(tensor.dims)} ({expected} bytes expected)")


def load_onnx(path: str | Path, limits: Limits = Limits()) -> tuple[onnx.ModelProto, str]:
    """Reads and checks an ONNX file; returns the model (external data loaded) and its SHA-256."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path}: empty file, not an ONNX model")
    if size > limits.max_model_bytes:
        raise UserError(f"{path}: {size} bytes is over the {limits.max_model_bytes} byte model size limit")
    data = path.read_bytes()
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:  # protobuf raises DecodeError, or RuntimeWarning-like errors on garbage
        raise UserError(f"{path}: not an ONNX model (protobuf parse failed; truncated or another format)") from None
    if not model.opset_import or model.ir_version <= 0:
        raise UserError(f"{path}: not an ONNX model (no IR version or opset)")
    if len(model.graph.node) == 0:
        raise UserError(f"{path}: the model's graph is empty (no nodes)")
    _check_external_data(model, path.parent, limits.max_model_bytes - size)
    _check_initializer_sizes(model, limits)
    if any(external_data_helper.uses_external_data(t) for t in external_data_helper._get_all_tensors(model)):  # noqa: SLF001
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    try:
        # Whole-model check (path form handles >2 GB models with external data).
        onnx.checker.check_model(model if model.ByteSize() < (2 << 30) - 1 else str(path))
    except (onnx.checker.ValidationError, Exception) as exc:  # noqa: BLE001 - checker raises several kinds
        raise UserError(f"{path}: invalid ONNX model: {_first_line(exc)}") from None
    return model, hashlib.sha256(data).hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def model_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise UserError("the model imports no default-domain (ai.onnx) opset")


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_nodes(sub)


# Attributes that must be positive (or non-negative) for windowed ops; shape code in onnxsim,
# onnxruntime and TVM divides by them and dies by SIGFPE otherwise (found by the fuzzer).
_WINDOW_OPS = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool", "MaxUnpool", "Im2Col"}
_POSITIVE_ATTRS = ("strides", "dilations", "kernel_shape")


def check_window_attributes(model: onnx.ModelProto) -> None:
    """Refuse zero or negative strides, dilations and kernel sizes, and negative pads."""
    for node in _all_nodes(model.graph):
        if node.op_type not in _WINDOW_OPS:
            continue
        for attr in node.attribute:
            values = list(attr.ints)
            if (attr.name in _POSITIVE_ATTRS and any(v < 1 for v in values)) or (attr.name == "pads" and any(v < 0 for v in values)):
                raise UserError(f"{node.op_type} node {node.name!r}: invalid {attr.name} {values}")


def check_required_inputs(model: onnx.ModelProto) -> None:
    """Refuse an empty input name where the op's schema requires a tensor (TVM's importer
    segfaults on it; found by the fuzzer). Optional inputs may be empty."""
    opset = model_opset(model)
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    for node in _all_nodes(model.graph):
        if "" not in node.input or node.domain not in ("", "ai.onnx"):
            continue
        try:
            formal = onnx.defs.get_schema(node.op_type, opset, node.domain).inputs
        except onnx.defs.SchemaError:
            continue  # unknown op: check_supported_ops names it
        for index, name in enumerate(node.input):
            param = formal[min(index, len(formal) - 1)] if formal else None
            if name == "" and (param is None or param.option != optional):
                raise UserError(f"{node.op_type} node {node.name!r}: input {index} is empty, but the op requires it")


def supported_op_types() -> set[str]:
    """Op types TVM's ONNX importer converts (its convert map, plus the ones it handles inline)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    return set(onnx_frontend._get_convert_map()) | {"Constant", "If"}  # noqa: SLF001


def check_supported_ops(model: onnx.ModelProto, allowed: Sequence[str] = ()) -> None:
    """Refuse, in one message, every op type the importer (or the target's op list) lacks."""
    opset = model_opset(model)
    known = supported_op_types()
    if allowed:
        known &= set(allowed) | {"Constant"}
    missing: dict[str, str] = {}
    for node in _all_nodes(model.graph):
        unsupported = node.domain not in _KNOWN_DOMAINS or node.op_type not in known
        if unsupported and node.op_type not in missing:
            where = f"node {node.name!r}" if node.name else "an unnamed node"
            domain = f", domain {node.domain}" if node.domain not in ("", "ai.onnx") else ""
            missing[node.op_type] = f"{node.op_type} ({where}{domain})"
    if missing:
        raise UserError(f"unsupported ONNX ops at opset {opset}: " + "; ".join(missing[k] for k in sorted(missing)))


# ---------------------------------------------------------------- shapes and simplification


def _onnx_dtype(elem_type: int, name: str) -> str:
    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"tensor {name!r}: unsupported or undefined element type {elem_type}") from None


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers (old exporters list weights as inputs)."""
    weights = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in weights]


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dims: list[int | str] = []
    for i, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or f"{value.name}_dim{i}")
    return TensorSpec(value.name, tuple(dims), _onnx_dtype(tensor_type.elem_type, value.name))


def apply_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> None:
    """Fixes input dimensions in place; stale inner shape annotations are dropped for re-inference."""
    inputs = {v.name: v for v in graph_inputs(model)}
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise UserError(f"--shape names unknown inputs {', '.join(unknown)}; the model's inputs are {', '.join(inputs)}")
    for name, dims in shapes.items():
        shape = inputs[name].type.tensor_type.shape
        if len(shape.dim) != len(dims):
            raise UserError(f"--shape {name}: the input has rank {len(shape.dim)}, got {len(dims)} dimensions")
        for dim, value in zip(shape.dim, dims):
            if dim.HasField("dim_value") and dim.dim_value != value:
                raise UserError(f"--shape {name}: dimension fixed at {dim.dim_value} in the model, got {value}")
            dim.Clear()
            dim.dim_value = int(value)
    del model.graph.value_info[:]


def _check_input_sizes(model: onnx.ModelProto, limits: Limits) -> None:
    for value in graph_inputs(model):
        spec = _spec(value)
        fixed = [d for d in spec.shape if isinstance(d, int)]
        if any(d < 0 for d in fixed) or int(np.prod(fixed, dtype=np.float64)) > limits.max_tensor_elements:
            raise UserError(f"input {spec.name!r}: absurd shape {list(spec.shape)}")


def simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """onnxsim with numerical checks off (socc verify checks the result); falls back if it fails."""
    import onnxsim

    try:
        simplified, _ = onnxsim.simplify(model, check_n=0)
    except Exception as exc:  # noqa: BLE001 - onnxsim surfaces onnxruntime and protobuf errors
        return model, f"onnxsim failed ({_first_line(exc)[:120]}); continuing with the unsimplified model"
    return simplified, ""


# ---------------------------------------------------------------- the import stage


def import_onnx(
    source: str | Path,
    *,
    shape: Mapping[str, Sequence[int]] | None = None,
    simplify_model: bool = True,
    allowed_ops: Sequence[str] = (),
    limits: Limits = Limits(),
    progress: Progress = SILENT,
) -> ImportedModel:
    with progress.stage("load") as summary:
        model, sha256 = load_onnx(source, limits)
        opset = model_opset(model)
        qoperators = expand_qoperators(model)
        int4_weights = expand_matmul_nbits(model)
        check_supported_ops(model, allowed_ops)
        check_window_attributes(model)
        check_required_inputs(model)
        nodes_in = len(model.graph.node)
        summary.update(nodes=nodes_in, opset=opset)
    with progress.stage("simplify") as summary:
        if shape:
            apply_shapes(model, shape)
        _check_input_sizes(model, limits)
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"shape inference failed: {_first_line(exc)}") from None
        warning = ""
        if simplify_model:
            model, warning = simplify(model)
            if warning:
                progress.note(warning)
        summary.update(nodes=f"{nodes_in}->{len(model.graph.node)}")
    inputs = [_spec(v) for v in graph_inputs(model)]
    with progress.stage("to-relax") as summary:
        mod = _to_relax(model, inputs, opset)
        summary.update(bindings=_binding_count(mod))
    outputs = _output_specs(mod, [o.name for o in model.graph.output])
    stats = {"onnx_nodes": nodes_in, "onnx_nodes_simplified": len(model.graph.node), "simplified": simplify_model and not warning,
             "qoperators_expanded": qoperators, "matmul_nbits_expanded": len(int4_weights)}
    return ImportedModel(mod, model, inputs, outputs, opset, sha256, stats, int4_weights)


def expand_qoperators(model: onnx.ModelProto) -> int:
    from .qoperators import expand_qoperators as expand

    return expand(model)


def expand_matmul_nbits(model: onnx.ModelProto) -> dict[str, Any]:
    from .qoperators import expand_matmul_nbits as expand

    return expand(model)


def _to_relax(model: onnx.ModelProto, inputs: list[TensorSpec], opset: int) -> Any:
    from tvm.relax.frontend.onnx import from_onnx

    shape_dict = {s.name: list(s.shape) for s in inputs if all(isinstance(d, int) for d in s.shape)}
    dtype_dict = {s.name: s.dtype for s in inputs}
    try:
        # The importer prints its own notes on stdout, which belongs to our --json output.
        with contextlib.redirect_stdout(io.StringIO()):
            return from_onnx(model, shape_dict=shape_dict, dtype_dict=dtype_dict, opset=opset, keep_params_in_input=False)
    except Exception as exc:  # noqa: BLE001 - TVM raises many kinds; the user gets the first line
        raise BuildError(f"TVM's ONNX importer failed: {type(exc).__name__}: {_first_line(exc)}") from exc


def _binding_count(mod: Any) -> int:
    from toolchain.passes.stats import count_ops

    return sum(count_ops(mod).values())


def _output_specs(mod: Any, names: list[str]) -> list[TensorSpec]:
    """Output shapes and dtypes as Relax inferred them (symbolic dims by their names)."""
    from tvm import relax

    ret = mod["main"].ret_ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    specs = []
    for name, ty in zip(names, fields):
        if not isinstance(ty, relax.TensorType):
            raise UserError(f"model output {name!r} is a {type(ty).__name__.removesuffix('Type').lower()} (e.g. a Shape node's "
                            "output), not a tensor: socc artifacts return tensors; compute it from a tensor or drop the output")
        shape = tuple(int(v) if hasattr(v, "value") else str(v) for v in ty.shape.values) if ty.shape is not None else ()
        specs.append(TensorSpec(name, shape, str(ty.dtype)))
    return specs
