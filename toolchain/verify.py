"""Verification: run an artifact and onnxruntime on the same inputs, compare every output.

Errors are measured as
  max_abs  = max |artifact - reference|
  max_rel  = max_abs / max |reference|   (relative to the output's scale, so zeros don't explode it)
  cosine   = cosine similarity of the flattened outputs.
  sqnr_db  = 10 log10(sum reference^2 / sum (artifact - reference)^2), the signal-to-quantization-noise ratio.
An output passes when max_rel <= its dtype's tolerance (or exact equality for integer outputs).
A quantized artifact is compared with the float model it came from: a float output passes when
its cosine >= the scheme's minimum (DEFAULT_MIN_COSINE, or `min_cosine`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import Artifact
from .errors import ArtifactError, UserError
from .importer import parse_dim_values

# Default max relative error by output dtype (0 means exact).
DEFAULT_TOLERANCE = {"float32": 1e-4, "float64": 1e-9, "float16": 1e-2, "bfloat16": 2e-2}
# Minimum cosine against the float model for quantized artifacts, by scheme.
# Pre-quantized models (qdq, matmul-nbits, matmul-integer) are compared with themselves run by
# onnxruntime, whose x86 integer kernels can differ from the ONNX arithmetic (its AVX2 u8s8 path
# saturates int16 sums without reduce_range): by cosine too, with a tight bound.
DEFAULT_MIN_COSINE = {"int8": 0.99, "int4-weight": 0.97, "qdq": 0.999, "matmul-nbits": 0.999, "matmul-integer": 0.999}
# Symbolic dims of random inputs: batch-like names get 1, others this value.
DEFAULT_SYMBOLIC_DIM = 8


@dataclasses.dataclass
class OutputComparison:
    name: str
    dtype: str
    shape: list[int]
    max_abs: float
    max_rel: float
    cosine: float
    sqnr_db: float
    tolerance: float
    ok: bool
    criterion: str = "max_rel"


@dataclasses.dataclass
class TopOneReport:
    """Classification view of one output against labels: argmax over its last axis."""

    output: str
    samples: int
    accuracy: float  # the artifact's top-1 accuracy on the labels
    reference_accuracy: float  # the reference model's
    agreement: float  # how often the artifact's top-1 equals the reference's


@dataclasses.dataclass
class VerifyReport:
    artifact: str
    target: str
    reference: str
    inputs: str
    outputs: list[OutputComparison]
    top1: TopOneReport | None = None
    layers: list[Any] | None = None  # --per-layer: layerwise.LayerError, worst SQNR first

    WORST_LAYERS_SHOWN = 10

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}

    def table(self) -> str:
        lines = [f"verify {self.artifact} ({self.target}) against onnxruntime on {self.reference}; inputs: {self.inputs}"]
        lines.append(f"{'output':<24}{'shape':<20}{'max_abs':>12}{'max_rel':>12}{'cosine':>12}{'sqnr_db':>9}{'pass if':>18}  result")
        for o in self.outputs:
            rule = f"cosine>={o.tolerance}" if o.criterion == "cosine" else f"max_rel<={o.tolerance:.0e}" if o.tolerance else "exact"
            lines.append(
                f"{o.name:<24}{str(o.shape):<20}{o.max_abs:12.3e}{o.max_rel:12.3e}{o.cosine:12.8f}{o.sqnr_db:9.1f}{rule:>18}  {'ok' if o.ok else 'FAIL'}"
            )
        if self.top1 is not None:
            t = self.top1
            lines.append(f"top-1 on {t.samples} labels ({t.output}): artifact {t.accuracy:.2%}, reference {t.reference_accuracy:.2%}, "
                         f"agreement {t.agreement:.2%}")
        if self.layers is not None:
            shown = self.layers[: self.WORST_LAYERS_SHOWN]
            lines.append(f"per layer vs the float model, worst {len(shown)} of {len(self.layers)} quantized layers "
                         "(errors accumulate from the input on):")
            lines += [f"  {e.name:<40}{e.op_type:<8}{e.mode:<13}{e.sqnr_db:7.1f} dB  cosine {e.cosine:.6f}  max_abs {e.max_abs:.3e}"
                      for e in shown]
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def compare(name: str, actual: np.ndarray, reference: np.ndarray, rtol: float | None = None,
            min_cosine: float | None = None) -> OutputComparison:
    dtype = str(reference.dtype)
    by_cosine = min_cosine is not None and reference.dtype.kind == "f"
    tolerance = min_cosine if by_cosine else rtol if rtol is not None else DEFAULT_TOLERANCE.get(dtype, 0.0)
    criterion = "cosine" if by_cosine else "max_rel"
    if actual.shape != reference.shape:
        return OutputComparison(name, dtype, list(reference.shape), float("inf"), float("inf"), 0.0, float("-inf"), tolerance, False, criterion)
    a = actual.astype(np.float64).ravel()
    r = reference.astype(np.float64).ravel()
    max_abs = float(np.max(np.abs(a - r))) if a.size else 0.0
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    norms = float(np.linalg.norm(a) * np.linalg.norm(r))
    cosine = float(np.dot(a, r) / norms) if norms > 0 else float(np.array_equal(a, r))
    noise = float(np.sum((a - r) ** 2))
    sqnr_db = float(10 * np.log10(float(np.sum(r ** 2)) / noise)) if noise > 0 and np.any(r) else float("inf")
    finite = bool(np.all(np.isfinite(a)) == np.all(np.isfinite(r)))
    if by_cosine:
        ok = finite and cosine >= tolerance
    else:
        ok = finite and (max_rel <= tolerance if tolerance > 0 else max_abs == 0.0)
    return OutputComparison(name, dtype, list(reference.shape), max_abs, max_rel, cosine, sqnr_db, tolerance, ok, criterion)


def find_source_model(artifact: Artifact, model: str | Path | None) -> Path:
    """The ONNX file the artifact was built from: `model`, or a file next to the artifact with the manifest's hash."""
    source = artifact.manifest["source"]
    if model is not None:
        path = Path(model)
        if not path.is_file():
            raise UserError(f"{path}: no such model file")
        return path
    folder = artifact.path.resolve().parent
    candidates = [folder / source["file"], *sorted(folder.glob("*.onnx"))]
    for path in candidates:
        if path.is_file() and _sha256(path) == source["sha256"]:
            return path
    raise UserError(f"source model {source['file']} (sha256 {source['sha256'][:12]}...) not found next to {artifact.path}; pass --model PATH")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def random_inputs(specs: Sequence[Mapping[str, Any]], dims: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs from the manifest's signature: normal floats, small non-negative ints (valid ids and masks)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in specs:
        shape = [d if isinstance(d, int) else dims.get(d, 1 if "batch" in d.lower() else DEFAULT_SYMBOLIC_DIM) for d in spec["shape"]]
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            arrays[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            arrays[spec["name"]] = rng.integers(0, 2, shape).astype(bool)
        else:
            arrays[spec["name"]] = rng.integers(0, 2, shape).astype(dtype)
    return arrays


def load_inputs(source: str | Path) -> dict[str, np.ndarray]:
    path = Path(source)
    if not path.is_file():
        raise UserError(f"{path}: no such inputs file")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: not a .npz file of arrays ({exc})") from None


def run_reference(model: Path, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("verification needs onnxruntime: pip install 'socc[verify]'") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    results = session.run(list(output_names), dict(inputs))
    return dict(zip(output_names, results))


def verify_artifact(
    artifact: Artifact,
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
    """Compares with onnxruntime on the source model; a quantized artifact by cosine (see module doc).

    `labels` (an integer array, or a .npy/.npz file holding one) adds top-1 accuracy and agreement
    of the first output, read as class scores over its last axis. `per_layer` (quantized artifacts)
    adds every quantized layer's output against the float model's, worst first (layerwise.py)."""
    scheme = artifact.manifest.get("quantization", {}).get("scheme", "none")
    if min_cosine is None and scheme != "none":
        min_cosine = DEFAULT_MIN_COSINE[scheme]
    source = find_source_model(artifact, model)
    if inputs is None:
        feed = random_inputs(artifact.inputs, parse_dim_values(dim, "--dim"), seed)
        described = f"random (seed {seed})"
    elif isinstance(inputs, (str, Path)):
        feed, described = load_inputs(inputs), str(inputs)
    else:
        feed, described = {k: np.asarray(v) for k, v in inputs.items()}, "given arrays"
    names = [o["name"] for o in artifact.outputs]
    actual = artifact.run(feed)
    try:
        reference = run_reference(source, feed, names)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors, one line
        raise ArtifactError(f"onnxruntime failed on {source}: {str(exc).strip().splitlines()[0]}") from None
    comparisons = [compare(name, np.asarray(actual[name]), np.asarray(reference[name]), rtol, min_cosine) for name in names]
    top1 = None if labels is None else top_one(names[0], np.asarray(actual[names[0]]), np.asarray(reference[names[0]]), load_labels(labels))
    layers = None
    if per_layer:
        from .layerwise import per_layer_errors  # the compiler: the model is quantized again to look inside

        layers = per_layer_errors(artifact, source, feed)
    return VerifyReport(str(artifact.path), artifact.target["name"], str(source), described, comparisons, top1, layers)


def load_labels(labels: Any) -> np.ndarray:
    if isinstance(labels, (str, Path)):
        path = Path(labels)
        if not path.is_file():
            raise UserError(f"{path}: no such labels file")
        try:
            data = np.load(path, allow_pickle=False)
            if isinstance(data, np.lib.npyio.NpzFile):
                with data:
                    if len(data.files) != 1:
                        raise UserError(f"{path}: a labels .npz must hold one array, it holds {len(data.files)}")
                    data = data[data.files[0]]
        except (ValueError, OSError) as exc:
            raise UserError(f"{path}: not a .npy/.npz of labels ({exc})") from None
        labels = data
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise UserError(f"labels must be integers (class indices), got {labels.dtype}")
    return labels.ravel()


def top_one(name: str, actual: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> TopOneReport:
    predicted = actual.reshape(-1, actual.shape[-1]).argmax(axis=1)
    expected = reference.reshape(-1, reference.shape[-1]).argmax(axis=1)
    if len(labels) != len(predicted):
        raise UserError(f"{len(labels)} labels for {len(predicted)} predictions of output {name!r}")
    return TopOneReport(name, len(labels), float(np.mean(predicted == labels)), float(np.mean(expected == labels)),
                        float(np.mean(predicted == expected)))
