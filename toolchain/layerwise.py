"""Per-layer errors of a quantized artifact (`socc verify --per-layer`): which layer breaks the model.

The source model is imported again with the artifact's options and taken through the passes up
to `quantize` twice: the float module, and the quantized one (same calibration, same scales).
Every quantized layer's output (its conv/matmul/gather, before bias and activation; dequantized
to float in the quantized module) is tapped in both, both are run on the host on the verify
inputs, and each pair is compared: cosine, SQNR and max error. The error is end to end: a layer's
output carries the quantization error of every layer before it, so the first layer whose SQNR
drops is the one to look at (or to keep in float with --exclude-node).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import Artifact
from .errors import UserError
from .progress import Progress
from .verify import compare


@dataclasses.dataclass
class LayerError:
    name: str  # the source node's name
    op_type: str
    mode: str  # int8 | int8-weight | int4-weight
    shape: list[int]
    cosine: float
    sqnr_db: float
    max_abs: float


def _binding_vars(func: Any) -> dict[int, Any]:
    """Each binding's var, by the hash of its value (an IR node's identity)."""
    return {binding.value.__hash__(): binding.var for block in func.body.blocks for binding in block.bindings}


def _vars_by_name(func: Any) -> dict[str, Any]:
    return {str(binding.var.name): binding.var for block in func.body.blocks for binding in block.bindings}


def _run_taps(mod: Any, taps: list[Any], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    from .passes.calibrate import collect

    class Keep:
        def update(self, value: np.ndarray) -> None:
            self.value = value

    kept, _ = collect(mod, taps, lambda: iter([feed]), Keep)
    return [k.value for k in kept]


def per_layer_errors(artifact: Artifact, source: Path, feed: Mapping[str, np.ndarray]) -> list[LayerError]:
    """Every quantized layer of the artifact, its output against the float model's, worst SQNR first."""
    from .api import _import_with_context, _quantize_options, _rebuild_quantize_options
    from .importer import MAX_MODEL_BYTES, MAX_TENSOR_ELEMENTS, Limits
    from .passes.quantize import find_layers
    from .pipeline import run_passes, select_passes
    from .targets import load_profile

    options = artifact.manifest.get("options", {})
    if not options.get("quantize"):
        raise UserError("--per-layer needs a quantized artifact (this one was built without --quantize)")
    quantize_options = _rebuild_quantize_options(options)
    calibration = quantize_options.get("calibration")
    if calibration is not None and not Path(calibration).exists():
        raise UserError(f"--per-layer quantizes the model again and needs its calibration data: {calibration} is gone")
    profile = load_profile("host")  # a layer's quantized values are the same on every target
    pass_options = {"shape": options.get("shape", {}), "max_shape": {}, "skip_fusion": options.get("skip_fusion", []),
                    **_quantize_options(**quantize_options), "tap_layers": True}
    log = Progress(enabled=False)
    imported, ctx = _import_with_context(source, profile, options.get("shape", {}), Limits(MAX_MODEL_BYTES, MAX_TENSOR_ELEMENTS),
                                         bool(options.get("no_simplify")), calibration, pass_options, log, None)
    selected = select_passes(profile.default_passes)
    names = [p.name for p in selected]
    float_mod, _ = run_passes(imported.mod, selected[: names.index("quantize")], ctx, log)
    quant_mod, records = run_passes(float_mod, [selected[names.index("quantize")]], ctx, log)
    modes = {layer["name"]: layer["mode"] for layer in records[0].stats.get("layers", [])}
    taps = records[0].stats.get("taps", {})  # layer name -> the name of its output var in the quantized module

    float_main, quant_main = float_mod["main"], quant_mod["main"]
    float_vars, quant_vars = _binding_vars(float_main), _vars_by_name(quant_main)
    pairs = []
    for layer in find_layers(float_main, ctx.source_nodes):
        if modes.get(layer.name, "float") == "float":
            continue
        float_var = float_vars.get(layer.call.__hash__())
        quant_var = quant_vars.get(taps.get(layer.name, ""))
        if float_var is not None and quant_var is not None:
            pairs.append((layer, float_var, quant_var))
    if not pairs:
        return []
    float_values = _run_taps(float_mod, [p[1] for p in pairs], feed)
    quant_values = _run_taps(quant_mod, [p[2] for p in pairs], feed)
    errors = [_layer_error(layer, modes[layer.name], f, q) for (layer, _, _), f, q in zip(pairs, float_values, quant_values)]
    return sorted(errors, key=lambda e: e.sqnr_db)


def _layer_error(layer: Any, mode: str, reference: np.ndarray, actual: np.ndarray) -> LayerError:
    measured = compare(layer.name, actual, reference)  # verify's own metrics, as for model outputs
    return LayerError(layer.name, layer.op_type, mode, measured.shape, measured.cosine, measured.sqnr_db, measured.max_abs)
