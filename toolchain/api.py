"""The Python API. The CLI is a thin layer over these functions; option names match its flags."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .artifact import MODEL_LIB, RUNNER, SCHEMA_VERSION, Artifact, commit_dir, finalize_manifest, staging_dir, write_archive
from .errors import UserError
from .calibration import calibration_description, calibration_source
from .importer import MAX_MODEL_BYTES, MAX_TENSOR_ELEMENTS, parse_dim_values
from .isolate import DEFAULT_MEMORY_BYTES, DEFAULT_TIMEOUT_S
from .progress import Progress
from .targets import LAYOUTS, REQUANTIZE_MODES, TargetProfile, load_profile
from .verify import VerifyReport


def resolve_target(target: str | TargetProfile | Mapping[str, Any], abi: str = "gnu", cc: str | None = None) -> TargetProfile:
    """A profile by name or .toml path, a TargetProfile, or a profile's dict form (as in a manifest)."""
    if isinstance(target, TargetProfile):
        profile = target
    elif isinstance(target, Mapping):
        fields = {f.name for f in dataclasses.fields(TargetProfile)}
        profile = TargetProfile(**{k: tuple(v) if isinstance(v, list) else v for k, v in target.items() if k in fields})
    else:
        profile = load_profile(target)
    return profile.for_abi(abi, cc)


def compile(  # noqa: A001 - the toolchain's verb
    model: str | Path,
    target: str | TargetProfile = "host",
    output: str | Path | None = None,
    *,
    profile: str | Path | None = None,
    shape: Mapping[str, Sequence[int]] | Sequence[str] | None = None,
    no_simplify: bool = False,
    passes: Sequence[str] | None = None,
    skip_pass: Sequence[str] = (),
    skip_fusion: Sequence[str] = (),
    abi: str = "gnu",
    cc: str | None = None,
    archive: bool = False,
    max_shape: Mapping[str, int] | Sequence[str] | None = None,
    max_memory: int | None = None,
    max_model_size: int = MAX_MODEL_BYTES,
    max_tensor_elements: int = MAX_TENSOR_ELEMENTS,
    progress: bool | Progress = True,
    isolate: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
    build_memory: int = DEFAULT_MEMORY_BYTES,
    quantize: str | None = None,
    calibration: str | Path | Iterable[Mapping[str, Any]] | None = None,
    calibrate_method: str = "mse",
    activation_dtype: str = "uint8",
    exclude_op_type: Sequence[str] = (),
    exclude_node: Sequence[str] = (),
    group_size: int = 32,
    weight_scheme: str = "asymmetric",
    int8_embeddings: bool = False,
    max_accuracy_drop: float | None = None,
    requantize: str | None = None,
    layout: str | None = None,
    tuning_db: str | Path | None = None,
    exact_math: bool = False,
) -> Artifact:
    """Compiles an ONNX file for a target profile into an artifact folder (and `.tar.gz` with archive).

    `profile` is a target profile TOML of the user's (it may `extends` a shipped one), in place of
    `target`. `output` defaults to `<model stem>.<target>` beside the model. Nothing is written unless
    the whole build succeeds; the folder appears in one rename. `max_shape` bounds symbolic dims
    (e.g. {"sequence": 512}) so the memory plan covers them; `max_memory` (bytes) refuses a build
    whose weights + activation arena exceed it. With `isolate`, the build runs in
    a child process limited to `timeout` seconds and `build_memory` bytes, so a native crash in
    TVM becomes a one-line BuildError naming the stage (the CLI isolates by default).

    `quantize="int8"` quantizes conv2d/matmul weights per channel and their inputs per tensor from
    `calibration` (a .npz path, a folder of .npz, or an iterable of input dicts; with `isolate`,
    a path only), observed by `calibrate_method` (minmax, percentile, entropy, mse);
    `quantize="int4-weight"` packs matmul and embedding weights to 4 bits in groups of
    `group_size` along the reduction. `exclude_op_type` / `exclude_node` keep layers in float;
    `max_accuracy_drop` (int8) keeps the most sensitive layers in float until the calibration
    set's mean 1 - cosine against float is within it. `requantize` ("float" or "integer",
    default: the target profile's) says how int8 layers requantize their int32 accumulators.
    `layout` ("NCHW" or "NHWC", default: the target profile's) is the convolutions' layout
    (the convert-layout pass). `exact_math` keeps libm's exp/erf in float32 exp, erf and softmax
    (by default CPU targets compute them with vectorizable polynomials, relative error ~2e-7).

    Kernels with a tuning record (`tune`) are scheduled from it: records socc ships for the
    profile, then those in `tuning_db` (default: the user's cache, ~/.cache/socc/tuning).
    """
    if profile is not None:
        if target not in ("host", profile, str(profile)):
            raise UserError("give --target or --profile, not both")
        target = str(profile)
    check_layout(layout)
    quantize_options = _quantize_options(quantize, calibration, calibrate_method, activation_dtype, exclude_op_type, exclude_node,
                                         group_size, weight_scheme, int8_embeddings, max_accuracy_drop, requantize)
    if isolate:
        from .artifact import sweep_staging
        from .isolate import compile_in_child

        profile_arg = dataclasses.asdict(target) if isinstance(target, TargetProfile) else target
        kwargs = dict(model=str(model), target=profile_arg, output=None if output is None else str(output),
                      shape=shape if shape is None or isinstance(shape, Mapping) else list(shape),
                      no_simplify=no_simplify, passes=None if passes is None else list(passes),
                      skip_pass=list(skip_pass), skip_fusion=list(skip_fusion), abi=abi, cc=cc, archive=archive,
                      max_shape=parse_dim_values(max_shape, "--max-shape"), max_memory=max_memory,
                      max_model_size=max_model_size, max_tensor_elements=max_tensor_elements,
                      progress=progress.enabled if isinstance(progress, Progress) else bool(progress),
                      tuning_db=None if tuning_db is None else str(tuning_db), layout=layout, exact_math=exact_math,
                      **quantize_options)
        if calibration is not None and not isinstance(calibration, (str, Path)):
            raise UserError("calibration from a Python iterable needs isolate=False (or save it as .npz and pass the path)")
        kwargs["calibration"] = None if calibration is None else str(calibration)
        try:
            result = compile_in_child(kwargs, timeout=timeout, memory_bytes=build_memory)
        finally:
            if output is not None:  # a killed child leaves its staging folder; the old artifact stays whole
                sweep_staging(Path(output))
        artifact = Artifact.load(result["artifact"])
        artifact.timings = result["seconds"]
        return artifact
    from .build import check_toolchain, codegen, export_model
    from .importer import Limits, parse_shape_options
    from .report import memory_section, placement_section, quantization_section, write_report
    from .pipeline import check_fusion_names, run_passes, select_passes

    log = progress if isinstance(progress, Progress) else Progress(enabled=bool(progress))
    model_path = Path(model)
    profile = resolve_target(target, abi, cc)
    out_path = Path(output) if output is not None else model_path.with_name(f"{model_path.stem}.{profile.name}")
    limits = Limits(max_model_size, max_tensor_elements)
    shapes = parse_shape_options(shape, limits)
    selected = select_passes(profile.default_passes, passes, skip_pass)
    if quantize and "quantize" not in [p.name for p in selected]:
        raise UserError(f"--quantize {quantize} needs the quantize pass, which the chosen pass list leaves out")
    check_fusion_names(skip_fusion)
    check_toolchain(profile)
    options = {
        "target": profile.name,
        "abi": abi,
        "cc": cc,
        "shape": {k: list(v) for k, v in sorted(shapes.items())},
        "no_simplify": no_simplify,
        "passes": list(passes) if passes is not None else None,
        "skip_pass": sorted(skip_pass),
        "skip_fusion": sorted(skip_fusion),
        "archive": archive,
        "max_shape": dict(sorted(parse_dim_values(max_shape, "--max-shape").items())),
        "max_memory": max_memory,
        "tuning_db": None if tuning_db is None else str(tuning_db),
        **quantize_options,
        "requantize": requantize or profile.requantize,
        "layout": layout or profile.layout,
        "exact_math": exact_math,
    }

    imported, ctx = _import_with_context(model_path, profile, shapes, limits, no_simplify, calibration, options, log, tuning_db)
    target_json = profile.tvm_target_json()
    tvm_target = ctx.target
    if profile.is_static:  # the static driver reads main after the memory plan, before VM lowering
        from .freestanding import generate_driver

        before_vm = [p for p in selected if p.name != "lower-vm"]
        mod, records = run_passes(imported.mod, before_vm, ctx, log)
        with log.stage("driver") as summary:
            driver = generate_driver(mod)
            summary.update(kernel_calls=driver.kernel_calls)
        mod, vm_records = run_passes(mod, [p for p in selected if p.name == "lower-vm"], ctx, log)
        records += vm_records
    else:
        mod, records = run_passes(imported.mod, selected, ctx, log)
    memory, timeline = memory_section(mod, records, max_memory)
    with log.stage("codegen"):
        executable = codegen(mod, tvm_target)

    staged = staging_dir(out_path)
    try:
        with log.stage("package") as summary:
            if profile.is_static:
                _add_static_program(staged, executable, driver, profile)
            else:
                export_model(executable, profile, staged / MODEL_LIB)
                if not profile.is_host:
                    _add_device_runtime(staged, profile, log)
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "versions": _versions(),
                "source": {
                    "file": model_path.name,
                    "sha256": imported.source_sha256,
                    "opset": imported.opset,
                    "producer": f"{imported.onnx_model.producer_name} {imported.onnx_model.producer_version}".strip(),
                },
                "target": {**profile.summary(), "tvm_target": target_json if not profile.is_host else {"kind": "llvm", "mcpu": "host"}},
                "options": options,
                "import": imported.stats,
                "inputs": [s.to_json() for s in imported.inputs],
                "outputs": [s.to_json() for s in imported.outputs],
                "passes": [{"name": r.name, "stats": r.stats} for r in records],
                "memory": memory,
                "quantization": quantization_section(records, memory),
                "placement": placement_section(records, profile.units, profile.accelerator),
            }
            if profile.objdump:
                from .build import kernel_instruction_counts
                from .report import code_section

                counts = kernel_instruction_counts(staged / MODEL_LIB, profile.objdump, profile.vector_asm_pattern)
                manifest["code"] = code_section(counts, profile.vector_asm_pattern)
                summary.update(vector_share=manifest["code"]["vector_share"])
            write_report(staged, manifest, memory, timeline)
            manifest = finalize_manifest(staged, manifest)
            summary.update(files=len(manifest["files"]), bytes=sum(f["size"] for f in manifest["files"].values()))
        commit_dir(staged, out_path)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if archive:
        write_archive(out_path, out_path.with_name(out_path.name + ".tar.gz"))
    artifact = Artifact.load(out_path)
    artifact.timings = dict(log.seconds)
    return artifact


def tune(
    model: str | Path,
    target: str | TargetProfile = "host",
    tuning_db: str | Path | None = None,
    *,
    shape: Mapping[str, Sequence[int]] | Sequence[str] | None = None,
    no_simplify: bool = False,
    trials: int = 64,
    time_budget: float = 600.0,
    quantize: str | None = None,
    calibration: str | Path | Iterable[Mapping[str, Any]] | None = None,
    calibrate_method: str = "mse",
    activation_dtype: str = "uint8",
    skip_fusion: Sequence[str] = (),
    layout: str | None = None,
    retune: bool = False,
    progress: bool | Progress = True,
) -> dict[str, Any]:
    """Tunes the kernels a compile of `model` for `target` would build (MetaSchedule, measured on this
    machine: host only), `trials` in all, stopping after `time_budget` seconds. The records go to
    `tuning_db` (default: the user's cache) and later `compile` calls with the same options use them.
    Kernels that already have a record (shipped or in `tuning_db`) are skipped unless `retune`."""
    from .tuning import cost_model, tune_kernels, user_database_root

    log = progress if isinstance(progress, Progress) else Progress(enabled=bool(progress))
    profile = resolve_target(target)
    if not profile.is_host:
        raise UserError(f"socc tune measures kernels on this machine; {profile.name} code cannot run here (no device): tune for host")
    if trials < 1 or time_budget <= 0:
        raise UserError("--trials must be >= 1 and --time-budget > 0")
    mod, ctx = kernels_before_tuning(model, profile, tuning_db, log, shape=shape, no_simplify=no_simplify, quantize=quantize,
                                     calibration=calibration, calibrate_method=calibrate_method, activation_dtype=activation_dtype,
                                     skip_fusion=skip_fusion, layout=layout)
    folder = user_database_root(tuning_db) / profile.name
    kernels = tune_kernels(mod, ctx, folder, trials, time_budget, log, known=() if retune else ctx.tuning_databases)
    return {"database": str(folder), "target": profile.name, "kernels": [k.to_json() for k in kernels],
            "tuned": sum(k.kept for k in kernels), "cost_model": cost_model(),
            "note": "measured on this machine (host); cross targets are not tuned here"}


def kernels_before_tuning(model: str | Path, profile: TargetProfile, tuning_db: str | Path | None, log: Progress, *,
                          shape: Mapping[str, Sequence[int]] | Sequence[str] | None = None, no_simplify: bool = False,
                          quantize: str | None = None, calibration: str | Path | Iterable[Mapping[str, Any]] | None = None,
                          calibrate_method: str = "mse", activation_dtype: str = "uint8", skip_fusion: Sequence[str] = (),
                          layout: str | None = None) -> tuple[Any, Any]:
    """The module a compile with these options has just before `apply-tuning` (its kernels are
    what tuning records are keyed on), and the compile context."""
    from .importer import Limits, parse_shape_options
    from .pipeline import check_fusion_names, run_passes, select_passes

    shapes = parse_shape_options(shape, Limits(MAX_MODEL_BYTES, MAX_TENSOR_ELEMENTS))
    check_fusion_names(skip_fusion)
    check_layout(layout)
    options = {"shape": {k: list(v) for k, v in sorted(shapes.items())}, "max_shape": {}, "skip_fusion": sorted(skip_fusion),
               "layout": layout or profile.layout, **_quantize_options(quantize, calibration, calibrate_method, activation_dtype)}
    options["requantize"] = options["requantize"] or profile.requantize  # as compile() resolves it
    imported, ctx = _import_with_context(Path(model), profile, shapes, Limits(MAX_MODEL_BYTES, MAX_TENSOR_ELEMENTS), no_simplify,
                                         calibration, options, log, tuning_db)
    selected = select_passes(profile.default_passes)
    mod, _ = run_passes(imported.mod, selected[: [p.name for p in selected].index("apply-tuning")], ctx, log)
    return mod, ctx


def check_layout(layout: str | None) -> None:
    if layout not in (None, *LAYOUTS):
        raise UserError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")


def _quantize_options(quantize: str | None = None, calibration: Any = None, calibrate_method: str = "mse",
                      activation_dtype: str = "uint8", exclude_op_type: Sequence[str] = (), exclude_node: Sequence[str] = (),
                      group_size: int = 32, weight_scheme: str = "asymmetric", int8_embeddings: bool = False,
                      max_accuracy_drop: float | None = None, requantize: str | None = None) -> dict[str, Any]:
    """The quantize pass's options as the manifest records them (defaults = compile's)."""
    if requantize not in (None, *REQUANTIZE_MODES):
        raise UserError(f"requantize must be one of {', '.join(REQUANTIZE_MODES)}, not {requantize!r}")
    return {"requantize": requantize, "quantize": quantize, "calibration": calibration_description(calibration), "calibrate_method": calibrate_method,
            "activation_dtype": activation_dtype, "exclude_op_type": sorted(exclude_op_type), "exclude_node": sorted(exclude_node),
            "group_size": group_size, "weight_scheme": weight_scheme, "int8_embeddings": int8_embeddings,
            "max_accuracy_drop": max_accuracy_drop}


def _import_with_context(model_path: Path, profile: TargetProfile, shapes: Mapping[str, Any], limits: Any, no_simplify: bool,
                         calibration: Any, options: dict[str, Any], log: Progress, tuning_db: str | Path | None) -> tuple[Any, Any]:
    """The imported model and the pass context for a profile (what compile and tune share)."""
    import tvm

    from .importer import import_onnx
    from .passes import CompileContext
    from .tuning import database_folders

    imported = import_onnx(model_path, shape=shapes, simplify_model=not no_simplify, allowed_ops=profile.supported_ops,
                           limits=limits, progress=log)
    if profile.is_static:
        dynamic = [f"{spec.name}[{axis}]={dim}" for spec in imported.inputs for axis, dim in enumerate(spec.shape) if not isinstance(dim, int)]
        if dynamic:
            raise UserError(f"target {profile.name} builds a static program: fix the dynamic dims {', '.join(dynamic)} with --shape NAME=D1,D2")
    samples = None
    if calibration is not None:
        samples = calibration_source(calibration, {spec.name: spec.shape for spec in imported.inputs})
    ctx = CompileContext(tvm.target.Target(profile.tvm_target_json()), profile.name, profile.llvm_features(), profile.schedule_vector_bits(), options,
                         vector_float=profile.vector_float, parallel=not profile.is_static, calibration=samples, source_nodes=imported.nodes_by_op_type(),
                         int4_weights=imported.int4_weights, accelerator=profile.accelerator_facts,
                         tuning_databases=database_folders(profile.name, tuning_db))
    return imported, ctx


def _add_device_runtime(folder: Path, profile: TargetProfile, log: Progress) -> None:
    """The TVM runtime built for the target, and the runner (also the app teams' loading example)."""
    from . import crossrt

    runtime_dir = crossrt.ensure_runtime(profile.triple, profile.cxx, log=log.note)
    (folder / "runtime").mkdir()
    for lib in ("libtvm_ffi.so", "libtvm_runtime.so"):
        shutil.copyfile(runtime_dir / lib, folder / "runtime" / lib)
    source = Path(crossrt.__file__).parent / "runtime_src" / "run_model.cc"
    shutil.copyfile(source, folder / "run_model.cc")
    crossrt.build_runner(runtime_dir, profile.cxx, folder / RUNNER)


def _add_static_program(folder: Path, executable: Any, driver: Any, profile: TargetProfile) -> None:
    """model.so, and the static program for the emulator (generated driver, weights, C runtime)
    linked with the same kernel object (compiled once)."""
    import tempfile

    from .build import export_model
    from .freestanding import build_static_program

    with tempfile.TemporaryDirectory(prefix="socc-objects-") as tmp:
        kernels = Path(tmp) / "kernels.o"
        export_model(executable, profile, folder / MODEL_LIB, keep_kernels=kernels)
        build_static_program(driver, kernels, folder, profile.cc, profile.ld, folder / RUNNER)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {
        "socc": __version__,
        "apache-tvm": version("apache-tvm"),
        "apache-tvm-ffi": version("apache-tvm-ffi"),
        "onnx": version("onnx"),
        "onnxsim": version("onnxsim"),
    }


def rebuild(
    artifact: str | Path | Artifact,
    *,
    model: str | Path | None = None,
    output: str | Path | None = None,
    progress: bool | Progress = True,
) -> Artifact:
    """Builds an artifact again from its manifest: same source (found by hash), profile and options."""
    from .verify import find_source_model

    art = artifact if isinstance(artifact, Artifact) else load(artifact)
    source = find_source_model(art, model)
    options = dict(art.manifest["options"])
    return compile(
        source,
        art.target,
        output if output is not None else art.path,
        shape=options["shape"],
        max_shape=options.get("max_shape"),
        max_memory=options.get("max_memory"),
        no_simplify=options["no_simplify"],
        passes=options["passes"],
        skip_pass=options["skip_pass"],
        skip_fusion=options.get("skip_fusion", []),
        abi=options["abi"],
        cc=options["cc"],
        archive=options.get("archive", False),
        tuning_db=options.get("tuning_db"),
        layout=options.get("layout"),
        exact_math=options.get("exact_math", False),
        progress=progress,
        **_rebuild_quantize_options(options),
    )


def _rebuild_quantize_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The quantization options of a manifest; calibration from Python cannot be replayed."""
    if not options.get("quantize"):
        return {}
    if options.get("calibration") == "python iterable":
        raise UserError("this artifact was calibrated from a Python iterable; rebuild it with compile(..., calibration=...)")
    names = ("quantize", "calibration", "calibrate_method", "activation_dtype", "exclude_op_type", "exclude_node",
             "group_size", "weight_scheme", "int8_embeddings", "max_accuracy_drop", "requantize")
    return {name: options[name] for name in names if name in options}


def load(path: str | Path) -> Artifact:
    """Opens an artifact folder or .tar.gz, checking every file against the manifest."""
    from .artifact import open_artifact

    return open_artifact(path)


def run(artifact: str | Path | Artifact, inputs: Mapping[str, Any]) -> dict[str, Any]:
    art = artifact if isinstance(artifact, Artifact) else load(artifact)
    return art.run(inputs)


def verify(
    artifact: str | Path | Artifact,
    *,
    model: str | Path | None = None,
    inputs: Mapping[str, Any] | str | Path | None = None,
    dim: Mapping[str, int] | Sequence[str] | None = None,
    rtol: float | None = None,
    seed: int = 0,
    min_cosine: float | None = None,
    labels: Any = None,
    per_layer: bool = False,
) -> VerifyReport:
    """Runs the artifact and onnxruntime on the source model with the same inputs and compares.

    With `labels`, also top-1 accuracy of artifact and reference and their agreement. With
    `per_layer` (quantized artifacts), every quantized layer's output against the float model's,
    worst first: the model is quantized again on the host with the artifact's options to tap them.

    A quantized artifact is compared with the float source by cosine (`min_cosine`, default by scheme)."""
    from .verify import verify_artifact

    art = artifact if isinstance(artifact, Artifact) else load(artifact)
    return verify_artifact(art, model=model, inputs=inputs, dim=dim, rtol=rtol, seed=seed, min_cosine=min_cosine, labels=labels,
                           per_layer=per_layer)


def bench(
    artifact: str | Path | Artifact,
    *,
    inputs: Mapping[str, Any] | str | Path | None = None,
    dim: Mapping[str, int] | Sequence[str] | None = None,
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Latency of a host artifact: median (and p10/p90) of `runs` calls after `warmup`, in ms.

    `inputs` as for verify (default: seeded random inputs of the manifest's shapes, symbolic dims from
    `dim`); `threads` sets the TVM runtime's thread pool (default: TVM_NUM_THREADS or all cores)."""
    import numpy as np

    from .importer import parse_dim_values
    from .verify import load_inputs, random_inputs

    if runs < 1 or warmup < 0:
        raise UserError("--runs must be >= 1 and --warmup >= 0")
    art = artifact if isinstance(artifact, Artifact) else load(artifact)
    if isinstance(inputs, (str, Path)):
        inputs = load_inputs(inputs)
    feed = inputs if inputs is not None else random_inputs(art.inputs, parse_dim_values(dim, "--dim"), seed)
    if threads is not None:
        import tvm

        if threads < 1:
            raise UserError("--threads must be >= 1")
        tvm.get_global_func("runtime.config_threadpool")(0, threads)
    times = art.time_host(feed, warmup, runs)
    return {"artifact": str(art.path), "target": art.target["name"], "runs": runs, "warmup": warmup,
            "threads": threads, "median_ms": float(np.median(times)), "p10_ms": float(np.percentile(times, 10)),
            "p90_ms": float(np.percentile(times, 90))}


__all__ = ["compile", "tune", "bench", "load", "rebuild", "run", "verify", "Artifact", "VerifyReport", "UserError"]
