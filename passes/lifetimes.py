"""Tensor lifetimes in a lowered Relax function: which allocation is alive at which binding.

Used by `memory-plan` (to place tensors) and by its reports (`memory_timeline`). It reads the
form the module has after `lower-calls` (explicit `R.builtin.alloc_tensor` per kernel output),
after a planner (`R.memory.alloc_tensor` on a storage) and after `lower-vm` (`R.vm.alloc_tensor`).

Program points are the top-level bindings of the function in order (0..n-1), plus point n for the
return value. A tensor is alive from the binding that allocates it to the last binding that uses
it or any alias of it. Aliases are followed conservatively: a binding whose result can hold a
tensor (a tensor, a tuple, an opaque object) aliases every variable its value mentions (`lv =
alloc`, `R.reshape(alloc, ...)`, tuples, `match_cast`, `ensure_zero_offset`, unknown calls),
except allocations, whose storage argument is not aliased. Kernel calls in destination-passing
style return nothing, so they use their arguments but alias none of them. Nested scopes (the
branches of an `If`) count as one use of everything they mention at their binding; allocations
inside them are not tracked. Tensors reachable from the return value "escape".
"""

from __future__ import annotations

import dataclasses
from typing import Any

ALLOC_TENSOR_OPS = ("relax.builtin.alloc_tensor", "relax.memory.alloc_tensor", "relax.vm.alloc_tensor")
ALLOC_STORAGE_OPS = ("relax.memory.alloc_storage", "relax.vm.alloc_storage")
# Freeing is not a use: KillAfterLastUse puts these right after the real last use.
KILL_OPS = ("relax.memory.kill_tensor", "relax.memory.kill_storage", "relax.vm.kill_object")


@dataclasses.dataclass
class Alloc:
    """One tensor allocation at a top-level binding, with its lifetime in program points."""

    name: str
    index: int  # the binding that allocates it
    var: Any  # relax.Var bound to the allocation
    call: Any  # the allocating relax.Call
    kind: str  # "builtin" | "memory" | "vm"
    shape: tuple[Any, ...] | None  # PrimExprs (IntImm when static); None when held in a variable
    dtype: str
    storage: Any | None = None  # the storage var (memory/vm kinds)
    offset: int | None = None  # constant byte offset in the storage (memory/vm kinds)
    first: int = 0
    last: int = 0
    escapes: bool = False


@dataclasses.dataclass
class Liveness:
    bindings: list[Any]  # top-level bindings in program order
    points: int  # number of program points (len(bindings) + 1 for the return)
    allocs: list[Alloc]
    labels: list[str]  # a short label per program point (kernel / op name)
    kernels: list[bool]  # whether the binding at each point calls a kernel


def op_name(expr: Any) -> str | None:
    import tvm
    from tvm import relax

    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return str(expr.op.name)
    return None


def may_hold_tensor(ty: Any) -> bool:
    """Whether a value of this type can be (or contain) a tensor."""
    import tvm
    from tvm import relax

    if ty is None:
        return True
    if isinstance(ty, relax.TensorType):
        return True
    if isinstance(ty, (relax.ShapeType, tvm.ir.PrimType)):
        return False
    if isinstance(ty, relax.TupleType):
        return any(may_hold_tensor(f) for f in ty.fields)
    return True  # objects, Any, closures: assume they may


def dtype_bytes(dtype: str) -> int:
    import tvm

    dt = tvm.DataType(str(dtype))
    return (dt.bits * dt.lanes + 7) // 8


def _label(value: Any) -> str:
    import tvm
    from tvm import relax

    if isinstance(value, relax.Call):
        if isinstance(value.op, tvm.ir.GlobalVar):
            return str(value.op.name_hint)
        if isinstance(value.op, tvm.ir.Op):
            return str(value.op.name)
        if isinstance(value.op, relax.ExternFunc):
            return str(value.op.global_symbol)
    return type(value).__name__


def is_kernel_call(value: Any) -> bool:
    """A call to a module function that returns nothing (a destination-passing kernel)."""
    import tvm
    from tvm import relax

    if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar)):
        return False
    ty = value.op.ty
    return isinstance(ty, relax.FuncType) and not may_hold_tensor(ty.ret)


def const_int(expr: Any) -> int | None:
    """The value of an integer immediate (0.27 uses one IntImm class for Relax and TIR), else None."""
    if isinstance(expr, bool):
        return None
    if isinstance(expr, int):
        return expr
    value = getattr(expr, "value", None)
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    return None


def const_str(expr: Any) -> str | None:
    value = getattr(expr, "value", None)
    return value if isinstance(value, str) else None


def _alloc_of(var: Any, value: Any, index: int) -> Alloc | None:
    from tvm import relax

    name = op_name(value)
    if name not in ALLOC_TENSOR_OPS:
        return None
    if name == "relax.builtin.alloc_tensor":
        shape_arg, dtype_arg = value.args[0], value.args[1]
        storage, offset, kind = None, None, "builtin"
    else:  # (storage, offset, shape, dtype, device)
        storage = value.args[0]
        offset = const_int(value.args[1])
        shape_arg, dtype_arg = value.args[2], value.args[3]
        kind = "memory" if name == "relax.memory.alloc_tensor" else "vm"
    if isinstance(shape_arg, relax.ShapeExpr):
        shape = tuple(shape_arg.values)
    elif isinstance(var.ty, relax.TensorType) and isinstance(var.ty.shape, relax.ShapeExpr):
        shape = tuple(var.ty.shape.values)
    else:
        shape = None  # held in a variable (e.g. after lower-vm with symbolic dims): size unknown here
    dtype = str(dtype_arg.value) if hasattr(dtype_arg, "value") else str(var.ty.dtype)
    return Alloc(str(var.name), index, var, value, kind, shape, dtype, storage, offset, index, index)


def analyze(func: Any) -> Liveness:
    """Allocations of `func`'s top-level bindings and their alias-aware lifetimes."""
    from tvm import relax

    bindings = [b for block in func.body.blocks for b in block.bindings]
    allocs: list[Alloc] = []
    roots: dict[Any, frozenset[int]] = {}  # relax.Var -> ids (indexes in `allocs`) it may alias
    labels: list[str] = []
    kernels: list[bool] = []

    def use(var: Any, point: int) -> None:
        for rid in roots.get(var, ()):
            if allocs[rid].last < point:
                allocs[rid].last = point

    for index, binding in enumerate(bindings):
        value = binding.value
        labels.append(_label(value))
        kernels.append(is_kernel_call(value))
        alloc = _alloc_of(binding.var, value, index)
        if alloc is not None:
            # the storage argument is used here but not aliased: the tensor is a new root
            if alloc.storage is not None and isinstance(alloc.storage, relax.Var):
                use(alloc.storage, index)
            allocs.append(alloc)
            roots[binding.var] = frozenset([len(allocs) - 1])
            continue
        if op_name(value) in KILL_OPS:
            continue
        mentioned = relax.analysis.free_vars(value)
        for var in mentioned:
            use(var, index)
        if may_hold_tensor(binding.var.ty) and not is_kernel_call(value):
            alias: frozenset[int] = frozenset()
            for var in mentioned:
                alias |= roots.get(var, frozenset())
            if alias:
                roots[binding.var] = alias
    end = len(bindings)
    labels.append("return")
    kernels.append(False)
    for var in relax.analysis.free_vars(func.body.body):
        use(var, end)
        for rid in roots.get(var, ()):
            allocs[rid].escapes = True
    return Liveness(bindings, end + 1, allocs, labels, kernels)
