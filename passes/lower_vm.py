"""lower-vm: the last step before VM code generation."""

from __future__ import annotations

from typing import Any

from .base import CompileContext, TvmPhase


class LowerVM(TvmPhase):
    """Lowers tensor allocations to VM builtins, frees each tensor after its last use, lowers shape computations and runtime builtins, and names the entry functions."""

    name = "lower-vm"
    required = True

    def transforms(self, ctx: CompileContext) -> list[Any]:
        from tvm import relax

        return [
            relax.transform.LowerAllocTensor(),
            relax.transform.KillAfterLastUse(),
            relax.transform.LowerRuntimeBuiltin(),
            relax.transform.ComputePrimValue(),
            relax.transform.VMShapeLower(),
            relax.transform.AttachGlobalSymbol(),
        ]

    def run(self, mod: Any, ctx: CompileContext) -> tuple[Any, dict[str, Any]]:
        mod, stats = super().run(mod, ctx)
        return canonical_shape_funcs(mod), stats


def canonical_shape_funcs(mod: Any) -> Any:
    """Puts the stores of each shape function in a canonical order, for byte-identical builds.

    VMShapeLower (TVM 0.27) emits the symbolic-shape computations of `main` into a `shape_func`
    that stores each value into a slot of the shape heap, `H[slot] = f(H[...])`; the slots are
    numbered the same every run but the order of the stores follows a pointer-keyed hash table,
    so it changes between runs. A flat sequence of such stores is re-ordered here by slot, each
    store still after the stores whose slots it reads (a stable topological order).
    """
    import tvm
    from tvm import tirx

    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or not gv.name_hint.startswith("shape_func"):
            continue
        body = func.body
        if _kind(body) != "SeqStmt" or not all(_heap_slot(s) is not None for s in body.seq):
            continue
        updates[gv] = func.with_body(tirx.SeqStmt(_dependency_order(list(body.seq))))
    if not updates:
        return mod
    mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs, global_infos=mod.global_infos)
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def _kind(node: Any) -> str:
    """A TIR node's class name (0.27's tirx exports some node types only as constructor functions)."""
    return type(node).__name__


def _constant_index(node: Any) -> int | None:
    """The constant single index of a buffer load or store, else None."""
    indices = getattr(node, "indices", ())
    return int(indices[0].value) if len(indices) == 1 and _kind(indices[0]) == "IntImm" else None


def _heap_slot(stmt: Any) -> int | None:
    """The constant slot a `H[slot] = ...` store writes, else None."""
    return _constant_index(stmt) if _kind(stmt) == "BufferStore" else None


# Child fields of the integer expressions a shape function holds (binary ops, casts, calls, selects).
_EXPR_FIELDS = ("a", "b", "value", "args", "condition", "true_value", "false_value")


def _loaded_slots(expr: Any) -> set[int]:
    """The heap slots an expression reads (TVM 0.27 has no Python TIR visitor: walk the fields)."""
    if _kind(expr) == "BufferLoad":
        index = _constant_index(expr)
        return set() if index is None else {index}
    found: set[int] = set()
    for field in _EXPR_FIELDS:
        child = getattr(expr, field, None)
        if child is None or isinstance(child, (int, float, str)):
            continue
        for item in (child if _kind(child) in ("Array", "list", "tuple") else [child]):
            found |= _loaded_slots(item)
    return found


def _dependency_order(stores: list[Any]) -> list[Any]:
    written = {_heap_slot(s): s for s in stores}
    reads = {slot: _loaded_slots(store.value) & (set(written) - {slot}) for slot, store in written.items()}
    ordered: list[Any] = []
    done: set[int] = set()
    while len(done) < len(written):
        slot = min(s for s in written if s not in done and reads[s] <= done)
        done.add(slot)
        ordered.append(written[slot])
    return ordered
