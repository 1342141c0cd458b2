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
    section = {
        "planner": "socc memory-plan" if plan else ("tvm static-plan" if static else "none"),
        "weights_bytes": weights,
        "arena_bytes": arena,
        "lower_bound_bytes": plan["lower_bound_bytes"] if plan else None,
        "tvm_default_bytes": plan["tvm_default_bytes"] if plan else static.get("planned_bytes"),
        "peak_bytes": weights + arena,
    }
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


def write_report(folder: Path, manifest: dict[str, Any], memory: dict[str, Any], timeline: dict[str, Any] | None) -> None:
    """report.md (and memory.png when our planner ran) for a person reading the artifact."""
    lines = [
        f"# socc build report: {manifest['source']['file']} for {manifest['target']['name']}",
        "",
        f"- source sha256 `{manifest['source']['sha256']}`, opset {manifest['source']['opset']}",
        f"- target `{manifest['target']['name']}`: {manifest['target']['description']}",
        f"- inputs: " + ", ".join(f"`{t['name']}` {t['dtype']}{t['shape']}" for t in manifest["inputs"]),
        f"- outputs: " + ", ".join(f"`{t['name']}` {t['dtype']}{t['shape']}" for t in manifest["outputs"]),
        "",
        "## Passes",
        "",
        "| pass | ops before | ops after | kernels before | kernels after |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for record in manifest["passes"]:
        s = record["stats"]
        lines.append(f"| {record['name']} | {s.get('ops_before', '')} | {s.get('ops_after', '')} | {s.get('kernels_before', '')} | {s.get('kernels_after', '')} |")
    lines += ["", "## Memory", "", "| | bytes |", "| --- | ---: |"]
    lines += [f"| {key} | {value} |" for key, value in memory.items() if isinstance(value, int)]
    if timeline is not None:
        from .passes.memory_plan import plot_memory, report_markdown

        plan = next(r["stats"] for r in manifest["passes"] if r["name"] == "memory-plan")
        lines += ["", report_markdown(plan, timeline), "", "![memory over the program](memory.png)"]
        plot_memory(timeline, plan, folder / "memory.png")
    (folder / "report.md").write_text("\n".join(lines) + "\n")
