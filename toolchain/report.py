"""The build report: the manifest's `memory` section, `report.md` and `memory.png` in the artifact."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UserError
from .pipeline import PassRecord


def memory_section(mod: Any, records: Sequence[PassRecord], budget_bytes: int | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Weights, arena, lower bound and TVM's default for the lowered module; refuses a plan over budget."""
    from .passes.memory_plan import MemoryBudgetExceeded, check_budget, largest_tensors, memory_timeline
    from .passes.stats import constant_bytes

    weights = constant_bytes(mod)
    plan = next((r.stats for r in records if r.name == "memory-plan" and "arena_bytes" in r.stats), None)
    static = next((r.stats for r in records if r.name == "static-plan"), {})
    arena = plan["arena_bytes"] if plan else static.get("planned_bytes", 0)
    # a partitioned program: each subgraph planned its own arena; counted on top of main's (an upper bound)
    parts = {name: stats.get("arena_bytes", 0) for name, stats in (plan or {}).get("parts", {}).items()}
    arena += sum(parts.values())
    section = {
        "planner": "socc memory-plan" if plan else ("tvm static-plan" if static else "none"),
        "weights_bytes": weights,
        "arena_bytes": arena,
        "lower_bound_bytes": plan["lower_bound_bytes"] if plan else None,
        "tvm_default_bytes": plan["tvm_default_bytes"] if plan else static.get("planned_bytes"),
        "peak_bytes": weights + arena,
    }
    if parts:
        section["subgraph_arena_bytes"] = parts
    if plan and plan.get("bounded_dims"):
        section["bounded_dims"] = plan["bounded_dims"]
    if plan and plan.get("unplanned_dynamic"):
        section["unplanned_dynamic"] = plan["unplanned_dynamic"]
    timeline = memory_timeline(mod) if plan else None
    if budget_bytes is not None:
        try:
            check_budget(weights, arena, budget_bytes, largest_tensors(timeline) if timeline else [])
        except MemoryBudgetExceeded as exc:
            raise UserError(str(exc)) from None
    return section, timeline


def quantization_section(records: Sequence[PassRecord], memory: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `quantization` section: scheme, observer, samples, layers kept in float, bytes."""
    stats = next((r.stats for r in records if r.name == "quantize"), {"scheme": "none"})
    if stats.get("scheme", "none") == "none":
        return {"scheme": "none"}
    keys = ("scheme", "activation_dtype", "observer", "calibration_samples", "weight_scheme", "group_size",
            "int8_embeddings", "tied_int8_matmuls", "rounding", "requantize", "folded_requantizes", "integer_requantized", "integer_residual_adds", "integer_mean_pools", "integer_output_biases", "padded_matmul_columns", "split_matmul_columns", "split_conv_channels", "padded_conv_channels", "integer_matmuls", "layers_by_mode", "weights_bytes_float", "sensitivity")
    section = {key: stats[key] for key in keys if key in stats}
    section["weights_bytes"] = memory["weights_bytes"]  # of the built module: what ships
    if "weights_bytes_float" in stats:  # not for models that came quantized without float weights (MatMulInteger)
        section["weights_ratio"] = round(memory["weights_bytes"] / max(stats["weights_bytes_float"], 1), 4)
    section["kept_float"] = [{"name": layer["name"], "op_type": layer["op_type"], "reason": layer["reason"]}
                             for layer in stats["layers"] if layer["mode"] == "float"]
    section["quantized"] = [layer for layer in stats["layers"] if layer["mode"] != "float"]
    return section


NO_NNAPI_CODEGEN = ("this TVM build has no NNAPI codegen (relax.ext.nnapi is not in the apache-tvm wheel), so the "
                    "APU subgraphs are compiled for the CPU into model.so, each called as its own function")


def placement_section(records: Sequence[PassRecord], units: dict[str, dict[str, Any]], accelerator: str) -> dict[str, Any]:
    """The manifest's `placement` section: which unit runs which part (the partition map), and the
    SoC's units that this build leaves unused, with the profile's reason."""
    stats = next((r.stats for r in records if r.name == "partition"), {})
    section: dict[str, Any] = {"accelerator": accelerator or None}
    if stats.get("unit"):
        section.update({key: value for key, value in stats.items() if key not in ("parts", "note")})
        section["subgraphs_built_for"] = "cpu"
        section["why"] = NO_NNAPI_CODEGEN
    elif stats.get("note"):
        section["note"] = stats["note"]
    unused = {name: facts["offload"] for name, facts in units.items() if "offload" in facts}
    if accelerator and not stats.get("subgraphs"):
        unused[accelerator] = stats.get("note", "no subgraph worth a dispatch: the whole model runs on the CPU")
    if unused:
        section["units_not_used"] = unused
    return section


def code_section(counts: dict[str, dict[str, int]], vector_pattern: str) -> dict[str, Any]:
    """The manifest's `code` section: per kernel, instructions in its body, the vector ones and their share."""
    kernels = {}
    for name, entry in sorted(counts.items()):
        share = entry["vector_instructions"] / entry["instructions"] if entry["instructions"] else 0.0
        kernels[name] = {**entry, "vector_share": round(share, 4)}
    total = sum(k["instructions"] for k in kernels.values())
    vector = sum(k["vector_instructions"] for k in kernels.values())
    return {
        "vector_pattern": vector_pattern,
        "instructions": total,
        "vector_instructions": vector,
        "vector_share": round(vector / total, 4) if total else 0.0,
        "kernels": kernels,
    }


def write_report(folder: Path, manifest: dict[str, Any], memory: dict[str, Any], timeline: dict[str, Any] | None) -> None:
    """report.md (and memory.png when our planner ran) for a person reading the artifact."""
    lines = [
        f"# socc build report: {manifest['source']['file']} for {manifest['target']['name']}",
        "",
        f"- source sha256 `{manifest['source']['sha256']}`, opset {manifest['source']['opset']}",
        f"- target `{manifest['target']['name']}`: {manifest['target']['description']}",
        "- inputs: " + ", ".join(f"`{t['name']}` {t['dtype']}{t['shape']}" for t in manifest["inputs"]),
        "- outputs: " + ", ".join(f"`{t['name']}` {t['dtype']}{t['shape']}" for t in manifest["outputs"]),
        "",
        "## Passes",
        "",
        "| pass | ops before | ops after | kernels before | kernels after |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for record in manifest["passes"]:
        s = record["stats"]
        lines.append(f"| {record['name']} | {s.get('ops_before', '')} | {s.get('ops_after', '')} | {s.get('kernels_before', '')} | {s.get('kernels_after', '')} |")
    quant = manifest.get("quantization", {})
    if quant.get("scheme", "none") != "none":
        lines += ["", "## Quantization", "",
                  f"- scheme {quant['scheme']}; weights {quant['weights_bytes']} bytes"
                  + (f" = {quant['weights_ratio']:.1%} of float ({quant['weights_bytes_float']} bytes)" if "weights_ratio" in quant else "")
                  + f"; layers by mode: {quant['layers_by_mode']}", "",
                  "| layer | op | mode | why float |", "| --- | --- | --- | --- |"]
        lines += [f"| {layer['name']} | {layer['op_type']} | {layer['mode']} | |" for layer in quant["quantized"]]
        lines += [f"| {layer['name']} | {layer['op_type']} | float | {layer['reason']} |" for layer in quant["kept_float"]]
    lines += ["", "## Memory", "", "| | bytes |", "| --- | ---: |"]
    lines += [f"| {key} | {value} |" for key, value in memory.items() if isinstance(value, int)]
    if timeline is not None:
        from .passes.memory_plan import plot_memory, report_markdown

        plan = next(r["stats"] for r in manifest["passes"] if r["name"] == "memory-plan")
        lines += ["", report_markdown(plan, timeline), "", "![memory over the program](memory.png)"]
        plot_memory(timeline, plan, folder / "memory.png")
    (folder / "report.md").write_text("\n".join(lines) + "\n")
