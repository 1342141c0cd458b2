"""fold-constants: evaluate at compile time every op whose inputs are all constants.

The common ops (the importer's Clip bound checks, bias reshapes, weight casts, elementwise
arithmetic on weights) are evaluated in numpy, each op on its own as TVM would (IEEE float32 per
op, so the values are the same); what is left goes to TVM's FoldConstant, which compiles and
runs a kernel per folded expression (7.3 s for MobileNetV2's 123 before this).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .base import CompileContext, TvmPhase
from .stats import constant_bytes

_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "isnan": np.isnan, "isinf": np.isinf, "isfinite": np.isfinite, "logical_not": np.logical_not,
    "negative": np.negative, "abs": np.abs, "sqrt": np.sqrt,
}
# (no maximum/minimum: TVM's select and numpy differ on NaN; divide only on floats, below)
_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "add": np.add, "subtract": np.subtract, "multiply": np.multiply, "divide": np.divide,
    "equal": np.equal, "not_equal": np.not_equal,
    "less": np.less, "less_equal": np.less_equal, "greater": np.greater, "greater_equal": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or,
}
_SHAPED = ("reshape", "broadcast_to", "expand_dims", "squeeze", "flatten")  # values kept, shape from the call's type


def _evaluate(call: Any, args: list[np.ndarray]) -> np.ndarray | None:
    """The value of a Relax call on constant arguments, or None for an op this table lacks."""
    name = getattr(call.op, "name", "").removeprefix("relax.")
    with np.errstate(all="ignore"):  # IEEE results (inf, nan) as TVM computes them
        if name in _UNARY and len(args) == 1:
            return _UNARY[name](args[0])
        if name in _BINARY and len(args) == 2:
            if name == "divide" and not all(np.issubdtype(a.dtype, np.floating) for a in args):
                return None  # integer division: Relax truncates, by zero undefined
            return _BINARY[name](args[0], args[1])
    if name == "where" and len(args) == 3:
        return np.where(args[0], args[1], args[2])
    if name == "astype":
        return args[0].astype(str(call.attrs.dtype))
    if name == "permute_dims":
        axes = call.attrs.axes
        return np.transpose(args[0], None if axes is None else [int(a) for a in axes])
    if name in _SHAPED:
        return np.broadcast_to(args[0], _static_shape(call)) if name == "broadcast_to" else args[0].reshape(_static_shape(call))
    return None


def _static_shape(call: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in call.ty.shape)


def fold_in_numpy(mod: Any) -> tuple[Any, int]:
    """`main` with each call of a tabled op on constant arguments replaced by its value; how many."""
    import tvm
    from tvm import relax

    folded = 0

    @relax.expr_functor.mutator
    class Folder(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            nonlocal folded
            new = self.visit_expr_post_order(call)
            tensors = [self.constant(arg) for arg in new.args if not isinstance(arg, relax.ShapeExpr)]
            if not tensors or not all(isinstance(arg, tvm.ir.expr.Constant) for arg in tensors):
                return new
            dtype = str(getattr(call.ty, "dtype", ""))
            try:
                value = _evaluate(call, [arg.value.numpy() for arg in tensors])
                shape = _static_shape(call)
            except (TypeError, ValueError, AttributeError):  # a dynamic shape, an attribute numpy cannot take
                return new
            if value is None or not dtype or np.shape(value) != shape:
                return new
            folded += 1
            return relax.const(np.array(value, dtype=dtype), dtype)  # np.array keeps a 0-d result 0-d

        def constant(self, arg: Any) -> Any:
            """The constant a var is bound to (a folded call's value), else the arg itself."""
            bound = self.lookup_binding(arg) if isinstance(arg, relax.Var) else None
            return bound if isinstance(bound, tvm.ir.expr.Constant) else arg

    folder = Folder(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            folder.builder_.update_func(gvar, folder.visit_expr(func))
    return folder.builder_.get(), folded


class FoldConstants(TvmPhase):
    """Replaces calls whose arguments are all constants (shape arithmetic, weight transposes, casts) by their values: in numpy where it can, the rest by TVM's FoldConstant."""

    name = "fold-constants"

    def run(self, mod: Any, ctx: CompileContext) -> tuple[Any, dict[str, Any]]:
        folded_mod, folded = fold_in_numpy(mod)
        result, stats = super().run(folded_mod, ctx)
        stats["folded_in_numpy"] = folded
        stats["constant_bytes_before"] = constant_bytes(mod)
        return result, stats

    def transforms(self, ctx: CompileContext) -> list[Any]:
        from tvm import relax

        return [relax.transform.FoldConstant()]

    def extra_stats(self, before: Any, after: Any) -> dict[str, Any]:
        return {"constant_bytes_after": constant_bytes(after)}
