"""memory-plan: socc's arena planner. Every intermediate tensor of `main` gets a byte offset in one arena.

How it works, on the module `lower-calls` leaves (every kernel writes into an explicit
`R.builtin.alloc_tensor`), or on the one `static-plan` leaves (its storage tokens are first turned
back into plain allocations, so the two passes compose in either order):

1. Lifetimes (`lifetimes.analyze`): first definition to last use in binding order, following
   aliases. Tensors that are (part of) the return value are not planned, nor tensors whose size
   is unknown: a symbolic size is planned at its upper bound when the user bounds every symbolic
   dim in it (`options["max_shape"]`, e.g. {"seq": 512}), else the tensor is left to TVM's
   default allocation (StaticPlanBlockMemory runs on what is left).
2. Placement: several greedy orders (by size, by breadth, by lifetime length, by size x lifetime)
   each with first-fit (lowest offset) and best-fit (smallest hole) placement, then a seeded local
   search over the placement order of the best one; the smallest arena wins. Offsets are 64-byte
   aligned.
3. Rewrite: one `R.memory.alloc_storage(arena_bytes)` at the top of `main`, and each planned
   tensor becomes `R.memory.alloc_tensor(arena, offset, shape, dtype)`. TVM's CPU runtime records
   a storage offset as the tensor's `byte_offset`, and TVM's generated kernels refuse a non-zero
   `byte_offset`; so a tensor at a non-zero offset is passed through `R.memory.ensure_zero_offset`,
   which on CPU (64-byte aligned offsets) makes a zero-copy view with the data pointer moved
   (on Hexagon the runtime moves the pointer itself). Other devices would copy there, which
   would break destination passing: the pass only plans for llvm/c/hexagon targets.

KillAfterLastUse (in lower-vm) drops the arena variable after its last `alloc_tensor`; the memory
stays alive while any tensor made from it is (each holds a reference to the storage).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import CompileContext, GraphPass
from .lifetimes import Alloc, Liveness, analyze, const_int, const_str, dtype_bytes, op_name
from .stats import storage_allocations

ALIGN = 64
ARENA_NAME = "socc_arena"
SIZES_ATTR = "socc.arena_sizes"  # on main: planned bytes of each arena tensor, in binding order (for reports)
CHECK_FUNC = "socc_check_max_shape"  # fails at run time when a dim exceeds the bound it was planned with
RAW_SUFFIX = "_raw"  # the arena tensor before ensure_zero_offset (same tensor, non-zero byte_offset)
PLANNABLE_TARGET_KINDS = ("llvm", "c", "hexagon")
SEARCH_SEED = 0
SEARCH_MAX_ITERS = 400
SEARCH_WORK = 3_000_000  # placement steps the local search may spend (keeps big models fast)


class MemoryBudgetExceeded(ValueError):
    """Weights plus the activation arena do not fit in the memory budget."""


# ------------------------------------------------------------------------------------ sizes


def _align(value: int, align: int = ALIGN) -> int:
    return (value + align - 1) // align * align


def _tir_vars(expr: Any) -> list[Any]:
    from tvm import tirx

    return list(tirx.analysis.undefined_vars(expr))


def tensor_bytes(shape: Sequence[Any] | None, dtype: str, bounds: Mapping[str, int]) -> tuple[int | None, dict[str, int]]:
    """Bytes of a tensor, at the upper bound of its symbolic dims; None when a dim is unbounded.

    Returns (bytes, the bounds it used).
    """
    import tvm
    from tvm.sym import Analyzer, ConstIntBound

    if shape is None:
        return None, {}
    analyzer = None
    used: dict[str, int] = {}
    elements = 1
    for dim in shape:
        if isinstance(dim, tvm.tirx.IntImm):
            elements *= int(dim.value)
            continue
        if analyzer is None:
            analyzer = Analyzer()
        for var in _tir_vars(dim):
            name = str(var.name)
            if name not in bounds:
                return None, {}
            used[name] = int(bounds[name])
            analyzer.update(var, ConstIntBound(0, int(bounds[name])), override=True)
        upper = analyzer.const_int_bound(dim).max_value
        if upper >= ConstIntBound.POS_INF or upper < 0:
            return None, {}
        elements *= int(upper)
    return elements * dtype_bytes(dtype), used


# -------------------------------------------------------------------------------- placement


class Problem:
    """Sizes and inclusive [first, last] lifetimes of the tensors to place, with their conflicts."""

    def __init__(self, sizes: Sequence[int], first: Sequence[int], last: Sequence[int]) -> None:
        self.sizes, self.first, self.last = list(sizes), list(first), list(last)
        n = len(self.sizes)
        self.neighbors: list[list[int]] = [[] for _ in range(n)]
        by_first = sorted(range(n), key=lambda i: (self.first[i], i))
        active: list[int] = []
        for i in by_first:
            active = [j for j in active if self.last[j] >= self.first[i]]
            for j in active:
                self.neighbors[i].append(j)
                self.neighbors[j].append(i)
            active.append(i)
        self.work = n + sum(len(nb) for nb in self.neighbors)

    def __len__(self) -> int:
        return len(self.sizes)

    def live_sets(self) -> dict[int, list[int]]:
        live: dict[int, list[int]] = {}
        for i in range(len(self)):
            for p in range(self.first[i], self.last[i] + 1):
                live.setdefault(p, []).append(i)
        return live

    def lower_bound(self) -> int:
        """Max over program points of the bytes alive there: no placement can use less."""
        return max((sum(self.sizes[i] for i in ids) for ids in self.live_sets().values()), default=0)

    def aligned_floor(self) -> int:
        """A lower bound that accounts for 64-byte aligned offsets (every tensor but the top one is padded)."""
        best = 0
        for ids in self.live_sets().values():
            padded = sum(_align(self.sizes[i]) for i in ids)
            best = max(best, padded - max(_align(self.sizes[i]) - self.sizes[i] for i in ids))
        return best

    def place(self, order: Sequence[int], policy: str) -> tuple[list[int], int]:
        """Offsets for tensors placed in `order`; policy "first-fit" (lowest offset) or "best-fit" (smallest hole)."""
        sizes, nbrs = self.sizes, self.neighbors
        offsets: list[int | None] = [None] * len(sizes)
        top = 0
        for i in order:
            size = sizes[i]
            taken = sorted((offsets[j], offsets[j] + sizes[j]) for j in nbrs[i] if offsets[j] is not None)  # type: ignore[operator]
            cursor, chosen, hole = 0, None, None
            for start, end in taken:
                if start - cursor >= size:
                    if policy == "first-fit":
                        chosen = cursor
                        break
                    if hole is None or start - cursor < hole:
                        chosen, hole = cursor, start - cursor
                cursor = max(cursor, _align(end))
            offset = cursor if chosen is None else chosen
            offsets[i] = offset
            top = max(top, offset + size)
        return offsets, top  # type: ignore[return-value]

    def orders(self) -> dict[str, list[int]]:
        n = range(len(self))
        s, f, last = self.sizes, self.first, self.last
        orders = {
            "size": sorted(n, key=lambda i: (-s[i], f[i], i)),
            "lifetime": sorted(n, key=lambda i: (-(last[i] - f[i]), -s[i], i)),
            "area": sorted(n, key=lambda i: (-s[i] * (last[i] - f[i] + 1), i)),
        }
        live = self.live_sets()
        breadth: list[int] = []
        seen: set[int] = set()
        for point in sorted(live, key=lambda p: (-sum(s[i] for i in live[p]), p)):
            for i in sorted(live[point], key=lambda i: (-s[i], f[i], i)):
                if i not in seen:
                    seen.add(i)
                    breadth.append(i)
        orders["breadth"] = breadth
        return orders


def solve(problem: Problem) -> tuple[list[int], int, str, dict[str, int]]:
    """The best placement found: (offsets, arena bytes, winning heuristic, arena of each heuristic)."""
    if not len(problem):
        return [], 0, "none", {}
    results: dict[str, tuple[list[int], int, list[int], str]] = {}
    for order_name, order in problem.orders().items():
        for policy in ("first-fit", "best-fit"):
            offsets, arena = problem.place(order, policy)
            results[f"greedy-by-{order_name}/{policy}"] = (offsets, arena, order, policy)
    # first the brief's baseline (greedy by size, lowest offset), then the others: ties keep the earlier
    name = min(results, key=lambda k: results[k][1])
    offsets, arena, order, policy = results[name]
    heuristics = {k: v[1] for k, v in results.items()}

    floor = problem.aligned_floor()
    iters = min(SEARCH_MAX_ITERS, SEARCH_WORK // max(problem.work, 1))
    rng = random.Random(SEARCH_SEED)
    improved = False
    order = list(order)
    for _ in range(iters if len(order) > 1 else 0):
        if arena <= floor:
            break
        candidate = list(order)
        a, b = rng.randrange(len(candidate)), rng.randrange(len(candidate))
        if rng.random() < 0.5:
            candidate[a], candidate[b] = candidate[b], candidate[a]
        else:
            candidate.insert(b, candidate.pop(a))
        cand_offsets, cand_arena = problem.place(candidate, policy)
        if cand_arena <= arena:
            improved |= cand_arena < arena
            order, offsets, arena = candidate, cand_offsets, cand_arena
    if improved:
        name += "+search"
        heuristics[name] = arena
    return offsets, arena, name, heuristics


# ---------------------------------------------------------------------------------- rewrite


def _main_var(mod: Any) -> Any | None:
    for gv in mod.get_global_vars():
        if gv.name_hint == "main":
            return gv
    return None


def _with_main(mod: Any, func: Any) -> Any:
    from tvm import relax

    out = mod.clone()
    out.update_func(_main_var(out), func)
    return relax.transform.Normalize()(out)


def _rebuild(func: Any, blocks: list[list[Any]]) -> Any:
    from tvm import relax

    new_blocks = [type(old)(bindings) for old, bindings in zip(func.body.blocks, blocks)]
    body = relax.SeqExpr(new_blocks, func.body.body)
    return relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)


def _unplan(func: Any) -> tuple[Any, int]:
    """Turns storage tokens of an earlier planner (all tensors at offset 0, used for nothing else)
    back into plain `R.builtin.alloc_tensor`s. Returns (function, tokens undone)."""
    from tvm import relax

    storages: dict[Any, Any] = {}  # storage var -> its alloc_storage call
    for block in func.body.blocks:
        for b in block.bindings:
            if op_name(b.value) == "relax.memory.alloc_storage":
                storages[b.var] = b.value
    if not storages:
        return func, 0
    undo = {var for var, call in storages.items() if const_str(call.args[2]) is not None}
    for block in func.body.blocks:
        for b in block.bindings:
            if b.var in storages:
                continue
            if op_name(b.value) == "relax.memory.alloc_tensor" and b.value.args[0] in storages:
                if const_int(b.value.args[1]) != 0:
                    undo.discard(b.value.args[0])
                continue
            for var in relax.analysis.free_vars(b.value):
                undo.discard(var)
    for var in relax.analysis.free_vars(func.body.body):
        undo.discard(var)
    if not undo:
        return func, 0
    blocks = []
    for block in func.body.blocks:
        bindings = []
        for b in block.bindings:
            if b.var in undo:
                continue
            if op_name(b.value) == "relax.memory.alloc_tensor" and b.value.args[0] in undo:
                scope = const_str(storages[b.value.args[0]].args[2])
                call = relax.op.builtin.alloc_tensor(b.value.args[2], b.value.args[3], b.value.args[4], scope)
                bindings.append(relax.VarBinding(b.var, call))
                continue
            bindings.append(b)
        blocks.append(bindings)
    return _rebuild(func, blocks), len(undo)


def _bound_check(sig_vars: Mapping[str, Any], bounds: Mapping[str, int]) -> Any:
    """A TIR function that fails (ValueError) when a symbolic dim exceeds the bound it was planned
    with: past the bound, a tensor would spill over its neighbours in the arena."""
    import tvm
    from tvm import tirx

    params, checks = [], []
    for name, bound in sorted(bounds.items()):
        var = tirx.Var(name, str(getattr(sig_vars[name].ty, "dtype", "int64")))
        params.append(var)
        cond = var <= tirx.IntImm(str(var.ty.dtype), int(bound))
        kind = tvm.ir.expr.StringImm("ValueError")
        parts = [tvm.ir.expr.StringImm(f"socc: dim {name} exceeds {bound}, the upper bound memory-plan used (max_shape); rebuild with a larger bound")]
        try:
            checks.append(tirx.AssertStmt(kind, cond, parts))
        except TypeError:  # 0.27's Python wrapper passes its arguments in another order than the C++ constructor
            checks.append(tirx._ffi_api.AssertStmt(cond, kind, parts, None))
    body = checks[0] if len(checks) == 1 else tirx.SeqStmt(checks)
    return tirx.PrimFunc(params, body)


def _rewrite(func: Any, placed: dict[int, int], arena_bytes: int, check: tuple[Any, list[Any]] | None = None) -> Any:
    """`main` with the planned allocations (binding index -> offset) carved out of one arena;
    `check` = (bound check function, its symbolic dim arguments) is called first."""
    from tvm import relax

    arena = relax.Var(ARENA_NAME, relax.ObjectType())
    storage = relax.op.memory.alloc_storage(relax.ShapeExpr([arena_bytes]), 0, "global", "uint8")
    head = [relax.VarBinding(arena, storage)]
    if check is not None:
        head.insert(0, relax.VarBinding(relax.Var("_", None), relax.Call(check[0], check[1])))
    blocks: list[list[Any]] = []
    index = 0
    for block_index, block in enumerate(func.body.blocks):
        bindings: list[Any] = list(head) if block_index == 0 else []
        for b in block.bindings:
            if index in placed:
                shape, dtype, device = b.value.args[0], b.value.args[1], b.value.args[2]
                offset = placed[index]
                call = relax.op.memory.alloc_tensor(arena, offset, shape, dtype, device)
                if offset:
                    raw = relax.Var(f"{b.var.name}{RAW_SUFFIX}", b.var.ty)
                    bindings.append(relax.VarBinding(raw, call))
                    bindings.append(relax.VarBinding(b.var, relax.op.memory.ensure_zero_offset(raw)))
                else:
                    bindings.append(relax.VarBinding(b.var, call))
            else:
                bindings.append(b)
            index += 1
        blocks.append(bindings)
    return _rebuild(func, blocks)


def tvm_default_plan(mod: Any, bounds: Mapping[str, int]) -> tuple[int, int]:
    """What StaticPlanBlockMemory alone allocates for `mod` (given the same bounds):
    (bytes of its static storages, number of storages whose size stays symbolic)."""
    from tvm import relax

    func = mod["main"]
    if bounds:
        func = func.with_attr("tir_var_upper_bound", {str(k): int(v) for k, v in bounds.items()})
    planned = relax.transform.StaticPlanBlockMemory()(_with_main(mod, func))
    sizes = storage_allocations(planned)
    return sum(s for s in sizes if s is not None), sum(1 for s in sizes if s is None)


def _plannable(alloc: Alloc) -> bool:
    call = alloc.call
    if alloc.kind != "builtin" or alloc.escapes:
        return False
    if const_int(call.args[2]) != 0:  # another runtime device than the arena's
        return False
    return len(call.args) < 4 or const_str(call.args[3]) == "global"


def signature_dims(func: Any) -> dict[str, Any]:
    """Symbolic dims defined by `func`'s parameters, by name (the only ones a bound can be checked for on entry)."""
    from tvm import relax

    dims: dict[str, Any] = {}
    for param in func.params:
        for var in relax.analysis.definable_tir_vars_in_type(param.ty):
            dims.setdefault(str(var.name), var)
    return dims


class MemoryPlan(GraphPass):
    """Places every intermediate tensor of `main` with a known or bounded size at a 64-byte aligned offset of one arena (best of several packing heuristics), rewriting its allocations to `R.memory.alloc_tensor` on a single `R.memory.alloc_storage`; what it cannot size is left to TVM's planner."""

    name = "memory-plan"

    def run(self, mod: Any, ctx: CompileContext) -> tuple[Any, dict[str, Any]]:
        from tvm import relax

        kind = str(ctx.target.kind.name) if ctx.target is not None else "llvm"
        if _main_var(mod) is None:
            return mod, {"skipped": "no main function"}
        if kind not in PLANNABLE_TARGET_KINDS:
            return mod, {"skipped": f"target kind {kind} cannot address arena offsets"}
        if any(isinstance(block, relax.DataflowBlock) for block in mod["main"].body.blocks):
            return mod, {"skipped": "main still has dataflow blocks (run after lower-calls)"}

        raw_func, undone = _unplan(mod["main"])
        raw_mod = _with_main(mod, raw_func) if undone else mod
        raw_func = raw_mod["main"]
        dims = signature_dims(raw_func)
        asked = {str(k): int(v) for k, v in dict(ctx.options.get("max_shape") or {}).items()}
        bounds = {k: v for k, v in asked.items() if k in dims}
        tvm_bytes, tvm_dynamic = tvm_default_plan(raw_mod, bounds)

        live = analyze(raw_func)
        chosen: list[Alloc] = []
        sizes: list[int] = []
        used_bounds: dict[str, int] = {}
        unplanned_dynamic = outputs = other = 0
        for alloc in live.allocs:
            if alloc.kind == "builtin" and alloc.escapes:
                outputs += 1
                continue
            if not _plannable(alloc):
                other += 1
                continue
            size, used = tensor_bytes(alloc.shape, alloc.dtype, bounds)
            if size is None:
                unplanned_dynamic += 1
                continue
            used_bounds.update(used)
            chosen.append(alloc)
            sizes.append(size)

        problem = Problem(sizes, [a.first for a in chosen], [a.last for a in chosen])
        offsets, arena, heuristic, heuristics = solve(problem)
        result = raw_mod
        if chosen:
            check = None
            if used_bounds:
                builder = relax.BlockBuilder(raw_mod.clone())
                gv = builder.add_func(_bound_check(dims, used_bounds), CHECK_FUNC)
                raw_mod = builder.get()
                check = (gv, [dims[name] for name in sorted(used_bounds)])
                raw_func = raw_func.with_attr("tir_var_upper_bound", dict(sorted(used_bounds.items())))
            placed = {a.index: o for a, o in zip(chosen, offsets)}
            by_index = sorted(zip((a.index for a in chosen), sizes))
            raw_func = raw_func.with_attr(SIZES_ATTR, [size for _, size in by_index])
            result = _with_main(raw_mod, _rewrite(raw_func, placed, arena, check))
        if unplanned_dynamic or other:
            # what we could not size goes to TVM's default planning, as without this pass
            result = relax.transform.StaticPlanBlockMemory()(result)
        stats: dict[str, Any] = {
            "arena_bytes": arena,
            "lower_bound_bytes": problem.lower_bound(),
            "tvm_default_bytes": tvm_bytes,
            "tensors": len(chosen),
            "heuristic": heuristic,
            "heuristics": heuristics,
            "unplanned_dynamic": unplanned_dynamic,
            "outputs_unplanned": outputs,
        }
        if other:
            stats["unplanned_other"] = other
        if tvm_dynamic:
            stats["tvm_default_dynamic_storages"] = tvm_dynamic
        if used_bounds:
            stats["bounded_dims"] = dict(sorted(used_bounds.items()))
        if set(asked) - set(dims):
            stats["max_shape_unknown_dims"] = sorted(set(asked) - set(dims))
        if undone:
            stats["replanned_storages"] = undone
        return result, stats


# ---------------------------------------------------------------------------------- reports


def _find_arena(live: Liveness) -> Any | None:
    storages = [b for b in live.bindings if op_name(b.value) in ("relax.memory.alloc_storage", "relax.vm.alloc_storage")]
    for b in storages:
        if str(b.var.name) == ARENA_NAME:
            return b
    return None


def memory_timeline(mod: Any) -> dict[str, Any]:
    """Data for a report or plot, read from a module after memory-plan (before or after lower-vm).

    `live_bytes[p]`: bytes of arena tensors alive at program point p (top-level bindings of `main`
    in order, then the return). `tensors`: each arena tensor's name, shape, dtype, size (at the
    planned upper bound for symbolic dims), offset, first and last point. Without an arena,
    `tensors` is empty and `arena_bytes` 0.
    """
    from tvm import relax

    func = mod["main"]
    live = analyze(func)
    attrs = func.attrs if func.attrs is not None else {}
    bounds = {str(k): int(v) for k, v in dict(attrs["tir_var_upper_bound"]).items()} if "tir_var_upper_bound" in attrs else {}
    recorded = [int(v) for v in attrs[SIZES_ATTR]] if SIZES_ATTR in attrs else []
    arena_binding = _find_arena(live)
    tensors: list[dict[str, Any]] = []
    arena_bytes = 0
    if arena_binding is not None:
        size_arg = arena_binding.value.args[0]
        arena_bytes = int(size_arg.values[0]) if isinstance(size_arg, relax.ShapeExpr) else 0
        on_arena = [a for a in live.allocs if a.storage is not None and a.storage.same_as(arena_binding.var)]
        if len(recorded) != len(on_arena):
            recorded = []
        for position, alloc in enumerate(on_arena):
            name = alloc.name[: -len(RAW_SUFFIX)] if alloc.name.endswith(RAW_SUFFIX) else alloc.name
            # after lower-vm a symbolic shape lives in a variable: the size memory-plan recorded counts
            size = recorded[position] if recorded else tensor_bytes(alloc.shape, alloc.dtype, bounds)[0]
            tensors.append({
                "name": name,
                "shape": [int(d) if const_int(d) is not None else str(d) for d in alloc.shape] if alloc.shape is not None else None,
                "dtype": alloc.dtype,
                "size": size if size is not None else 0,
                "offset": alloc.offset,
                "first": alloc.first,
                "last": alloc.last,
            })
    live_bytes = [0] * live.points
    for t in tensors:
        for p in range(t["first"], t["last"] + 1):
            live_bytes[p] += t["size"]
    peak_point = max(range(live.points), key=lambda p: (live_bytes[p], -p)) if live.points else 0
    # name the peak after the kernel that runs there (the next kernel call from that point)
    label = next((live.labels[p] for p in range(peak_point, live.points) if live.kernels[p]), live.labels[peak_point] if live.labels else "")
    return {
        "points": live.points,
        "live_bytes": live_bytes,
        "labels": live.labels,
        "arena_bytes": arena_bytes,
        "tensors": tensors,
        "peak": {"point": peak_point, "bytes": live_bytes[peak_point] if live_bytes else 0, "label": label},
    }


def largest_tensors(timeline: Mapping[str, Any], count: int = 3) -> list[tuple[str, int]]:
    """(name, bytes) of the largest arena tensors, largest first (for `check_budget`)."""
    ranked = sorted(timeline.get("tensors", []), key=lambda t: (-t["size"], t["name"]))
    return [(t["name"], int(t["size"])) for t in ranked[:count]]


def _human(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def report_markdown(stats: Mapping[str, Any], timeline: Mapping[str, Any]) -> str:
    """A short markdown section: arena vs lower bound vs TVM's planner, and the largest tensors."""
    if "arena_bytes" not in stats:
        return f"## Activation memory\n\nmemory-plan did not run: {stats.get('skipped', 'no stats')}.\n"
    arena, bound, tvm_bytes = stats["arena_bytes"], stats["lower_bound_bytes"], stats["tvm_default_bytes"]
    lines = ["## Activation memory", ""]
    if stats.get("tensors"):
        def versus(value: int) -> str:
            return f"{(value / bound - 1) * 100:+.1f}%" if bound else "-"

        lines += [
            "| plan | bytes | | vs lower bound |",
            "|---|---:|---:|---:|",
            f"| socc arena (memory-plan) | {arena:,} | {_human(arena)} | {versus(arena)} |",
            f"| lower bound (peak of live bytes) | {bound:,} | {_human(bound)} | |",
            f"| TVM StaticPlanBlockMemory | {tvm_bytes:,} | {_human(tvm_bytes)} | {versus(tvm_bytes)} |",
            "",
            f"{stats['tensors']} intermediate tensors share one arena (heuristic `{stats.get('heuristic', '-')}`).",
        ]
        if stats.get("bounded_dims"):
            dims = ", ".join(f"{k} <= {v}" for k, v in stats["bounded_dims"].items())
            lines.append(f"Symbolic dims are planned at their upper bounds ({dims}); a larger value fails at run time.")
        peak = timeline.get("peak") or {}
        if peak.get("bytes"):
            lines.append(f"Peak: {_human(peak['bytes'])} live at program point {peak['point']} (`{peak.get('label', '')}`).")
    else:
        lines.append("No intermediate tensor was planned in an arena.")
    if stats.get("unplanned_dynamic"):
        lines.append(f"{stats['unplanned_dynamic']} tensor(s) of unbounded symbolic size are left to TVM's allocator "
                     "(give `max_shape` bounds to plan them).")
    if stats.get("tvm_default_dynamic_storages"):
        lines.append(f"TVM's planner keeps {stats['tvm_default_dynamic_storages']} storage(s) of symbolic size, not counted above.")
    ranked = sorted(timeline.get("tensors", []), key=lambda t: (-t["size"], t["name"]))[:5]
    if ranked:
        lines += ["", "| largest tensors | shape | dtype | bytes | offset | live (points) |", "|---|---|---|---:|---:|---|"]
        for t in ranked:
            shape = "x".join(str(d) for d in t["shape"]) if t["shape"] is not None else "?"
            lines.append(f"| `{t['name']}` | {shape} | {t['dtype']} | {t['size']:,} | {t['offset']:,} | {t['first']}-{t['last']} |")
    return "\n".join(lines) + "\n"


def plot_memory(timeline: Mapping[str, Any], stats: Mapping[str, Any], path: str | Path) -> None:
    """memory.png: live arena bytes over the program, with lines for the arena, the lower bound and TVM's plan."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    live = list(timeline.get("live_bytes", []))
    top = max([*live, stats.get("arena_bytes", 0), stats.get("tvm_default_bytes", 0)], default=0)
    scale, unit = (1024 * 1024, "MiB") if top >= 1024 * 1024 else (1024, "KiB") if top >= 1024 else (1, "bytes")
    fig = Figure(figsize=(9, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.step(range(len(live)), [v / scale for v in live], where="post", color="tab:blue", label="live tensors")
    ax.fill_between(range(len(live)), [v / scale for v in live], step="post", alpha=0.25, color="tab:blue")
    for key, label, color, style in (
        ("arena_bytes", "socc arena", "tab:red", "-"),
        ("lower_bound_bytes", "lower bound", "tab:green", "--"),
        ("tvm_default_bytes", "TVM StaticPlanBlockMemory", "tab:gray", ":"),
    ):
        if stats.get(key):
            ax.axhline(stats[key] / scale, color=color, linestyle=style, label=f"{label} ({_human(stats[key])})")
    ax.set_xlabel("program point (binding in main)")
    ax.set_ylabel(f"activation memory ({unit})")
    ax.set_title("Activation memory over the program")
    ax.set_xlim(0, max(len(live) - 1, 1))
    ax.set_ylim(0, max(top, 1) / scale * 1.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), metadata={"Software": None})  # no version stamp: same bytes for the same plan


def check_budget(weights_bytes: int, arena_bytes: int, budget_bytes: int, largest: Sequence[tuple[str, int]]) -> None:
    """Raises MemoryBudgetExceeded when weights + activation arena exceed the budget."""
    peak = int(weights_bytes) + int(arena_bytes)
    if peak <= budget_bytes:
        return
    top = sorted(largest, key=lambda t: -t[1])[:3]
    names = ", ".join(f"{name} {_human(size)}" for name, size in top) or "none planned"
    raise MemoryBudgetExceeded(
        f"peak memory {_human(peak)} (weights {_human(weights_bytes)} + activations {_human(arena_bytes)}) "
        f"exceeds the budget of {_human(budget_bytes)}; largest tensors: {names}"
    )
