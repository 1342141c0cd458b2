"""fold-batchnorm and fusion: socc's own operator fusion, by Relax pattern matching.

Two passes, because they need different places in the pipeline:

- `fold-batchnorm` runs first, before `decompose` turns `R.nn.batch_norm` into arithmetic: it folds
  an inference BatchNorm into the preceding conv2d's weights and bias (numpy, float64).
  Note: the importer's onnxsim step already folds Conv+BatchNormalization when it simplifies, so
  this pass finds BatchNorms only in models imported without simplification (`--no-simplify`) or
  where onnxsim could not fold them.
- `fusion` runs after `fold-constants` (so weights, scales and clip bounds are real constants) and
  before `legalize`. It first turns the importer's Clip kernels (`call_tir` of TE maximum/minimum
  with a scalar bound) back into `R.clip`, then groups each matched op chain into one Relax
  function with `FuseOpsByPattern(bind_constants=False, annotate_codegen=False)`: the function
  carries `Primitive=1` and `Composite=<pattern>`, its constants become parameters (FuseTIR refuses
  tensor constants inside primitive functions). `legalize` lowers every op inside it, and
  `fuse-kernels`' FuseTIR merges each such function into ONE TIR PrimFunc, whatever the ops' own
  fusion kinds (reductions + elementwise + matmuls included); TVM's generic FuseOps fuses the rest.
  FuseOps treats a call to a grouped function as opaque: nothing joins a group afterwards. So
  what generic fusion already makes one kernel of (conv+bias, dense+bias, + residual add) is left
  to it, and activation patterns also take a residual add that follows the activation.
  Without fuse-kernels in the build (`--skip-pass fuse-kernels`) no groups are formed: they would
  stay Relax subfunctions, hiding their tensors from the memory planners.

Patterns are tried in priority order (longer first); each has a name and a family, and
`ctx.options["skip_fusion"]` (a list of pattern or family names) turns them off.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any

from .base import CompileContext, GraphPass
from .stats import count_kernels, count_ops

MAX_GROUPS_IN_STATS = 200


# ----------------------------------------------------------------------------------- pattern kit

def _op(name: str, *args: Any) -> Any:
    from tvm.relax.dpl import is_op

    return is_op("relax." + name)(*args)


def _w() -> Any:
    from tvm.relax.dpl import wildcard

    return wildcard()


def _c() -> Any:
    from tvm.relax.dpl import is_const

    return is_const()


# The matcher treats add and multiply as commutative, so each form is written once.

def _bias(base: Any) -> Any:
    return _op("add", base, _c())


def _maybe_reshaped(x: Any) -> Any:
    """x, or x reshaped (a dense on [batch*seq, k] back to [batch, seq, n] before its activation)."""
    return _op("reshape", x, _w()) | x


def _half_times(x: Any, p: Any) -> Any:
    """0.5 * x * p in the orders exporters write it: (x*p)*c, (x*c)*p, x*(p*c)."""
    return (_op("multiply", _op("multiply", x, p), _c())
            | _op("multiply", _op("multiply", x, _c()), p)
            | _op("multiply", x, _op("multiply", p, _c())))


def _gelu_erf(x: Any) -> Any:
    """x * 0.5 * (1 + erf(x / sqrt(2)))."""
    erf = _op("erf", _op("divide", x, _c()) | _op("multiply", x, _c()))
    return _half_times(x, _op("add", erf, _c()))


def _gelu_tanh(x: Any) -> Any:
    """x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))."""
    cube = _op("power", x, _c()) | _op("multiply", x, _op("multiply", x, x))
    inner = _op("add", x, _op("multiply", cube, _c()))
    tanh = _op("tanh", _op("multiply", inner, _c()))
    return _half_times(x, _op("add", tanh, _c()))


def _silu(x: Any) -> Any:
    return _op("multiply", x, _op("sigmoid", x))


def _hardswish(x: Any) -> Any:
    """x * relu6(x + 3) / 6 (ONNX HardSwish), and x * hardsigmoid(x)."""
    relu6 = _op("clip", _op("add", x, _c()), _w(), _w())
    hard_sigmoid = _op("clip", _op("add", _op("multiply", x, _c()), _c()), _w(), _w())
    return (_op("multiply", x, _op("divide", relu6, _c()))
            | _op("divide", _op("multiply", x, relu6), _c())
            | _op("multiply", _op("multiply", x, relu6), _c())
            | _op("multiply", x, _op("multiply", relu6, _c()))
            | _op("multiply", x, hard_sigmoid))


_SINGLE_ACTIVATIONS = ("nn.relu", "clip", "sigmoid", "tanh", "nn.gelu", "nn.gelu_tanh", "nn.silu", "nn.leakyrelu")


def _single_act(x: Any) -> Any:
    pattern = None
    for name in _SINGLE_ACTIVATIONS:
        p = _op(name, x, _w(), _w()) if name == "clip" else _op(name, x)
        pattern = p if pattern is None else pattern | p
    return pattern


def _conv(x: Any | None = None) -> Any:
    return _op("nn.conv2d", x if x is not None else _w(), _c())


def _dense() -> Any:
    return _op("matmul", _w(), _c())


def _layernorm_primitive(x: Any) -> Any:
    """(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps), as ReduceMean/Sub/Pow/Sqrt/Div."""
    centered = _op("subtract", x, _op("mean", x))
    variance = _op("mean", _op("power", centered, _c()) | _op("multiply", centered, centered))
    var_eps = _op("add", variance, _c())
    return _op("divide", centered, _op("sqrt", var_eps)) | _op("multiply", centered, _op("rsqrt", var_eps))


def _affine_variants(normalized: Any) -> list[Any]:
    """Longest first: * gamma + beta, * gamma, bare."""
    scaled = _op("multiply", normalized, _c())
    return [_op("add", scaled, _c()), scaled, normalized]


def _qkv(x: Any) -> Any:
    """An attention operand, with its head split (reshape + permute_dims) when there is one."""
    return _op("permute_dims", _op("reshape", x, _w())) | _op("permute_dims", x) | x


def _attention_core() -> Any:
    """softmax(Q @ K [/ scale | * scale] [+ mask]) @ V."""
    scores = _op("matmul", _qkv(_w()), _qkv(_w()))
    scaled = _op("divide", scores, _c()) | _op("multiply", scores, _c()) | scores
    logits = _op("add", scaled, _w()) | scaled
    return _op("matmul", _op("nn.softmax", logits), _qkv(_w()))


def _merge_heads(x: Any) -> Any:
    return _op("reshape", _op("permute_dims", x), _w())


def _then_residual(act: Any) -> list[Any]:
    """act + residual first, then act alone: generic fusion would have put an add after the
    activation into the same kernel, and it cannot join a group once the group is formed."""
    return [_op("add", act, _w()), act]


@dataclasses.dataclass(frozen=True)
class FusionSpec:
    """One named pattern (one or more DPL variants, tried in order, longest first)."""

    name: str
    family: str
    doc: str
    variants: Callable[[], list[Any]]


# Priority order: a pattern's ops are taken by the first spec that matches them.
FUSION_SPECS: tuple[FusionSpec, ...] = (
    FusionSpec("attention", "attention",
               "matmul(Q, K) [scale] [+ mask] -> softmax -> matmul(., V), with the heads' reshape/permute_dims of Q, K, V and of the output",
               lambda: [_merge_heads(_attention_core()), _attention_core()]),
    FusionSpec("add-layernorm", "layernorm",
               "residual add + layer norm (R.nn.layer_norm, or written as mean/sub/pow/mean/add/sqrt/div [* gamma + beta])",
               lambda: [*_affine_variants(_layernorm_primitive(_op("add", _w(), _w()))),
                        _op("nn.layer_norm", _op("add", _w(), _w()), _w(), _w())]),
    FusionSpec("layernorm", "layernorm",
               "layer norm written as mean/sub/pow/mean/add/sqrt/div [* gamma + beta]",
               lambda: _affine_variants(_layernorm_primitive(_w()))),
    FusionSpec("dense-bias-gelu", "dense-bias-act", "matmul(x, W) + b -> gelu, erf form",
               lambda: _then_residual(_gelu_erf(_maybe_reshaped(_bias(_dense()))))),
    FusionSpec("dense-bias-gelu-tanh", "dense-bias-act", "matmul(x, W) + b -> gelu, tanh form",
               lambda: _then_residual(_gelu_tanh(_maybe_reshaped(_bias(_dense()))))),
    FusionSpec("dense-bias-hardswish", "dense-bias-act", "matmul(x, W) + b -> hardswish",
               lambda: _then_residual(_hardswish(_maybe_reshaped(_bias(_dense()))))),
    FusionSpec("dense-bias-silu", "dense-bias-act", "matmul(x, W) + b -> x * sigmoid(x)",
               lambda: _then_residual(_silu(_maybe_reshaped(_bias(_dense()))))),
    FusionSpec("dense-bias-act", "dense-bias-act", "matmul(x, W) + b -> relu | clip (relu6) | sigmoid | tanh | gelu | silu | leaky relu op",
               lambda: _then_residual(_single_act(_maybe_reshaped(_bias(_dense()))))),
    FusionSpec("conv2d-bias-hardswish", "conv2d-bias-act", "conv2d(x, W) + b -> hardswish",
               lambda: _then_residual(_hardswish(_bias(_conv())))),
    FusionSpec("conv2d-bias-silu", "conv2d-bias-act", "conv2d(x, W) + b -> x * sigmoid(x)",
               lambda: _then_residual(_silu(_bias(_conv())))),
    FusionSpec("conv2d-bias-add-act", "conv2d-bias-act", "conv2d(x, W) + b + residual -> relu | clip (relu6) | sigmoid | ...",
               lambda: [_single_act(_op("add", _bias(_conv()), _w()))]),
    FusionSpec("conv2d-bias-act", "conv2d-bias-act", "conv2d(x, W) + b -> relu | clip (relu6) | sigmoid | tanh | ...",
               lambda: _then_residual(_single_act(_bias(_conv())))),
    FusionSpec("pool-dense", "head", "global average pool -> flatten -> matmul(x, W) + b (classifier head)",
               lambda: [_bias(_op("matmul", _op("reshape", _op("mean", _w()), _w()), _c()))]),
)

FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(s.family for s in FUSION_SPECS))


def known_pattern_names() -> list[str]:
    """Every name `skip_fusion` accepts: pattern names, then family names."""
    return list(dict.fromkeys([s.name for s in FUSION_SPECS] + list(FAMILIES) + [FoldBatchNorm.pattern]))


def _selected_specs(skip: list[str]) -> tuple[list[FusionSpec], list[str]]:
    known = set(known_pattern_names())
    unknown = [name for name in skip if name not in known]
    if unknown:
        raise ValueError(f"unknown fusion pattern {unknown[0]!r}; known: {', '.join(known_pattern_names())}")
    chosen = [s for s in FUSION_SPECS if s.name not in skip and s.family not in skip]
    return chosen, sorted(s.name for s in FUSION_SPECS if s not in chosen)


def _no_leaks(context: Any) -> bool:
    """A group may only expose its root: every intermediate is used inside the group."""
    from tvm.relax.backend.utils import has_leaking_intermediate_variables

    return not has_leaking_intermediate_variables(context)


# ------------------------------------------------------------------------------ fold-batchnorm

def _const_array(expr: Any) -> Any:
    """The numpy value of a Constant, or of reshape(Constant) (a conv bias before fold-constants)."""
    import tvm
    from tvm import relax

    if isinstance(expr, tvm.ir.expr.Constant):
        return expr.value.numpy()
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.reshape":
        if isinstance(expr.args[0], tvm.ir.expr.Constant):
            return expr.args[0].value.numpy()
    return None


def _value_uses(func: Any) -> dict[Any, int]:
    """For each bound value of a function: how many bindings read its variable (+1 if it leaves its block)."""
    from tvm import relax

    uses: dict[Any, int] = {}
    var2val = relax.analysis.get_var2val(func)
    for block in func.body.blocks:
        if not isinstance(block, relax.DataflowBlock):
            continue
        for var, users in relax.analysis.udchain(block).items():
            if var in var2val:
                uses[var2val[var]] = len(users) + (0 if isinstance(var, relax.DataflowVar) else 1)
    return uses


class FoldBatchNorm(GraphPass):
    """Folds each inference BatchNorm that follows a conv2d (optionally with a bias add) into the conv's weights and a per-channel bias, before decompose turns BatchNorm into arithmetic.

    A BatchNorm with no conv before it (DenseNet's and pre-activation ResNets' BN over a concatenation
    or a residual sum) becomes `x * scale + shift`, the two vectors computed in float64: decompose
    would leave (x - mean) / sqrt(var + eps) * gamma + beta, four per-channel constants and four
    operations per element where two do. Stat `to_affine`.
    """

    name = "fold-batchnorm"
    pattern = "conv-bn"  # the name `skip_fusion` knows it by

    def run(self, mod: Any, ctx: CompileContext) -> tuple[Any, dict[str, Any]]:
        ops = count_ops(mod)
        skip = list(ctx.options.get("skip_fusion", None) or [])
        _selected_specs(skip)  # refuses unknown names early
        folded, affine, refused = 0, 0, Counter()
        if self.pattern not in skip and ops["relax.nn.batch_norm"]:
            mod, folded, refused = self._fold(mod)
        if count_ops(mod)["relax.nn.batch_norm"]:
            mod, affine = _batch_norms_to_affine(mod)
        stats: dict[str, Any] = {
            "ops_before": sum(ops.values()),
            "ops_after": sum(count_ops(mod).values()),
            "kernels_before": count_kernels(mod),
            "kernels_after": count_kernels(mod),
            "batch_norms": ops["relax.nn.batch_norm"],
            "folded": folded,
            "to_affine": affine,
        }
        if refused:
            stats["not_folded"] = dict(sorted(refused.items()))
        if self.pattern in skip:
            stats["skipped"] = [self.pattern]
        return mod, stats

    @staticmethod
    def _fold(mod: Any) -> tuple[Any, int, Counter[str]]:
        import numpy as np
        from tvm import relax
        from tvm.relax.dpl import is_op, is_tuple_get_item, wildcard

        main = mod["main"]
        uses = _value_uses(main)
        conv = is_op("relax.nn.conv2d")(wildcard(), wildcard())
        conv_bias = is_op("relax.add")(conv, wildcard())
        bn = is_op("relax.nn.batch_norm")(conv | conv_bias, wildcard(), wildcard(), wildcard(), wildcard())
        pattern = is_tuple_get_item(bn, 0)
        folded = 0
        refused: Counter[str] = Counter()

        def rewrite(expr: Any, matches: Any) -> Any:
            nonlocal folded
            bn_call, conv_call = matches[bn], matches[conv]
            biased = matches[conv_bias] if conv_bias in matches else None
            attrs, conv_attrs = bn_call.attrs, conv_call.attrs
            weight = _const_array(conv_call.args[1])
            params = [_const_array(a) for a in bn_call.args[1:5]]
            if bool(getattr(attrs, "training", False)):
                refused["training mode"] += 1
                return expr
            if weight is None or any(p is None for p in params):
                refused["weights not constant"] += 1
                return expr
            if (str(conv_attrs.data_layout) != "NCHW" or str(conv_attrs.kernel_layout) != "OIHW"
                    or str(conv_attrs.out_layout) != "NCHW" or int(attrs.axis) not in (1, -3)):
                refused["layout"] += 1
                return expr
            if uses.get(conv_call, 0) != 1 or (biased is not None and uses.get(biased, 0) != 1):
                refused["conv output used elsewhere"] += 1
                return expr
            channels = weight.shape[0]
            bias = np.zeros(channels)
            if biased is not None:
                other = biased.args[1] if biased.args[0].same_as(conv_call) else biased.args[0]
                b = _const_array(other)
                if b is None or b.size != channels:
                    refused["bias not per-channel constant"] += 1
                    return expr
                bias = b.reshape(-1).astype(np.float64)
            affine = _batch_norm_affine(bn_call, channels)
            if affine is None:
                refused["parameter shape"] += 1
                return expr
            scale, shift = affine
            new_weight = (weight.astype(np.float64) * scale.reshape(-1, *[1] * (weight.ndim - 1))).astype(weight.dtype)
            new_bias = (bias * scale + shift).astype(weight.dtype).reshape(1, channels, 1, 1)
            folded += 1
            new_conv = relax.Call(conv_call.op, [conv_call.args[0], relax.const(new_weight)], conv_attrs)
            return relax.op.add(new_conv, relax.const(new_bias))

        new_main = relax.analysis.remove_all_unused(relax.dpl.rewrite_call(pattern, rewrite, main))
        mod = mod.clone()
        mod.update_func(mod.get_global_var("main"), new_main)
        return mod, folded, refused


def _batch_norm_affine(bn_call: Any, channels: int | None = None) -> tuple[Any, Any] | None:
    """(scale, shift) in float64 with batch_norm(x) == x * scale + shift per channel; None unless the
    four parameters are constants of one length (`channels` if given) and the BN is for inference."""
    import numpy as np

    attrs = bn_call.attrs
    params = [_const_array(a) for a in bn_call.args[1:5]]
    if bool(getattr(attrs, "training", False)) or any(p is None for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
    size = channels if channels is not None else mean.size
    if any(p.size != size for p in (gamma, beta, mean, var)):
        return None
    if not bool(attrs.scale):
        gamma = np.ones(size)
    if not bool(attrs.center):
        beta = np.zeros(size)
    scale = gamma / np.sqrt(var + float(attrs.epsilon))
    return scale, beta - mean * scale


def _batch_norms_to_affine(mod: Any) -> tuple[Any, int]:
    """Every inference BatchNorm left (none before it to fold into) -> x * scale + shift."""
    from tvm import relax
    from tvm.relax.dpl import is_op, is_tuple_get_item, wildcard

    bn = is_op("relax.nn.batch_norm")(wildcard(), wildcard(), wildcard(), wildcard(), wildcard())
    rewritten = 0

    def rewrite(expr: Any, matches: Any) -> Any:
        nonlocal rewritten
        bn_call = matches[bn]
        data = bn_call.args[0]
        affine = _batch_norm_affine(bn_call)
        dtype, ndim = str(data.ty.dtype), int(data.ty.ndim)
        if affine is None or ndim < 1 or not dtype.startswith("float"):
            return expr
        axis = int(bn_call.attrs.axis) % ndim
        shape = [1] * ndim
        shape[axis] = affine[0].size
        scale, shift = (relax.const(v.astype(dtype).reshape(shape)) for v in affine)
        rewritten += 1
        return relax.op.add(relax.op.multiply(data, scale), shift)

    main = relax.analysis.remove_all_unused(relax.dpl.rewrite_call(is_tuple_get_item(bn, 0), rewrite, mod["main"]))
    mod = mod.clone()
    mod.update_func(mod.get_global_var("main"), main)
    return mod, rewritten


# ------------------------------------------------------------------------------------- fusion

def _is_scalar_const(expr: Any) -> bool:
    import tvm

    return isinstance(expr, tvm.ir.expr.Constant) and len(expr.value.shape) == 0


def _te_reference(op_name: str, arg_types: list[Any]) -> Any:
    """The PrimFunc the ONNX importer emits for `bb.emit_te(topi.<op_name>, *args)`."""
    from tvm import relax, tirx, topi

    bb = relax.BlockBuilder()
    params = [relax.Var(f"a{i}", t) for i, t in enumerate(arg_types)]
    with bb.function("reference", params):
        bb.emit_func_output(bb.emit_te(getattr(topi, op_name), *params))
    return next(f for _, f in bb.get().functions_items() if isinstance(f, tirx.PrimFunc))


def canonicalize_clips(mod: Any, combine: bool = True) -> tuple[Any, Counter[str]]:
    """The importer's Clip is `call_tir` of TE maximum/minimum with a scalar bound: back to R.clip.

    A kernel is recognized only if it is structurally identical to what `emit_te(topi.maximum /
    topi.minimum)` gives for the same argument types, so renamed or hand-written kernels stay.
    minimum(maximum(x, lo), hi) with constant scalars becomes R.clip(x, lo, hi) (bounds inline in
    the kernel instead of scalar tensor arguments) when `combine`; a lone bound stays R.maximum / R.minimum.
    """
    import tvm
    import tvm_ffi
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, wildcard

    counts: Counter[str] = Counter()
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def untir(expr: Any, matches: Any) -> Any:
        if not expr.op.same_as(call_tir) or len(expr.args) != 2:
            return expr
        gv, args = expr.args
        fields = list(getattr(args, "fields", []))
        if len(fields) != 2 or not _is_scalar_const(fields[1]) or not isinstance(gv, tvm.ir.GlobalVar):
            return expr
        func = mod[gv]
        for op_name in ("maximum", "minimum"):
            if gv.name_hint.startswith(op_name):
                if tvm_ffi.structural_equal(func, _te_reference(op_name, [f.ty for f in fields]), map_free_vars=True):
                    counts[op_name] += 1
                    return getattr(relax.op, op_name)(fields[0], fields[1])
        return expr

    main = relax.dpl.rewrite_call(is_op("relax.call_tir")(wildcard(), wildcard()), untir, mod["main"])
    lower = is_op("relax.maximum")(wildcard(), is_const())
    clip = is_op("relax.minimum")(lower, is_const())

    def to_clip(expr: Any, matches: Any) -> Any:
        low, high = matches[lower].args[1], expr.args[1]
        if not (_is_scalar_const(low) and _is_scalar_const(high)) or str(low.value.dtype) not in ("float32", "float16", "float64"):
            return expr
        lo, hi = float(low.value.numpy()), float(high.value.numpy())
        if lo != lo or hi != hi:  # NaN bounds: keep max/min
            return expr
        counts["clip"] += 1
        return relax.op.clip(matches[lower].args[0], lo, hi)

    if combine:
        main = relax.analysis.remove_all_unused(relax.dpl.rewrite_call(clip, to_clip, main))
    if counts:
        mod = mod.clone()
        mod.update_func(mod.get_global_var("main"), main)
        mod = relax.transform.DeadCodeElimination(["main"])(mod)
    return mod, counts


def _ops_of(func: Any) -> list[str]:
    """Operator names in a grouped function, in order, without the `relax.` prefix."""
    import tvm
    from tvm import relax

    names: list[str] = []

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            names.append(expr.op.name.removeprefix("relax."))

    relax.analysis.post_order_visit(func.body, visit)
    return names


def _inline_shape_params(func: Any) -> tuple[Any, list[int]]:
    """Puts shape arguments back inside a grouped function.

    FuseOpsByPattern makes a ShapeExpr with symbolic dims (reshape's target with a dynamic batch or
    sequence) a parameter, and LegalizeOps cannot lower a reshape to a shape variable. The
    parameter's type carries the shape: every use becomes that ShapeExpr. The parameter itself is
    dropped when the other parameters define its symbolic dims, and kept (it then only defines
    them, e.g. `batch` and `sequence` when the input is [batch * sequence, k]) otherwise.
    Returns the function and the indices of the parameters dropped.
    """
    from tvm import relax

    shapes = {p: relax.ShapeExpr(p.ty.values) for p in func.params
              if isinstance(p.ty, relax.ShapeType) and p.ty.values is not None}
    if not shapes:
        return func, []
    defined = set()
    for p in func.params:
        if p not in shapes:
            defined.update(relax.analysis.definable_tir_vars_in_type(p.ty))
    dropped = [i for i, p in enumerate(func.params)
               if p in shapes and set(relax.analysis.tir_vars_in_type(p.ty)) <= defined]

    @relax.expr_functor.mutator
    class Substitute(relax.PyExprMutator):
        def visit_var_(self, var: Any) -> Any:
            return shapes.get(var, var)

    body = Substitute().visit_expr(func.body)
    params = [p for i, p in enumerate(func.params) if i not in dropped]
    return relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span), dropped


def _finish_groups(mod: Any) -> tuple[Any, dict[str, tuple[str, list[str]]], Counter[str]]:
    """Names each grouped function after its pattern (fused_attention, fused_attention1, ...) and
    inlines its shape parameters.

    Returns the module, {new name: (pattern, ops)} and the call sites per pattern.
    """
    import tvm
    from tvm import relax

    groups: dict[str, tuple[str, list[str]]] = {}
    renames: dict[Any, Any] = {}
    dropped: dict[str, list[int]] = {}
    taken = {gv.name_hint for gv, _ in mod.functions_items()}
    for gv, func in sorted(mod.functions_items(), key=lambda item: item[0].name_hint):
        composite = func.attrs.get("Composite") if isinstance(func, relax.Function) and func.attrs is not None else None
        if composite is None:
            continue
        base = "fused_" + str(composite).replace("-", "_")
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}{i}"
        taken.add(name)
        renames[gv] = name
        groups[name] = (str(composite), _ops_of(func))
    calls: Counter[str] = Counter()
    if not renames:
        return mod, groups, calls

    @relax.expr_functor.mutator
    class Renamer(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = self.visit_expr_post_order(call)
            if isinstance(call.op, tvm.ir.GlobalVar) and call.op in renames:
                new_gv = renames[call.op]
                calls[groups[new_gv.name_hint][0]] += 1
                gone = dropped[new_gv.name_hint]
                args = [a for i, a in enumerate(call.args) if i not in gone]
                return relax.Call(new_gv, args, call.attrs, call.ty_args)
            return call

    new_mod = tvm.IRModule({}, attrs=mod.attrs, global_infos=mod.global_infos)
    for gv, func in mod.functions_items():
        if gv in renames:
            func, dropped[renames[gv]] = _inline_shape_params(func)
            new_gv = tvm.ir.GlobalVar(renames[gv])
            relax.expr._update_type(new_gv, func.ty)  # what BlockBuilder.add_func does (no public API)
            new_mod[new_gv] = func
            renames[gv] = new_gv
    for gv, func in mod.functions_items():
        if gv not in renames:
            new_mod[gv] = Renamer().visit_expr(func) if isinstance(func, relax.Function) else func
    return new_mod, groups, calls


def _count_calls(mod: Any) -> int:
    """Calls in main, one per op and one per grouped function."""
    import tvm
    from tvm import relax

    total = 0

    def visit(expr: Any) -> None:
        nonlocal total
        if isinstance(expr, relax.Call) and isinstance(expr.op, (tvm.ir.Op, tvm.ir.GlobalVar)):
            total += 1

    relax.analysis.post_order_visit(mod["main"], visit)
    return total


def _fuse_kernels_runs(options: dict[str, Any]) -> bool:
    """Whether this build's pass selection (the options the pipeline was given) keeps fuse-kernels."""
    passes = options.get("passes")
    return "fuse-kernels" not in (options.get("skip_pass") or []) and (passes is None or "fuse-kernels" in passes)


class Fusion(GraphPass):
    """Groups conv2d/dense + bias + activation (relu, relu6, sigmoid, silu, hardswish, gelu erf/tanh), layer norm (primitive ops or residual add + layer_norm), attention blocks and the pool+dense head into one Relax function each (Primitive, Composite=pattern), which FuseTIR later turns into one kernel; turns the importer's Clip kernels back into R.clip first."""

    name = "fusion"

    def run(self, mod: Any, ctx: CompileContext) -> tuple[Any, dict[str, Any]]:
        from tvm import relax
        from tvm.relax.transform import FusionPattern

        specs, skipped = _selected_specs(list(ctx.options.get("skip_fusion", None) or []))
        inactive = not _fuse_kernels_runs(ctx.options)
        if inactive:  # without FuseTIR a group would stay a Relax subfunction, hiding its tensors from the planners
            specs, skipped = [], sorted(s.name for s in FUSION_SPECS)
        ops_before, kernels_before = _count_calls(mod), count_kernels(mod)
        mod, canonical = canonicalize_clips(mod)
        patterns = []
        for spec in specs:
            for variant in spec.variants():
                patterns.append(FusionPattern(spec.name, variant, {}, _no_leaks))
        if patterns:
            with ctx.target:
                mod = relax.transform.FuseOpsByPattern(patterns, bind_constants=False, annotate_codegen=False)(mod)
        mod, groups, calls = _finish_groups(mod)
        stats: dict[str, Any] = {
            "ops_before": ops_before,
            "ops_after": _count_calls(mod),  # a grouped function counts as one call
            "kernels_before": kernels_before,
            "kernels_after": count_kernels(mod),
            "patterns": {spec.name: calls[spec.name] for spec in specs if calls[spec.name]},  # matched ones
            "fused_calls": sum(calls.values()),
            "fused_functions": len(groups),
            "groups": {name: ops for name, (_, ops) in list(groups.items())[:MAX_GROUPS_IN_STATS]},
        }
        if len(groups) > MAX_GROUPS_IN_STATS:
            stats["groups_not_listed"] = len(groups) - MAX_GROUPS_IN_STATS
        if canonical:
            stats["clip_canonicalized"] = dict(sorted(canonical.items()))
        if skipped:
            stats["skipped"] = skipped
        if inactive:
            stats["inactive"] = "fuse-kernels does not run: no groups formed"
        return mod, stats
