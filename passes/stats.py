"""Counting helpers that passes use for their stats (ops, kernels, bytes)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np


def count_ops(mod: Any, function: str = "main") -> Counter[str]:
    """Calls in a Relax function, by operator name (`relax.call_tir` counts as one call each;
    a call of a fused Relax function counts as one call, under the function's name)."""
    import tvm
    from tvm import relax

    counts: Counter[str] = Counter()

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            counts[expr.op.name] += 1
        elif isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.GlobalVar) and isinstance(mod[expr.op], relax.Function):
            counts[expr.op.name_hint] += 1

    relax.analysis.post_order_visit(mod[function], visit)
    return counts


def count_kernels(mod: Any) -> int:
    """TIR functions in the module: each is one compiled kernel."""
    from tvm import tirx

    return sum(1 for _, func in mod.functions_items() if isinstance(func, tirx.PrimFunc))


def constant_bytes(mod: Any, function: str | None = None) -> int:
    """Bytes of the constants (weights) a Relax function holds (None: all of the module's)."""
    import tvm
    from tvm import relax

    sizes: dict[int, int] = {}  # by data address: constant nodes that share one tensor count once

    def visit(expr: Any) -> None:
        if isinstance(expr, tvm.ir.expr.Constant) and isinstance(expr.value, tvm.runtime.Tensor):
            data = expr.value
            sizes[data.data_ptr()] = int(np.prod(data.shape, dtype=np.int64)) * np.dtype(str(data.dtype)).itemsize

    functions = [mod[function]] if function else [f for _, f in mod.functions_items() if isinstance(f, relax.Function)]
    for func in functions:
        relax.analysis.post_order_visit(func, visit)
    return sum(sizes.values())


def storage_allocations(mod: Any, function: str = "main") -> list[int | None]:
    """Byte size of each `relax.memory.alloc_storage` in a function (None where it is symbolic)."""
    import tvm
    from tvm import relax

    alloc_storage = tvm.ir.Op.get("relax.memory.alloc_storage")
    sizes: list[int | None] = []

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and expr.op.same_as(alloc_storage):
            values = expr.args[0].values
            sizes.append(int(values[0]) if isinstance(values[0], tvm.tirx.IntImm) else None)

    relax.analysis.post_order_visit(mod[function], visit)
    return sizes
