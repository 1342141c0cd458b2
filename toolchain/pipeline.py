"""The pass pipeline: which passes run, in what order, with their stats and timings."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from .errors import BuildError, SoccError, UserError
from .passes import REGISTRY, STANDARD_PIPELINE, CompileContext, GraphPass
from .passes.base import PassInputError
from .progress import SILENT, Progress


@dataclasses.dataclass
class PassRecord:
    name: str
    stats: dict[str, Any]
    seconds: float


def select_passes(
    default: Sequence[str] = (),
    passes: Sequence[str] | None = None,
    skip_pass: Sequence[str] = (),
) -> list[type[GraphPass]]:
    """The passes to run, in pipeline order.

    `default` is the target profile's list (empty: all standard passes); `passes` replaces it;
    `skip_pass` removes names from it. Required passes (lowering) always run: naming one in
    `skip_pass` is an error, and leaving one out of `passes` keeps it anyway.
    """
    for name in [*(passes or ()), *skip_pass, *default]:
        if name not in REGISTRY:
            raise UserError(f"unknown pass {name!r}; known passes: {', '.join(REGISTRY)}")
    for name in skip_pass:
        if REGISTRY[name].required:
            raise UserError(f"pass {name!r} is required by the build and cannot be skipped")
    chosen = set(passes if passes is not None else (default or REGISTRY))
    chosen -= set(skip_pass)
    return [p for p in STANDARD_PIPELINE if p.name in chosen or p.required]


def check_fusion_names(skip_fusion: Sequence[str]) -> None:
    """`--skip-fusion` takes fusion pattern or family names; anything else is a one-line error."""
    from .passes.fusion import known_pattern_names

    unknown = [name for name in skip_fusion if name not in known_pattern_names()]
    if unknown:
        raise UserError(f"unknown fusion pattern {unknown[0]!r}; known: {', '.join(known_pattern_names())}")


def run_passes(
    mod: Any,
    selected: Sequence[type[GraphPass]],
    ctx: CompileContext,
    progress: Progress = SILENT,
) -> tuple[Any, list[PassRecord]]:
    """Runs the passes in order. After `partition` outlines subgraphs for another unit, each part
    (CPU `main` and every subgraph) goes through the remaining passes on its own, and the parts are
    linked into one module at the end; a record's stats are main's, each subgraph's under "parts"."""
    from .passes.partition import merge_parts, split_parts

    records = []
    parts = {"main": mod}
    for pass_type in selected:
        with progress.stage(pass_type.name) as summary:
            part_stats = {}
            for part_name, part in parts.items():
                parts[part_name], part_stats[part_name] = _run_one(pass_type, part, ctx)
            stats = part_stats.pop("main")
            if part_stats:
                stats["parts"] = part_stats
            summary.update({k: v for k, v in stats.items() if k in ("ops_after", "kernels_after", "subgraphs")})
        records.append(PassRecord(pass_type.name, stats, progress.seconds.get(pass_type.name, 0.0)))
        if pass_type.name == "partition":
            parts = split_parts(parts["main"])
    return merge_parts(parts), records


def _run_one(pass_type: type[GraphPass], mod: Any, ctx: CompileContext) -> tuple[Any, dict[str, Any]]:
    try:
        return pass_type().run(mod, ctx)
    except PassInputError as exc:
        raise UserError(f"{pass_type.name}: {exc}") from None
    except SoccError:
        raise
    except Exception as exc:  # noqa: BLE001 - a TVM failure becomes one line naming the pass
        text = str(exc).strip().splitlines()
        raise BuildError(f"pass {pass_type.name} failed: {type(exc).__name__}: {text[-1] if text else ''}") from exc
