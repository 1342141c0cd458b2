"""Tuning that is kept: MetaSchedule over the kernels socc builds, records in a database per profile.

`tune_kernels` measures on this machine, so it tunes for the host profile only (there is no
device for a cross target here). Each kernel is tuned on its own, slowest first (its default
schedule timed once on this machine, times its call count; FLOPs when a kernel cannot be timed,
e.g. symbolic shapes: FLOPs put MobileNetV2's int8 depthwise convs last, and three of them took
81% of the model's time): a kernel
MetaSchedule fails on keeps its default schedule and the rest go on; the time budget is checked
between kernels. Records go to `<database>/<profile>/` (MetaSchedule's JSON database), where
`apply-tuning` finds them on later compiles; socc ships records of its own in `toolchain/tuning/`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from .passes.apply_tuning import open_databases
from .passes.base import CompileContext
from .progress import Progress

SHIPPED_DIR = Path(__file__).resolve().parent / "tuning"


def user_database_root(root: str | Path | None = None) -> Path:
    """The user's tuning database folder: `root`, else $SOCC_TUNING_DIR, else ~/.cache/socc/tuning."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get("SOCC_TUNING_DIR", Path.home() / ".cache" / "socc" / "tuning"))


def database_folders(profile_name: str, root: str | Path | None = None) -> tuple[str, ...]:
    """The database folders a compile for the profile reads: socc's shipped records, then the user's."""
    return (str(SHIPPED_DIR / profile_name), str(user_database_root(root) / profile_name))


@dataclasses.dataclass
class KernelTuning:
    name: str
    weight: int  # how many times the model calls it
    trials: int
    best_ms: float | None
    error: str | None = None
    default_ms: float | None = None  # its default schedule's time here (None: not timed)
    tuned_ms: float | None = None  # the best record's schedule, timed here as default_ms is
    kept: bool = False  # the record went into the database (it beats the default schedule here)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def tuning_target(target: Any) -> Any:
    """MetaSchedule's CPU rules need the core count in the target."""
    import tvm

    config = dict(target.export())
    config["num-cores"] = os.cpu_count() or 1
    return tvm.target.Target({k: v for k, v in config.items() if k not in ("keys", "tag", "feature")})


def tune_kernels(mod: Any, ctx: CompileContext, folder: Path, trials: int, time_budget: float, progress: Progress,
                 builder_timeout: float = 180.0, known: tuple[str, ...] = ()) -> list[KernelTuning]:
    """Tunes the module's kernels (one MetaSchedule task each) into the database in `folder`;
    kernels that already have a record in one of the `known` database folders are left as they are.
    The compile context `ctx` gives the target, and how the vectorize pass schedules a kernel that
    has no record: the default a record must beat."""
    from tvm.s_tir import meta_schedule as ms

    target = tuning_target(ctx.target)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    # the databases as apply-tuning opens them: a kernel counts as tuned when a compile would use a record
    known_database = open_databases(known)
    recorded = [known_database is not None and known_database.query_tuning_record(t.dispatched[0], target, "main") is not None
                for t in tasks]
    results = [KernelTuning(t.task_name, int(t.weight), 0, None, "already tuned (record kept)") for t, r in zip(tasks, recorded) if r]
    tasks = [t for t, r in zip(tasks, recorded) if not r]
    if not tasks:
        return results
    with progress.stage(f"time {len(tasks)} untuned kernels") as summary:
        tasks, default_ms = _slowest_first(tasks, target, _defaults(mod, tasks, ctx))
        summary.update(timed=sum(ms is not None for ms in default_ms.values()))
    folder.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(folder))
    per_kernel = max(trials // max(len(tasks), 1), 1)
    # one builder and runner for all kernels: each worker process pays TVM's import once (~6 s with
    # quick_frame_modules: MetaSchedule parses its TVMScript tensor intrinsics on import)
    builder = ms.builder.LocalBuilder(timeout_sec=builder_timeout, initializer=quick_frame_modules)
    runner = ms.runner.LocalRunner()
    start = time.monotonic()
    for index, task in enumerate(tasks):
        if time.monotonic() - start > time_budget:
            results.append(KernelTuning(task.task_name, int(task.weight), 0, None, "time budget spent", default_ms[task.task_name]))
            continue
        with progress.stage(f"tune {index + 1}/{len(tasks)} {task.task_name}") as summary:
            outcome = _tune_one(task, target, folder, database, per_kernel, builder, runner, default_ms[task.task_name])
            results.append(outcome)
            summary.update(trials=per_kernel, best_ms=outcome.best_ms, kept=outcome.kept,
                           **({"error": outcome.error} if outcome.error else {}))
    return results


def recorded_kernels(mod: Any, ctx: CompileContext, folders: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every kernel of `mod` that the databases in `folders` hold a record for, its record's
    schedule timed here against the default (what the vectorize pass builds without a record):
    name, calls, `default_ms`, `record_ms`, and `workload` (the record's workload hash, as
    MetaSchedule's JSON database keys it)."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    target = tuning_target(ctx.target)
    database = open_databases(folders)
    if database is None:
        return []
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target)
             if database.query_tuning_record(t.dispatched[0], target, "main") is not None]
    rows = []
    for task, default in zip(tasks, _defaults(mod, tasks, ctx)):
        schedule = database.query_schedule(task.dispatched[0], target, "main")
        rows.append({"name": task.task_name, "weight": int(task.weight), "default_ms": _ms(_kernel_seconds(default, target)),
                     "record_ms": _ms(_kernel_seconds(schedule.mod, target)),
                     "workload": f"{tvm_ffi.structural_hash(task.dispatched[0]):020d}"})
    return rows


def _tune_one(task: Any, target: Any, folder: Path, database: Any, trials: int, builder: Any, runner: Any,
              default_ms: float | None) -> KernelTuning:
    """Tunes one kernel into a scratch database; its best record goes into `database` only when
    its schedule, built and timed here the way the default was, beats the default schedule (a
    tiny kernel is faster on one thread than on MetaSchedule's parallel loops)."""
    import logging
    import tempfile

    import numpy as np
    from tvm.s_tir import meta_schedule as ms

    quick_frame_modules()
    kernel = task.dispatched[0]
    with tempfile.TemporaryDirectory(prefix="socc-tune-") as scratch_folder:
        scratch = ms.database.JSONDatabase(work_dir=scratch_folder)

        def tune(space: Any) -> None:
            # MetaSchedule's console log goes to stdout (where --json output goes): errors only
            # (each run configures it again); its full log is in <folder>/logs.
            logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.ERROR)
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts([task], str(folder), space=space, seed=0)
            ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(folder), max_trials_global=trials,
                               num_trials_per_iter=min(trials, 16), database=scratch,
                               builder=builder, runner=runner, cost_model=cost_model())

        try:
            try:
                tune("post-order-apply")
            except Exception:  # noqa: BLE001 - retried once without the rule that breaks it (see _space_without_auto_inline)
                tune(_space_without_auto_inline())
            records = scratch.get_top_k(scratch.commit_workload(kernel), 1)
        except Exception as exc:  # noqa: BLE001 - this kernel keeps its default schedule; the rest go on
            lines = str(exc).strip().splitlines()
            return KernelTuning(task.task_name, int(task.weight), trials, None,
                                f"{type(exc).__name__}: {lines[-1] if lines else ''}", default_ms)
        if not records:
            return KernelTuning(task.task_name, int(task.weight), trials, None, "no valid schedule found", default_ms)
        best = records[0]
        best_ms = _ms(float(np.mean([float(s) for s in best.run_secs])))
        schedule = scratch.query_schedule(kernel, target, "main")
        tuned_seconds = None if schedule is None else _kernel_seconds(schedule.mod, target)
    tuned_ms = _ms(tuned_seconds)
    if default_ms is not None and (tuned_ms is None or tuned_ms >= default_ms):
        timed = "could not be timed here" if tuned_ms is None else f"not faster here ({tuned_ms} ms vs default {default_ms} ms)"
        return KernelTuning(task.task_name, int(task.weight), trials, best_ms, f"tuned schedule {timed}: record not kept",
                            default_ms, tuned_ms)
    database.commit_tuning_record(ms.database.TuningRecord(best.trace, database.commit_workload(kernel), best.run_secs,
                                                           best.target, best.args_info))
    return KernelTuning(task.task_name, int(task.weight), trials, best_ms, None, default_ms, tuned_ms, kept=True)


def quick_frame_modules() -> None:
    """Makes MetaSchedule's first use in a process ~4x cheaper (28 s -> 6 s here, in the tuning
    process and in each builder worker). Importing `tvm.s_tir.tensor_intrin` parses ~250 TVMScript
    functions, and each parse calls `inspect.stack()`, which looks up the module of every frame;
    for a frame whose file is not a module file (the import machinery's `<frozen ...>` frames, the
    parser's `<string>` and `<ast>` code) Python scans all of `sys.modules` on every lookup, and
    TVM imports torch (~2000 modules). Telling `inspect` the answer the scan would find (the
    importlib modules; no module for the parser's code) makes each lookup a dict hit."""
    import inspect

    answers = {"<frozen importlib._bootstrap>": "importlib._bootstrap",
               "<frozen importlib._bootstrap_external>": "importlib._bootstrap_external",
               "<string>": "", "<ast>": ""}  # "": in no module (sys.modules has no "")
    for fake_file, module in answers.items():
        inspect.modulesbyfile[os.path.normcase(os.path.abspath(fake_file))] = module


def _space_without_auto_inline() -> Any:
    """MetaSchedule's CPU rules without AutoInline. With it, the design space of some kernels cannot
    be built: AutoInline leaves a block whose producer a later compute-at cannot reach (seen on our
    fused attention kernel: "requires all the producer(s) of the given block to be present under
    the target loop"); without it the space builds (81 designs for MiniLM's attention)."""
    from tvm.s_tir import meta_schedule as ms

    rules = [rule for rule in ms.ScheduleRule.create("llvm") if not isinstance(rule, ms.schedule_rule.AutoInline)]
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs="llvm", mutator_probs="llvm")


def cost_model() -> str:
    """MetaSchedule's XGBoost cost model when xgboost is installed, else random (no model)."""
    import importlib.util

    return "xgb" if importlib.util.find_spec("xgboost") else "random"


def _defaults(mod: Any, tasks: list[Any], ctx: CompileContext) -> list[Any]:
    """Each task's kernel as a compile without a record builds it (the vectorize pass's schedule)."""
    import tvm

    from .passes.vectorize import default_schedule

    names = {gvar.name_hint for gvar in mod.get_global_vars()}
    return [tvm.IRModule({"main": default_schedule(mod, task.task_name, ctx).with_attr("global_symbol", "main")})
            if task.task_name in names else task.dispatched[0] for task in tasks]


def _slowest_first(tasks: list[Any], target: Any, defaults: list[Any]) -> tuple[list[Any], dict[str, float | None]]:
    """The tasks by their default schedule's time on this machine (`defaults`: each task's kernel
    as compiled without a record) times their call count, slowest first; kernels that cannot be
    timed (symbolic shapes, a build failure) after them, by FLOPs. Also returns each kernel's
    default time in ms (None: not timed)."""
    seconds = [_kernel_seconds(default, target) for default in defaults]
    timed = sorted((i for i, s in enumerate(seconds) if s is not None), key=lambda i: (-seconds[i] * tasks[i].weight, tasks[i].task_name))
    rest = sorted((i for i, s in enumerate(seconds) if s is None), key=lambda i: (-_flops(tasks[i].dispatched[0]) * tasks[i].weight, tasks[i].task_name))
    default_ms = {task.task_name: _ms(s) for task, s in zip(tasks, seconds)}
    return [tasks[i] for i in [*timed, *rest]], default_ms


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else float(f"{seconds * 1000:.4g}")


def _kernel_seconds(mod: Any, target: Any) -> float | None:
    """One kernel's time here as scheduled in `mod` (the default schedule when untuned), on inputs
    of ones (no division by zero, valid indices): the median of 5 repeats of at least 20 ms each.
    None when its shapes are symbolic or it fails to build."""
    import numpy as np
    import tvm
    from tvm.s_tir import meta_schedule as ms

    infos = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    if not all(isinstance(dim, int) for info in infos for dim in info.shape):
        return None
    try:
        lib = tvm.compile(mod, target=target)
        device = tvm.cpu()
        args = [tvm.runtime.tensor(np.ones(list(info.shape), str(info.dtype)), device) for info in infos]
        timer = lib.mod.time_evaluator("main", device, number=1, repeat=5, min_repeat_ms=20)
        return float(np.median(timer(*args).results))
    except Exception:  # noqa: BLE001 - this kernel is ordered by FLOPs, and its record kept untimed
        return None


def _flops(mod: Any) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(mod))
    except Exception:  # noqa: BLE001 - ordering only
        return 0.0
