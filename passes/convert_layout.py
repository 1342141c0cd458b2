"""convert-layout: convolutions in the layout the target's kernels want (NHWC activations, HWIO weights).

For a target whose profile says `layout = "NHWC"` (or `--layout NHWC`), rewrites every
`conv2d(x, W)` in NCHW/OIHW into

    permute_dims(conv2d(permute_dims(x, NCHW->NHWC), permute_dims(W, OIHW->HWIO)), NHWC->NCHW)

with TVM's ConvertLayout, which carries the new layout through the ops that follow (bias adds,
activations, pools, residual adds, means) so the permutes between two convs cancel: transposes are
left only where an op has no layout rule (a reshape, the model's inputs and outputs). The weight
permutes are constants, transposed here (the weights are stored as HWIO).

In NHWC a conv's output channels are its innermost, contiguous axis, and so are a depthwise conv's
input channels: vector code runs along channels with no relayout copies inside the kernels.

Before converting, clamps that TVM's ONNX importer writes as TE kernels (`maximum` / `minimum`
against a scalar constant: a Clip with input bounds, ReLU6) become Relax's `maximum` / `minimum`
(fusion's canonicalization, which later makes the pair one `clip`: TVM 0.27 gives `clip` no layout
rule), which ConvertLayout sees through (around a kernel call it puts a transpose pair).
"""

from __future__ import annotations

from typing import Any

from .base import CompileContext, GraphPass
from .fusion import canonicalize_clips

CONV_LAYOUTS = {"NHWC": ("NHWC", "HWIO")}  # data layout -> (data, kernel) layouts of converted convs


def _transpose_constant_weights(mod: Any) -> tuple[Any, int]:
    """Every permute_dims of a constant replaced by the transposed constant (numpy: FoldConstant would
    compile a kernel for each, ~0.1 s a weight); how many."""
    import numpy as np
    from tvm import relax
    from tvm.ir.expr import Constant

    transposed = 0

    @relax.expr_functor.mutator
    class WeightTransposer(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            nonlocal transposed
            call = super().visit_call_(call)
            if getattr(call.op, "name", "") != "relax.permute_dims" or not isinstance(call.args[0], Constant):
                return call
            value = call.args[0].value.numpy()
            axes = None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]
            transposed += 1
            return relax.const(np.ascontiguousarray(np.transpose(value, axes)), str(value.dtype))

    transposer = WeightTransposer(mod)
    main = mod.get_global_var("main")
    transposer.builder_.update_func(main, transposer.visit_expr(mod["main"]))
    return transposer.builder_.get(), transposed


def _calls(mod: Any, op_name: str) -> list[Any]:
    """The calls of one Relax op in main."""
    from tvm import relax

    calls: list[Any] = []
    relax.analysis.post_order_visit(mod["main"], lambda e: calls.append(e) if isinstance(e, relax.Call)
                                    and getattr(e.op, "name", "") == op_name else None)
    return calls


def _activation_transposes(mod: Any) -> int:
    """permute_dims calls in main whose input is not a constant (what is left after folding)."""
    from tvm.ir.expr import Constant

    return sum(not isinstance(call.args[0], Constant) for call in _calls(mod, "relax.permute_dims"))


class ConvertLayout(GraphPass):
    """Converts NCHW/OIHW convolutions to NHWC/HWIO (the target's `layout`), the layout carried through the ops between them; clamps written as TE kernels become Relax ops first so it carries through them too."""

    name = "convert-layout"

    def run(self, mod: Any, ctx: CompileContext) -> tuple[Any, dict[str, Any]]:
        from tvm import relax

        layout = ctx.options.get("layout") or "NCHW"
        if layout not in CONV_LAYOUTS or not _calls(mod, "relax.nn.conv2d"):
            return mod, {"layout": layout, "convs_converted": 0}
        mod, clamps = canonicalize_clips(relax.transform.FoldConstant()(mod), combine=False)  # bounds: constants once folded
        transposes_before = _activation_transposes(mod)
        mod = relax.transform.ConvertLayout({"relax.nn.conv2d": list(CONV_LAYOUTS[layout])})(mod)
        mod, weights = _transpose_constant_weights(mod)
        mod = relax.transform.DeadCodeElimination(["main"])(mod)
        converted = sum(str(call.attrs.data_layout) == CONV_LAYOUTS[layout][0] for call in _calls(mod, "relax.nn.conv2d"))
        return mod, {"layout": layout, "convs_converted": converted, "weights_transposed": weights,
                     "clips_canonicalized": sum(clamps.values()),
                     "activation_transposes": _activation_transposes(mod) - transposes_before}

