"""The `socc` command: a thin layer over toolchain.api. Every flag has the same name in the API."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

import click
import numpy as np

from . import api
from .errors import SoccError, UserError
from .importer import MAX_MODEL_BYTES, MAX_TENSOR_ELEMENTS
from .isolate import DEFAULT_MEMORY_BYTES, DEFAULT_TIMEOUT_S

_state = {"debug": False, "json": False}


def _emit(data: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str) if _state["json"] else text)


def _split_commas(values: tuple[str, ...]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def parse_bytes(text: str) -> int:
    """'8GiB', '1.8GB', '512MiB', '1000000' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}
    number = text.strip().upper()
    digits = number.rstrip("KMGIB")
    try:
        return int(float(digits) * units[number[len(digits):]])
    except (KeyError, ValueError):
        raise UserError(f"cannot read {text!r} as a size; use e.g. 8GiB, 1.8GB, 512MiB") from None


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
@click.version_option(package_name="socc")
def cli(debug: bool) -> None:
    """socc: compile ONNX models into verified artifacts for phone SoCs."""
    _state["debug"] = debug


@cli.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", "-t", default="host", show_default=True, help="Target profile name (see `socc targets`) or a .toml file.")
@click.option("--profile", type=click.Path(path_type=Path), help="A target profile of yours (.toml; may `extends` a shipped one), instead of --target.")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Artifact folder (default: MODEL_STEM.TARGET beside the model).")
@click.option("--shape", multiple=True, metavar="NAME=D1,D2", help="Fix an input's shape, e.g. input_ids=1,128. Repeatable.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim simplification.")
@click.option("--passes", multiple=True, metavar="A,B", help="Run only these passes (required lowering passes always run).")
@click.option("--skip-pass", multiple=True, metavar="NAME", help="Skip a pass by name. Repeatable.")
@click.option("--skip-fusion", multiple=True, metavar="PATTERN", help="Turn off a fusion pattern or family (see `socc passes`). Repeatable.")
@click.option("--abi", type=click.Choice(["gnu", "android"]), default="gnu", show_default=True)
@click.option("--cc", help="C++ compiler for the target (e.g. the NDK's aarch64 clang++).")
@click.option("--archive", is_flag=True, help="Also write OUTPUT.tar.gz.")
@click.option("--verify", "verify_after", is_flag=True, help="Run the artifact against onnxruntime after building.")
@click.option("--max-shape", multiple=True, metavar="DIM=N", help="Upper bound of a symbolic dim for memory planning, e.g. sequence=512.")
@click.option("--max-memory", help="Refuse the build if weights + activations exceed this, e.g. 1.8GB.")
@click.option("--max-model-size", default=f"{MAX_MODEL_BYTES >> 30}GiB", show_default=True, help="Refuse models (with external data) larger than this.")
@click.option("--max-tensor-elements", type=int, default=MAX_TENSOR_ELEMENTS, show_default=True, help="Refuse any input or weight with more elements.")
@click.option("--isolate/--no-isolate", default=True, show_default=True, help="Build in a child process with time and memory limits.")
@click.option("--timeout", type=float, default=DEFAULT_TIMEOUT_S, show_default=True, help="Build time limit in seconds (isolated builds).")
@click.option("--build-memory", type=str, default=f"{DEFAULT_MEMORY_BYTES >> 30}GiB", show_default=True, help="Build memory limit (isolated builds), e.g. 8GiB.")
@click.option("--quantize", type=click.Choice(["int8", "int4-weight"]), help="int8: calibrated int8 conv/matmul; int4-weight: 4-bit matmul and embedding weights.")
@click.option("--calibration", type=click.Path(path_type=Path), help="Calibration inputs for int8: a .npz (leading sample axis per input) or a folder of .npz.")
@click.option("--calibrate-method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default="mse", show_default=True)
@click.option("--activation-dtype", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True, help="uint8 asymmetric or int8 symmetric activations.")
@click.option("--exclude-op-type", multiple=True, metavar="TYPE", help="Keep ops of this type (Conv, MatMul, Gemm, Gather) in float. Repeatable.")
@click.option("--exclude-node", multiple=True, metavar="NAME", help="Keep this node (ONNX name) in float. Repeatable.")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="32", show_default=True, help="int4 group length along the reduction.")
@click.option("--weight-scheme", type=click.Choice(["symmetric", "asymmetric", "scale-min"]), default="asymmetric", show_default=True, help="int4 weights: per-group zero points (asymmetric), symmetric, or a float16 scale and minimum per group (scale-min, Q4_1's layout).")
@click.option("--max-accuracy-drop", type=float, help="int8: keep the most sensitive layers float until 1 - cosine vs float on the calibration set is within this.")
@click.option("--int8-embeddings", is_flag=True, help="With int4-weight: embedding tables int8 per row instead of int4.")
@click.option("--requantize", type=click.Choice(["float", "integer"]), help="int8 requantize in float or fixed-point integer (default: the target's).")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), help="Convolutions' layout (default: the target's; NHWC: the convert-layout pass).")
@click.option("--exact-math", is_flag=True, help="libm exp/erf in float32 exp, erf and softmax (default on CPUs: vectorized polynomials, ~2e-7 relative).")
@click.option("--tuning-db", type=click.Path(path_type=Path), help="Tuning records folder (`socc tune`); default ~/.cache/socc/tuning.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
@json_option
def compile_command(model: Path, target: str, profile: Path | None, output: Path | None, shape: tuple[str, ...], no_simplify: bool,
                    passes: tuple[str, ...], skip_pass: tuple[str, ...], skip_fusion: tuple[str, ...], abi: str, cc: str | None, archive: bool,
                    verify_after: bool, max_shape: tuple[str, ...], max_memory: str | None, max_model_size: str, max_tensor_elements: int, isolate: bool, timeout: float, build_memory: str, quiet: bool,
                    as_json: bool, exclude_op_type: tuple[str, ...], exclude_node: tuple[str, ...], group_size: str, tuning_db: Path | None,
                    **quantize_options: Any) -> None:
    """Compile MODEL (.onnx) for a target into an artifact folder."""
    _state["json"] = as_json
    artifact = api.compile(
        model, target, output, profile=profile, tuning_db=tuning_db, shape=list(shape), no_simplify=no_simplify,
        passes=_split_commas(passes) if passes else None, skip_pass=_split_commas(skip_pass),
        skip_fusion=_split_commas(skip_fusion),
        abi=abi, cc=cc, archive=archive, progress=not quiet,
        max_shape=list(max_shape), max_memory=parse_bytes(max_memory) if max_memory else None,
        max_model_size=parse_bytes(max_model_size), max_tensor_elements=max_tensor_elements, isolate=isolate, timeout=timeout, build_memory=parse_bytes(build_memory),
        exclude_op_type=_split_commas(exclude_op_type), exclude_node=list(exclude_node), group_size=int(group_size),
        **quantize_options,
    )
    result: dict[str, Any] = {"ok": True, "artifact": str(artifact.path), "target": artifact.target["name"],
                              "files": artifact.manifest["files"], "seconds": artifact.timings}
    text = f"wrote {artifact.path} ({artifact.target['name']}, {sum(f['size'] for f in artifact.manifest['files'].values())} bytes)"
    if verify_after:
        report = api.verify(artifact, model=model)
        result["verify"] = report.to_json()
        text += "\n" + report.table()
        _emit(result, text)
        if not report.ok:
            sys.exit(1)
        return
    _emit(result, text)


@cli.command("rebuild")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path), help="Source ONNX model (default: found next to the artifact by its hash).")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Where to write (default: replace ARTIFACT).")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
@json_option
def rebuild_command(artifact: Path, model: Path | None, output: Path | None, quiet: bool, as_json: bool) -> None:
    """Build ARTIFACT again from the options its manifest recorded."""
    _state["json"] = as_json
    before = api.load(artifact).manifest
    art = api.rebuild(artifact, model=model, output=output, progress=not quiet)
    same = art.manifest == before
    _emit({"ok": True, "artifact": str(art.path), "identical": same},
          f"rebuilt {art.path}: {'byte-identical to the previous build' if same else 'differs from the previous build (versions or source changed)'}")


@cli.command("tune")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", "-t", default="host", show_default=True, help="Target profile (tuning measures here: host).")
@click.option("--tuning-db", type=click.Path(path_type=Path), help="Where the records go; default ~/.cache/socc/tuning.")
@click.option("--shape", multiple=True, metavar="NAME=D1,D2", help="Fix an input's shape, as for compile. Repeatable.")
@click.option("--trials", type=int, default=64, show_default=True, help="MetaSchedule trials in all (split over the kernels).")
@click.option("--time-budget", type=float, default=600.0, show_default=True, help="Seconds; kernels not reached by then keep their default schedule.")
@click.option("--quantize", type=click.Choice(["int8", "int4-weight"]), help="Tune the kernels of this quantized build (same options as compile).")
@click.option("--calibration", type=click.Path(path_type=Path))
@click.option("--calibrate-method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default="mse", show_default=True)
@click.option("--activation-dtype", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True)
@click.option("--skip-fusion", multiple=True, metavar="PATTERN", help="Tune the kernels of a build with this fusion off (as for compile). Repeatable.")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), help="Tune the kernels of a build in this layout (as for compile).")
@click.option("--retune", is_flag=True, help="Tune kernels that already have a record too.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
@json_option
def tune_command(model: Path, target: str, tuning_db: Path | None, shape: tuple[str, ...], trials: int, time_budget: float,
                 quantize: str | None, calibration: Path | None, calibrate_method: str, activation_dtype: str,
                 skip_fusion: tuple[str, ...], layout: str | None, retune: bool, quiet: bool, as_json: bool) -> None:
    """Tune MODEL's kernels with MetaSchedule; later compiles with the same options use the records."""
    _state["json"] = as_json
    result = api.tune(model, target, tuning_db, shape=list(shape), trials=trials, time_budget=time_budget, quantize=quantize,
                      calibration=calibration, calibrate_method=calibrate_method, activation_dtype=activation_dtype,
                      skip_fusion=_split_commas(skip_fusion), layout=layout, retune=retune, progress=not quiet)
    lines = [f"{k['name']:<48}x{k['weight']:<3}{k['trials']:>5} trials  "
             + (f"tuned {k['tuned_ms']} ms" if k["kept"] else k["error"] if k["trials"] == 0 else f"default kept: {k['error']}")
             + (f"  (default {k['default_ms']} ms)" if k["kept"] and k["default_ms"] is not None else "")
             for k in result["kernels"]]
    lines.append(f"{result['tuned']}/{len(result['kernels'])} kernels tuned; records in {result['database']} ({result['note']})")
    _emit(result, "\n".join(lines))


@cli.command("bench")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--inputs", type=click.Path(path_type=Path), help="Inputs .npz (default: seeded random inputs of the manifest's shapes).")
@click.option("--dim", multiple=True, metavar="DIM=N", help="Value of a symbolic dim for random inputs. Repeatable.")
@click.option("--runs", type=int, default=20, show_default=True)
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--threads", type=int, help="TVM runtime threads (default: TVM_NUM_THREADS or all cores).")
@json_option
def bench_command(artifact: Path, inputs: Path | None, dim: tuple[str, ...], runs: int, warmup: int, threads: int | None,
                  as_json: bool) -> None:
    """Time a host artifact: median latency of RUNS calls after WARMUP (wall clock, inputs prebuilt)."""
    _state["json"] = as_json
    result = api.bench(artifact, inputs=inputs, dim=list(dim), runs=runs, warmup=warmup, threads=threads)
    _emit(result, f"{result['target']}: median {result['median_ms']:.3f} ms (p10 {result['p10_ms']:.3f}, p90 {result['p90_ms']:.3f}) "
                  f"over {runs} runs after {warmup} warm-up, threads {threads or 'default'}")


@cli.command("run")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--inputs", "inputs_path", required=True, type=click.Path(path_type=Path), help=".npz of named inputs.")
@click.option("--outputs", "outputs_path", required=True, type=click.Path(path_type=Path), help=".npz to write the outputs to.")
@json_option
def run_command(artifact: Path, inputs_path: Path, outputs_path: Path, as_json: bool) -> None:
    """Run an artifact (host in-process; other targets under their emulator)."""
    from .verify import load_inputs

    _state["json"] = as_json
    outputs = api.run(artifact, load_inputs(inputs_path))
    np.savez(outputs_path, **outputs)
    summary = {name: {"shape": list(v.shape), "dtype": str(v.dtype)} for name, v in outputs.items()}
    _emit({"ok": True, "outputs": summary, "path": str(outputs_path)},
          "\n".join(f"{n}: {s['dtype']}{s['shape']}" for n, s in summary.items()) + f"\nwrote {outputs_path}")


@cli.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--inputs", "inputs_path", type=click.Path(path_type=Path), help=".npz of named inputs (default: random from the signature).")
@click.option("--model", type=click.Path(path_type=Path), help="Source ONNX model (default: found next to the artifact by its hash).")
@click.option("--dim", multiple=True, metavar="NAME=N", help="Value of a symbolic dimension for random inputs.")
@click.option("--rtol", type=float, help="Max relative error allowed (default by dtype: float32 1e-4).")
@click.option("--min-cosine", type=float, help="Quantized artifacts: min cosine against the float model (default int8 0.99, int4-weight 0.97).")
@click.option("--labels", type=click.Path(path_type=Path), help=".npy/.npz of class indices: adds top-1 accuracy and agreement of the first output.")
@click.option("--per-layer", is_flag=True, help="Quantized artifacts: each quantized layer's output vs the float model, worst first.")
@click.option("--seed", type=int, default=0, show_default=True)
@json_option
def verify_command(artifact: Path, inputs_path: Path | None, model: Path | None, dim: tuple[str, ...],
                   rtol: float | None, seed: int, as_json: bool, min_cosine: float | None, labels: Path | None, per_layer: bool) -> None:
    """Run an artifact and onnxruntime on the same inputs; exit 1 if outside tolerance."""
    _state["json"] = as_json
    report = api.verify(artifact, model=model, inputs=inputs_path, dim=list(dim), rtol=rtol, seed=seed, min_cosine=min_cosine,
                        labels=labels, per_layer=per_layer)
    _emit(report.to_json(), report.table())
    if not report.ok:
        sys.exit(1)


@cli.command("targets")
@click.option("--profile", "profile_files", multiple=True, type=click.Path(path_type=Path), help="Also list a profile of yours (.toml). Repeatable.")
@json_option
def targets_command(profile_files: tuple[Path, ...], as_json: bool) -> None:
    """List target profiles: SoCs with their units, and the units' own profiles."""
    from .targets import all_profiles, load_profile

    _state["json"] = as_json
    profiles = all_profiles() + [load_profile(path) for path in profile_files]
    rows = [f"{'name':<20}{'triple':<19}{'cpu':<13}{'vector':>6}  {'units':<14}features"]
    for p in profiles:
        units = "+".join(p.units) if p.units else "cpu" if not p.triple.startswith("hexagon") else "dsp"
        rows.append(f"{p.name:<20}{p.triple:<19}{p.cpu:<13}{p.vector_bits:>6}  {units:<14}{','.join(p.features) or '(detected)'}")
        for unit, facts in p.units.items():
            shown = ", ".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in facts.items() if k != "ops")
            ops = f", {len(facts['ops'])} ops" if "ops" in facts else ""
            rows.append(f"{'':<20}  {unit}: {shown}{ops}")
    _emit({"targets": [p.summary() for p in profiles]}, "\n".join(rows))


@cli.command("passes")
@json_option
def passes_command(as_json: bool) -> None:
    """List the graph passes in pipeline order."""
    from .passes import STANDARD_PIPELINE

    _state["json"] = as_json
    from .passes.fusion import known_pattern_names

    data = [{"name": p.name, "required": p.required, "does": p.describe()} for p in STANDARD_PIPELINE]
    text = "\n".join(f"{p['name']:<16}{'required' if p['required'] else 'optional':<10}{p['does']}" for p in data)
    _emit({"passes": data, "fusion_patterns": known_pattern_names()},
          text + "\nfusion patterns (--skip-fusion): " + ", ".join(known_pattern_names()))


@cli.command("inspect")
@click.argument("artifact", type=click.Path(path_type=Path))
@json_option
def inspect_command(artifact: Path, as_json: bool) -> None:
    """Show an artifact's target, signature, passes and files (checksums verified)."""
    _state["json"] = as_json
    art = api.load(artifact)
    m = art.manifest
    lines = [f"artifact {art.path}", f"target   {m['target']['name']} ({m['target']['triple']}, {m['target']['cpu']})",
             f"source   {m['source']['file']} sha256 {m['source']['sha256'][:16]} opset {m['source']['opset']}"]
    lines += [f"input    {t['name']}: {t['dtype']}{t['shape']}" for t in m["inputs"]]
    lines += [f"output   {t['name']}: {t['dtype']}{t['shape']}" for t in m["outputs"]]
    for p in m["passes"]:
        scalars = {k: v for k, v in p["stats"].items() if not isinstance(v, (dict, list))}
        lines.append(f"pass     {p['name']:<16}" + " ".join(f"{k}={v}" for k, v in scalars.items()))
        for key, value in p["stats"].items():
            if key == "groups":
                lines += _fused_group_lines(value)
            elif isinstance(value, dict) and value:
                lines.append(f"         {'':<16}{key}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
    if "memory" in m:
        lines.append("memory   " + " ".join(f"{k}={v}" for k, v in m["memory"].items()))
    quant = m.get("quantization", {"scheme": "none"})
    if quant["scheme"] != "none":
        ratio = f" ({quant['weights_ratio']:.1%} of float)" if "weights_ratio" in quant else ""
        lines.append(f"quant    {quant['scheme']} weights {quant['weights_bytes']} bytes{ratio} "
                     + " ".join(f"{k}={v}" for k, v in quant["layers_by_mode"].items()))
        lines += [f"layer    {q['name']:<40}{q['mode']}" for q in quant["quantized"]]
        lines += [f"layer    {q['name']:<40}float: {q['reason']}" for q in quant["kept_float"]]
    lines += _placement_lines(m.get("placement", {}))
    if "code" in m:
        code = m["code"]
        lines.append(f"code     {code['instructions']} instructions in kernel bodies, {code['vector_share']:.1%} vector")
        lines += [f"kernel   {name:<56}{k['instructions']:>7} instr {k['vector_share']:>6.1%} vector  (+{k['wrapper_instructions']} argument checks)"
                  for name, k in code["kernels"].items()]
    lines += [f"file     {name:<28}{f['size']:>12}  {f['sha256'][:16]}" for name, f in m["files"].items()]
    _emit(m, "\n".join(lines))


def _placement_lines(placement: dict[str, Any]) -> list[str]:
    """The partition: the share of ops and MACs on the accelerator, each subgraph, what stayed on the CPU."""
    lines = []
    if placement.get("unit"):
        lines.append(f"place    {placement['unit']}: {placement['subgraphs']} subgraphs, "
                     f"ops {placement['op_share']:.1%} ({placement['ops_on_unit']}/{placement['ops_total']}), "
                     f"MACs {placement['mac_share']:.1%} ({placement['macs_on_unit']}/{placement['macs_total']})")
        lines += [f"subgraph {g['name']:<24}{g['op_count']:>5} ops  in {len(g['inputs'])} out {len(g['outputs'])} "
                  f"crossing {g['crossing_bytes']} bytes" for g in placement["map"]]
        lines += [f"cpu      {op:<24}" + ", ".join(f"{n}x {why}" for why, n in reasons.items())
                  for op, reasons in placement["cpu_ops"].items()]
    lines += [f"unused   {unit}: {why}" for unit, why in placement.get("units_not_used", {}).items()]
    return lines


def _fused_group_lines(groups: Any) -> list[str]:
    """One line per fused group: its function name and the ops it holds."""
    items = groups.items() if isinstance(groups, dict) else enumerate(groups)
    lines = []
    for name, ops in items:
        ops_text = " + ".join(map(str, ops)) if isinstance(ops, (list, tuple)) else str(ops)
        lines.append(f"fused    {str(name):<40}{ops_text}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors with exit code 2 (bad input) or 1 (verification), never a traceback."""
    try:
        cli.main(args=argv, prog_name="socc", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("socc: aborted", err=True)
        sys.exit(130)
    except SoccError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no traceback
        _fail(f"internal error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} (run with --debug for the traceback)", 3)
    sys.exit(0)


def _fail(message: str, code: int) -> None:
    if _state["debug"]:
        traceback.print_exc()
    if _state["json"]:
        click.echo(json.dumps({"ok": False, "error": message, "exit_code": code}))
    click.echo(f"socc: error: {message}", err=True)
    sys.exit(code)
