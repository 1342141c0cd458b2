"""partition: place each part of the model on the SoC unit that runs it (accelerator or CPU)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

from .base import CompileContext, GraphPass

# The function attribute that names the unit a partitioned subgraph runs on.
UNIT_ATTR = "socc.unit"
_MAC_OPS = ("nn.conv2d", "matmul")


class Partition(GraphPass):
    """Outlines accelerator subgraphs from `main` into functions of their own, called from `main`.

    Rewrite: every dataflow binding whose op the accelerator takes (the profile's unit facts:
    op names, tensor dtypes, max rank) joins a group with the groups of its inputs, unless that
    would make a cycle (a path leaving the group and coming back); each group that does at least
    `min_macs` multiply-accumulates becomes a function `<unit>_subgraph_N` with attribute
    `socc.unit`, taking the tensors that cross into it and returning those that leave it. The
    rest stays in `main` for the CPU. The pipeline then builds each subgraph on its own (no
    fusion across a boundary) and links them into one program. Stats: the partition map (per
    subgraph its ops, MACs and crossing tensors) and the share of ops and MACs per unit.
    Targets without an accelerator unit are left unchanged.
    """

    name = "partition"

    def run(self, mod: Any, ctx: CompileContext) -> tuple[Any, dict[str, Any]]:
        from tvm import relax

        facts = dict(ctx.accelerator)
        if not facts:
            return mod, {"unit": None, "subgraphs": 0, "note": f"target {ctx.target_name} has no accelerator unit"}
        unit = str(facts.get("name", "apu"))
        main = mod["main"]
        blocks = main.body.blocks
        if len(blocks) != 1 or not isinstance(blocks[0], relax.DataflowBlock):
            return mod, {"unit": unit, "subgraphs": 0, "note": "main is not one dataflow block; everything stays on the CPU"}
        plan = _Planner(mod, facts, ctx.options.get("max_shape") or {})
        groups, placed = plan.groups(main)
        kept = [g for g in groups if sum(plan.macs[b.var] for b in g) >= int(facts.get("min_macs", 0))]
        new_mod, subgraphs = _outline(mod, kept, unit, plan.bounds)
        return new_mod, plan.summary(unit, kept, subgraphs, placed)


class _Planner:
    """Decides which bindings of main the accelerator takes and groups them."""

    def __init__(self, mod: Any, facts: Mapping[str, Any], bounds: Mapping[str, int]) -> None:
        self.mod = mod
        self.ops = set(facts.get("ops", ()))
        self.dtypes = set(facts.get("dtypes", ()))
        self.max_rank = int(facts.get("max_rank", 4))
        self.bounds = bounds
        # per binding, keyed by its var (wrapper objects of bindings are not stable)
        self.macs: dict[Any, int] = {}
        self.op_of: dict[Any, str] = {}
        self.reason: dict[Any, str] = {}

    def _dim(self, dim: Any) -> int:
        from tvm import tirx

        if isinstance(dim, tirx.IntImm):
            return int(dim.value)
        return int(self.bounds.get(str(dim), 1))

    def _shape(self, ty: Any) -> list[int] | None:
        shape = getattr(ty, "shape", None)
        values = getattr(shape, "values", None)
        return None if values is None else [self._dim(d) for d in values]

    def _count_macs(self, op: str, value: Any, out_ty: Any) -> int:
        import math

        out = self._shape(out_ty)
        if op not in _MAC_OPS or out is None:
            return 0
        if op == "nn.conv2d":
            weight = self._shape(value.args[1].ty)
            return math.prod(out) * (math.prod(weight[1:]) if weight else 0)
        lhs = self._shape(value.args[0].ty)
        return math.prod(out) * (lhs[-1] if lhs else 0)

    def _tensor_types(self, value: Any) -> list[Any]:
        from tvm import relax

        found = []
        for arg in value.args:
            items = arg.fields if isinstance(arg, relax.Tuple) else [arg]
            found += [item.ty for item in items if isinstance(getattr(item, "ty", None), relax.TensorType)]
        return found

    def eligible(self, binding: Any) -> bool:
        from tvm import relax

        key = binding.var
        op = _op_name(binding.value)
        self.op_of[key] = op or type(binding.value).__name__
        out_ty = binding.var.ty
        self.macs[key] = self._count_macs(op, binding.value, out_ty) if op else 0
        if op is None:
            self.reason[key] = "not an op call"
            return False
        if op not in self.ops:
            self.reason[key] = f"op {op} not on the unit"
            return False
        if not isinstance(out_ty, relax.TensorType):
            self.reason[key] = "result is not a tensor"
            return False
        for ty in [out_ty, *self._tensor_types(binding.value)]:
            if str(ty.dtype) not in self.dtypes:
                self.reason[key] = f"dtype {ty.dtype}"
                return False
            if ty.ndim < 0 or ty.ndim > self.max_rank:
                self.reason[key] = f"rank {ty.ndim}"
                return False
        return True

    def groups(self, func: Any) -> tuple[list[list[Any]], dict[Any, bool]]:
        """Groups of eligible bindings (each in binding order), and which bindings were eligible."""
        from tvm import relax

        group_of: dict[Any, int] = {}
        depends: dict[Any, frozenset[int]] = {}  # the groups a var depends on, its own included
        members: dict[int, list[Any]] = {}
        placed: dict[Any, bool] = {}
        for binding in func.body.blocks[0].bindings:
            used = [v for v in relax.analysis.free_vars(binding.value) if v in depends]
            upstream = frozenset().union(*(depends[v] for v in used))
            placed[binding.var] = ok = self.eligible(binding)
            if not ok:
                depends[binding.var] = upstream
                continue
            chosen = None
            for group in dict.fromkeys(group_of[v] for v in used if v in group_of):
                # joining `group` makes a cycle if an input outside it depends on it
                if all(group_of.get(v) == group or group not in depends[v] for v in used):
                    chosen = group
                    break
            if chosen is None:
                chosen = len(members)
                members[chosen] = []
            members[chosen].append(binding)
            group_of[binding.var] = chosen
            depends[binding.var] = upstream | {chosen}
        return list(members.values()), placed

    def summary(self, unit: str, kept: list[list[Any]], subgraphs: list[dict[str, Any]], placed: dict[Any, bool]) -> dict[str, Any]:
        on_unit = {b.var for group in kept for b in group}
        unit_ops: Counter[str] = Counter()
        cpu_ops: Counter[str] = Counter()
        cpu_reasons: dict[str, Counter[str]] = {}
        for key, op in self.op_of.items():
            if key in on_unit:
                unit_ops[op] += 1
            elif op is not None:
                cpu_ops[op] += 1
                reason = "in a group under min_macs" if placed.get(key) else self.reason.get(key, "")
                cpu_reasons.setdefault(op, Counter())[reason] += 1
        macs_unit = sum(self.macs[k] for k in on_unit)
        macs_total = sum(self.macs.values())
        ops_total = sum(unit_ops.values()) + sum(cpu_ops.values())
        return {
            "unit": unit,
            "subgraphs": len(subgraphs),
            "ops_total": ops_total,
            "ops_on_unit": sum(unit_ops.values()),
            "ops_on_cpu": sum(cpu_ops.values()),
            "op_share": round(sum(unit_ops.values()) / ops_total, 4) if ops_total else 0.0,
            "macs_total": macs_total,
            "macs_on_unit": macs_unit,
            "mac_share": round(macs_unit / macs_total, 4) if macs_total else 0.0,
            "cpu_ops": {op: dict(sorted(reasons.items())) for op, reasons in sorted(cpu_reasons.items())},
            "map": subgraphs,
        }


def _tensor_json(var: Any) -> dict[str, Any]:
    ty = var.ty
    shape = [int(d) if hasattr(d, "value") else str(d) for d in ty.shape.values] if getattr(ty, "shape", None) is not None else None
    return {"name": str(var.name), "shape": shape, "dtype": str(ty.dtype)}


def _substitute(expr: Any, mapping: Mapping[Any, Any]) -> Any:
    """`expr` with the vars and global vars in `mapping` replaced (others stay)."""
    from tvm import relax

    @relax.expr_functor.mutator
    class Replace(relax.PyExprMutator):
        def visit_var_(self, var: Any) -> Any:  # noqa: N802 - TVM's visitor names
            return mapping.get(var, var)

        def visit_dataflow_var_(self, var: Any) -> Any:  # noqa: N802
            return mapping.get(var, var)

        def visit_global_var_(self, gv: Any) -> Any:  # noqa: N802
            return mapping.get(gv, gv)

    return Replace().visit_expr(expr)


def _outline(mod: Any, groups: list[list[Any]], unit: str, bounds: Mapping[str, int]) -> tuple[Any, list[dict[str, Any]]]:
    """main with each group outlined into a function `<unit>_subgraph_N` and called in its place."""
    from tvm import relax

    if not groups:
        return mod, []
    main = mod["main"]
    bindings = list(main.body.blocks[0].bindings)
    position = {b.var: i for i, b in enumerate(bindings)}
    group_index = {b.var: g for g, group in enumerate(groups) for b in group}
    users: dict[Any, set[Any]] = {}  # var -> the groups (or None: main) that use it
    for b in bindings:
        for v in relax.analysis.free_vars(b.value):
            users.setdefault(v, set()).add(group_index.get(b.var))
    for v in relax.analysis.free_vars(main.body.body):
        users.setdefault(v, set()).add(None)

    functions, calls, subgraphs = [], [], []
    for g, group in enumerate(groups):
        members = {b.var for b in group}
        inputs = list(dict.fromkeys(v for b in group for v in relax.analysis.free_vars(b.value) if v not in members))
        outputs = [b.var for b in group if users.get(b.var, set()) - {g}]
        params = [relax.Var(str(v.name), v.ty) for v in inputs]
        mapping: dict[Any, Any] = dict(zip(inputs, params))
        body = []
        for b in group:
            var = relax.DataflowVar(str(b.var.name), b.var.ty)
            body.append(relax.VarBinding(var, _substitute(b.value, mapping)))
            mapping[b.var] = var
        results = [mapping[v] for v in outputs]
        out_vars = [relax.Var(str(v.name), v.ty) for v in results]
        body += [relax.VarBinding(o, r) for o, r in zip(out_vars, results)]
        ret = out_vars[0] if len(out_vars) == 1 else relax.Tuple(out_vars)
        name = f"{unit}_subgraph_{g}"
        func = relax.Function(params, relax.SeqExpr([relax.DataflowBlock(body)], ret), ret.ty)
        func = func.with_attr({"global_symbol": name, UNIT_ATTR: unit})
        functions.append((name, func))
        calls.append((inputs, outputs))
        ops = Counter(_op_name(b.value) for b in group)
        subgraphs.append({
            "name": name,
            "unit": unit,
            "ops": dict(sorted(ops.items())),
            "op_count": len(group),
            "inputs": [_tensor_json(v) for v in inputs],
            "outputs": [_tensor_json(v) for v in outputs],
            "crossing_bytes": sum(_bytes(v.ty, bounds) for v in [*inputs, *outputs]),
        })

    builder = relax.BlockBuilder(mod)
    gvars = [builder.add_func(func, name) for name, func in functions]  # add_func gives each its type
    builder.update_func(mod.get_global_var("main"), _rewrite_main(main, bindings, groups, group_index, position, calls, gvars))
    return relax.transform.Normalize()(builder.get()), subgraphs


def _rewrite_main(main: Any, bindings: list[Any], groups: list[list[Any]], group_index: dict[Any, int],
                  position: dict[Any, int], calls: list[tuple[list[Any], list[Any]]],
                  gvars: list[Any]) -> Any:
    """main's bindings in a dependency order, each group replaced by one call of its function."""
    import heapq

    from tvm import relax

    # units: ("b", index) for a binding left in main, ("g", g) for a group; ordered by first position
    first = {g: min(position[b.var] for b in group) for g, group in enumerate(groups)}
    nodes = [("b", i) for i, b in enumerate(bindings) if b.var not in group_index] + [("g", g) for g in range(len(groups))]
    order_key = {n: (n[1] if n[0] == "b" else first[n[1]]) for n in nodes}
    node_of_var = {b.var: (("g", group_index[b.var]) if b.var in group_index else ("b", i)) for i, b in enumerate(bindings)}

    def inputs_of(node: tuple[str, int]) -> set[tuple[str, int]]:
        used = relax.analysis.free_vars(bindings[node[1]].value) if node[0] == "b" else calls[node[1]][0]
        return {node_of_var[v] for v in used if v in node_of_var} - {node}

    deps = {n: inputs_of(n) for n in nodes}
    waiting = {n: len(d) for n, d in deps.items()}
    dependents: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for n, d in deps.items():
        for m in d:
            dependents.setdefault(m, []).append(n)
    ready = [(order_key[n], n) for n in nodes if waiting[n] == 0]
    heapq.heapify(ready)
    mapping: dict[Any, Any] = {}
    emitted: list[Any] = []
    while ready:
        _, node = heapq.heappop(ready)
        if node[0] == "b":
            b = bindings[node[1]]
            var = type(b.var)(str(b.var.name), b.var.ty)
            emitted.append(relax.VarBinding(var, _substitute(b.value, mapping)))
            mapping[b.var] = var
        else:
            inputs, outputs = calls[node[1]]
            call = relax.Call(gvars[node[1]], [mapping.get(v, v) for v in inputs])
            if len(outputs) == 1:
                var = relax.DataflowVar(str(outputs[0].name), outputs[0].ty)
                emitted.append(relax.VarBinding(var, call))
                mapping[outputs[0]] = var
            else:
                result = relax.DataflowVar(f"{gvars[node[1]].name_hint}_out", relax.TupleType([v.ty for v in outputs]))
                emitted.append(relax.VarBinding(result, call))
                for i, v in enumerate(outputs):
                    var = relax.DataflowVar(str(v.name), v.ty)
                    emitted.append(relax.VarBinding(var, relax.TupleGetItem(result, i)))
                    mapping[v] = var
        for m in dependents.get(node, ()):
            waiting[m] -= 1
            if waiting[m] == 0:
                heapq.heappush(ready, (order_key[m], m))
    # vars that leave the dataflow block (main's results) become plain Vars, bound once more
    escaping = [v for v in relax.analysis.free_vars(main.body.body) if isinstance(mapping.get(v), relax.DataflowVar)]
    for v in escaping:
        out = relax.Var(str(v.name), v.ty)
        emitted.append(relax.VarBinding(out, mapping[v]))
        mapping[v] = out
    body = relax.SeqExpr([relax.DataflowBlock(emitted)], _substitute(main.body.body, mapping))
    return relax.Function(main.params, body, main.ret_ty, main.is_pure, main.attrs)


def _op_name(value: Any) -> str | None:
    """The op a binding's value calls ("nn.conv2d"; an importer-made call_tir kernel by its name,
    e.g. Clip's "maximum1" -> "maximum"); None for anything but an op call."""
    import tvm
    from tvm import relax

    if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
        return None
    name = value.op.name.removeprefix("relax.")
    return re.sub(r"\d+$", "", value.args[0].name_hint) if name == "call_tir" else name


def _bytes(ty: Any, bounds: Mapping[str, int]) -> int:
    from .memory_plan import tensor_bytes

    shape = getattr(getattr(ty, "shape", None), "values", None)
    return tensor_bytes(shape, str(ty.dtype), bounds)[0] or 0


def split_parts(mod: Any) -> dict[str, Any]:
    """The partitioned module as separate modules, each with its own `main`, built on their own.

    The "main" part keeps the calls; there each subgraph function is a stub of the same signature
    (zeros), so the CPU passes type-check the calls without building the subgraph twice."""
    import tvm
    from tvm import relax

    subgraphs = {gv.name_hint: func for gv, func in mod.functions_items()
                 if isinstance(func, relax.Function) and func.attrs is not None and UNIT_ATTR in func.attrs}
    if not subgraphs:
        return {"main": mod}
    kernels = {gv: f for gv, f in mod.functions_items() if not isinstance(f, relax.Function)}
    parts = {}
    main_mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs, global_infos=mod.global_infos)
    for name, func in subgraphs.items():
        part = tvm.IRModule({"main": func.with_attr("global_symbol", "main")}, attrs=mod.attrs, global_infos=mod.global_infos)
        for gv, kernel in kernels.items():  # the kernels the importer made (call_tir) stay reachable
            part[gv] = kernel
        parts[name] = relax.transform.DeadCodeElimination(["main"])(part)
        main_mod[main_mod.get_global_var(name)] = _stub(func)
    return {"main": main_mod, **parts}


def _stub(func: Any) -> Any:
    from tvm import relax

    ret = func.ret_ty
    fields = ret.fields if isinstance(ret, relax.TupleType) else [ret]
    zeros = [relax.op.zeros(relax.ShapeExpr(ty.shape.values), ty.dtype) for ty in fields]
    body = zeros[0] if len(zeros) == 1 else relax.Tuple(zeros)
    return relax.Function(func.params, body, ret, func.is_pure, func.attrs)


def merge_parts(parts: Mapping[str, Any]) -> Any:
    """One module from the separately built parts: each subgraph's lowered `main` replaces its stub,
    its kernels renamed `<subgraph>__<kernel>` so names stay unique; the stubs' kernels are dropped."""
    import tvm
    from tvm import relax, tirx

    import tvm_ffi

    main_mod = parts["main"]
    if len(parts) == 1:
        return main_mod
    kept = {gv: f for gv, f in main_mod.functions_items() if gv.name_hint == "main" or gv.name_hint not in parts}
    builder = relax.BlockBuilder(tvm.IRModule(kept, attrs=main_mod.attrs, global_infos=main_mod.global_infos))
    # kernels equal across parts (the same layer shape in several subgraphs) are compiled once
    shared: dict[int, list[tuple[Any, Any]]] = {}
    for gv, func in kept.items():
        if isinstance(func, tirx.PrimFunc):
            shared.setdefault(_kernel_hash(func), []).append((func, gv))

    def add_kernel(func: Any, name: str) -> Any:
        key = _kernel_hash(func)
        for known, gv in shared.get(key, []):
            if tvm_ffi.structural_equal(known.without_attr("global_symbol"), func.without_attr("global_symbol")):
                return gv
        gv = builder.add_func(func.with_attr("global_symbol", name), name)
        shared.setdefault(key, []).append((func, gv))
        return gv

    for name, part in parts.items():
        if name == "main":
            continue
        rename = {gv: add_kernel(f, f"{name}__{gv.name_hint}") for gv, f in part.functions_items() if isinstance(f, tirx.PrimFunc)}
        func = _substitute(part["main"], rename).with_attr("global_symbol", name)
        builder.add_func(func, name)
    merged = builder.get()
    main = merged["main"]
    calls = {main_mod.get_global_var(name): merged.get_global_var(name) for name in parts if name != "main"}
    merged.update_func(merged.get_global_var("main"), _substitute(main, calls))
    return relax.transform.DeadCodeElimination(["main"])(merged)


def _kernel_hash(func: Any) -> int:
    import tvm_ffi

    return int(tvm_ffi.structural_hash(func.without_attr("global_symbol")))


