"""A static, OS-less model program for targets with no TVM runtime here (Hexagon under qemu-hexagon).

`generate_driver` reads the Relax `main` after socc's passes (memory planned, calls lowered, not yet
VM code) and writes it as C: the arena and the output buffers as static arrays, one DLTensor per
tensor (data pointers at the memory plan's offsets), the weights as one binary blob included by the
assembler, and `socc_main`, which reads each input from a raw file, calls the kernels in order
through their packed-function entry points (`__tvm_ffi_<kernel>`) and writes each output to a raw
file. `link_executable` compiles it with the profile's C compiler and links it with TVM's kernel
object and socc's C runtime (`runtime_src/hexagon_rt.c`).

    run_model IN_0.bin ... IN_n.bin OUT_0.bin ... OUT_m.bin   (raw little-endian tensors, manifest order)

Static shapes only: a symbolic dim is refused, naming it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from .build import run_tool
from .errors import BuildError, UserError

RUNTIME_SOURCE = Path(__file__).resolve().parent / "runtime_src" / "hexagon_rt.c"
DRIVER_SOURCE = "model_driver.c"
WEIGHTS_BLOB = "model_weights.bin"
ALIGN = 128  # HVX vector bytes: every buffer starts on a vector boundary

# DLPack type codes (dlpack.h): kDLInt, kDLUInt, kDLFloat, kDLBfloat, kDLBool
_DL_CODES = {"int": 0, "uint": 1, "float": 2, "bfloat": 4, "bool": 6}


def _dl_dtype(dtype: str) -> tuple[int, int]:
    if dtype == "bool":
        return _DL_CODES["bool"], 8
    kind = dtype.rstrip("0123456789")
    if kind not in _DL_CODES:
        raise UserError(f"static driver: tensor dtype {dtype} is not supported")
    return _DL_CODES[kind], int(dtype[len(kind):])


def _static_shape(ty: Any, what: str) -> tuple[int, ...]:
    from tvm import tirx

    dims = []
    for dim in ty.shape.values:
        if not isinstance(dim, tirx.IntImm):
            raise UserError(f"static driver: {what} has a symbolic dim {dim}; fix it with --shape (static shapes only)")
        dims.append(int(dim))
    return tuple(dims)


@dataclasses.dataclass
class _Tensor:
    """A tensor's data: `base` (a C array name) plus a byte offset, with its shape and dtype."""

    base: str
    offset: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass
class Driver:
    source: str
    weights: bytes
    kernel_calls: int


class _Writer:
    def __init__(self) -> None:
        self.tensors: list[_Tensor] = []
        self.tensor_ids: dict[tuple[str, int, tuple[int, ...], str], int] = {}
        self.buffers: list[tuple[str, int]] = []  # static arrays: (name, bytes)
        self.weights = bytearray()
        self.constant_ids: dict[Any, _Tensor] = {}
        self.calls: list[tuple[str, list[int]]] = []

    def tensor_id(self, t: _Tensor) -> int:
        key = (t.base, t.offset, t.shape, t.dtype)
        if key not in self.tensor_ids:
            self.tensor_ids[key] = len(self.tensors)
            self.tensors.append(t)
        return self.tensor_ids[key]

    def buffer(self, prefix: str, nbytes: int) -> str:
        name = f"socc_{prefix}{len(self.buffers)}"
        self.buffers.append((name, max(nbytes, 1)))
        return name

    def buffer_tensor(self, prefix: str, shape: tuple[int, ...], dtype: str) -> _Tensor:
        """A tensor in a static array of its own (an input or an output)."""
        t = _Tensor("", 0, shape, dtype)
        t.base = self.buffer(prefix, t.nbytes)
        return t

    @property
    def kernels(self) -> list[str]:
        return list(dict.fromkeys(kernel for kernel, _ in self.calls))

    def constant(self, const: Any) -> _Tensor:
        if const not in self.constant_ids:  # TVM objects hash and compare by identity
            data = np.array(const.value.numpy(), order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
            offset = -len(self.weights) % ALIGN
            self.weights.extend(b"\0" * offset)
            start = len(self.weights)
            self.weights.extend(data.tobytes())
            self.constant_ids[const] = _Tensor("socc_weights", start, tuple(data.shape), str(data.dtype))
        return self.constant_ids[const]


def generate_driver(mod: Any) -> Driver:
    """C source of the static program for `mod`'s main, with its weights blob."""
    from tvm import relax
    from tvm.ir.expr import Constant

    main = mod["main"]
    w = _Writer()
    env: dict[Any, Any] = {}  # relax Var -> _Tensor | storage name | list (tuple)
    inputs: list[_Tensor] = []
    for param in main.params:
        env[param] = w.buffer_tensor("input", _static_shape(param.ty, f"input {param.name}"), str(param.ty.dtype))
        inputs.append(env[param])

    def value_of(expr: Any) -> Any:
        if isinstance(expr, relax.Var):
            if expr not in env:
                raise BuildError(f"static driver: {expr.name} is used before it is defined")
            return env[expr]
        if isinstance(expr, Constant):
            return w.constant(expr)
        if isinstance(expr, relax.Tuple):
            return [value_of(f) for f in expr.fields]
        raise UserError(f"static driver: argument {type(expr).__name__} is not supported")

    def bind(var: Any, value: Any) -> None:
        name = var.name
        if isinstance(value, (relax.Var, Constant, relax.Tuple)):
            env[var] = value_of(value)
            return
        if isinstance(value, relax.TupleGetItem):
            env[var] = value_of(value.tuple_value)[value.index]
            return
        if not isinstance(value, relax.Call):
            raise UserError(f"static driver: binding {name} ({type(value).__name__}) is not supported")
        op = value.op
        if isinstance(op, relax.GlobalVar):
            args = []
            for arg in value.args:
                arg_value = value_of(arg)
                for t in arg_value if isinstance(arg_value, list) else [arg_value]:
                    if not isinstance(t, _Tensor):
                        raise UserError(f"static driver: kernel {op.name_hint} takes a non-tensor argument")
                    args.append(w.tensor_id(t))
            w.calls.append((op.name_hint, args))
            env[var] = None
            return
        op_name = getattr(op, "name", type(op).__name__)
        if op_name == "relax.memory.alloc_storage":
            env[var] = w.buffer("arena", int(value.args[0].values[0]))
        elif op_name == "relax.memory.alloc_tensor":
            base = value_of(value.args[0])
            offset = int(value.args[1].value)
            env[var] = _Tensor(base, offset, _static_shape(var.ty, name), str(var.ty.dtype))
        elif op_name == "relax.builtin.alloc_tensor":
            env[var] = w.buffer_tensor("output", _static_shape(var.ty, name), str(var.ty.dtype))
        elif op_name in ("relax.memory.ensure_zero_offset", "relax.reshape", "relax.memory.view"):
            src = value_of(value.args[0])
            env[var] = _Tensor(src.base, src.offset, _static_shape(var.ty, name), str(var.ty.dtype))
        elif op_name in ("relax.memory.kill_tensor", "relax.memory.kill_storage", "relax.null_value"):
            env[var] = None
        else:
            raise UserError(f"static driver: operator {op_name} (binding {name}) is not supported by the static driver")

    for block in main.body.blocks:
        for binding in block.bindings:
            bind(binding.var, binding.value)
    result = value_of(main.body.body)
    outputs = result if isinstance(result, list) else [result]
    return Driver(_render(w, inputs, outputs), bytes(w.weights), len(w.calls))


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render(w: _Writer, inputs: list[_Tensor], outputs: list[_Tensor]) -> str:
    lines = [
        "/* Generated by socc: the model's main as a static program (see toolchain/freestanding.py). */",
        "#include <stddef.h>",
        "#include <stdint.h>",
        "#include <dlpack/dlpack.h>",
        "#include <tvm/ffi/c_api.h>",
        "",
        "void socc_print(int fd, const char* text);",
        "int socc_read_file(const char* path, void* dst, size_t size);",
        "int socc_write_file(const char* path, const void* src, size_t size);",
        "",
        "/* The weights: one blob, each constant 128-byte aligned. */",
        f'__asm__(".section .rodata.socc_weights,\\"a\\"\\n.balign {ALIGN}\\n.globl socc_weights\\nsocc_weights:\\n.incbin \\"{WEIGHTS_BLOB}\\"\\n.text\\n");',
        "extern unsigned char socc_weights[];",
        "",
    ]
    for name, nbytes in w.buffers:
        lines.append(f"static unsigned char {name}[{nbytes}] __attribute__((aligned({ALIGN})));")
    lines.append("")
    for i, t in enumerate(w.tensors):
        dims = ", ".join(str(d) for d in t.shape) or "1"
        code, bits = _dl_dtype(t.dtype)
        lines.append(f"static int64_t socc_shape{i}[] = {{{dims}}};")
        lines.append(
            f"static DLTensor socc_t{i} = {{(void*)({t.base} + {t.offset}), {{kDLCPU, 0}}, {len(t.shape)}, "
            f"{{{code}, {bits}, 1}}, socc_shape{i}, NULL, 0}};"
        )
    lines.append("")
    for kernel in w.kernels:
        lines.append(f"int __tvm_ffi_{kernel}(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result);")
    lines += [
        "",
        "static int socc_call(int (*kernel)(void*, const TVMFFIAny*, int32_t, TVMFFIAny*), const char* name,",
        "                     DLTensor** tensors, int32_t count) {",
        "  TVMFFIAny args[count > 0 ? count : 1];",
        "  for (int32_t i = 0; i < count; ++i) {",
        "    args[i].type_index = kTVMFFIDLTensorPtr;",
        "    args[i].zero_padding = 0;",
        "    args[i].v_int64 = 0;",
        "    args[i].v_ptr = tensors[i];",
        "  }",
        "  TVMFFIAny result;",
        "  result.type_index = kTVMFFINone;",
        "  result.zero_padding = 0;",
        "  result.v_int64 = 0;",
        "  if (kernel(NULL, args, count, &result) != 0) {",
        '    socc_print(2, "run_model: kernel ");',
        "    socc_print(2, name);",
        '    socc_print(2, " failed\\n");',
        "    return 1;",
        "  }",
        "  return 0;",
        "}",
        "",
        "int socc_main(int argc, char** argv) {",
        f"  if (argc != {1 + len(inputs) + len(outputs)}) {{",
        f'    socc_print(2, "usage: run_model {" ".join(f"IN_{i}.bin" for i in range(len(inputs)))} '
        f'{" ".join(f"OUT_{i}.bin" for i in range(len(outputs)))} (raw tensors)\\n");',
        "    return 2;",
        "  }",
    ]
    for i, t in enumerate(inputs):
        lines += _or_exit(f"socc_read_file(argv[{1 + i}], {t.base}, {t.nbytes})", f"input {i} must be a file of exactly {t.nbytes} bytes", 2)
    for kernel, args in w.calls:
        tensors = ", ".join(f"&socc_t{a}" for a in args)
        lines.append(f"  {{ DLTensor* t[] = {{{tensors}}}; if (socc_call(__tvm_ffi_{kernel}, {_c_string(kernel)}, t, {len(args)})) return 1; }}")
    for i, t in enumerate(outputs):
        lines += _or_exit(f"socc_write_file(argv[{1 + len(inputs) + i}], {t.base} + {t.offset}, {t.nbytes})", f"cannot write output {i}", 1)
    lines += ["  return 0;", "}", ""]
    return "\n".join(lines)


def _or_exit(call: str, message: str, code: int) -> list[str]:
    """C lines: run `call`; if it fails, print `message` and return `code` from socc_main."""
    return [f"  if ({call} != 0) {{", f'    socc_print(2, "run_model: {message}\\n");', f"    return {code};", "  }"]


def _ffi_include_dir() -> Path:
    import tvm_ffi

    return Path(tvm_ffi.__file__).resolve().parent / "include"


def build_static_program(driver: Driver, kernels_object: Path, folder: Path, cc: tuple[str, ...], ld: tuple[str, ...], output: Path) -> None:
    """Writes the driver source, weights and C runtime into `folder`, and links the static `output`.

    The C files are compiled with `cc -c`, then linked with TVM's kernel object by `ld -static`."""
    folder, kernels_object, output = folder.resolve(), kernels_object.resolve(), output.resolve()  # tools run in `folder`
    (folder / DRIVER_SOURCE).write_text(driver.source)
    (folder / WEIGHTS_BLOB).write_bytes(driver.weights)
    (folder / RUNTIME_SOURCE.name).write_bytes(RUNTIME_SOURCE.read_bytes())
    objects = []
    for source in (DRIVER_SOURCE, RUNTIME_SOURCE.name):
        obj = kernels_object.with_name(Path(source).stem + ".o")
        run_tool([*cc, f"-I{_ffi_include_dir()}", "-c", source, "-o", str(obj)], f"compiling {source}", cwd=folder)
        objects.append(str(obj))
    run_tool([*ld, "-static", "-o", str(output), *objects, str(kernels_object)], "linking the static program", cwd=folder)
