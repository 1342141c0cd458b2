"""What every pass is: a named rewrite of a Relax module that returns its stats.

Passes learn about the target through `CompileContext`, never by importing `targets/`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar


@dataclasses.dataclass(frozen=True)
class CompileContext:
    """Facts a pass may use: the TVM target, the profile's data, and the user's options."""

    target: Any  # tvm.target.Target
    target_name: str
    features: tuple[str, ...] = ()
    vector_bits: int = 0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Calibration samples for quantization: a factory of fresh iterators of {input name: array}.
    calibration: Callable[[], Iterator[Mapping[str, Any]]] | None = None
    # The source model's node names per ONNX op type, in graph order (names quantized layers).
    source_nodes: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # A pre-quantized model's 4-bit matmul codes by the SHA-256 of the dequantized float weight.
    int4_weights: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Facts of the unit `partition` places subgraphs on (ops, dtypes, max_rank, min_macs); empty: none.
    accelerator: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # MetaSchedule database folders, searched in order (`apply-tuning`); empty: no tuning records.
    tuning_databases: tuple[str, ...] = ()
    vector_float: bool = True  # False: the vector unit must not be given float math (HVX under qemu)
    parallel: bool = False  # kernels may run loops on the TVM runtime's thread pool (not in a static program)


class PassInputError(ValueError):
    """The user's data or options cannot be used by a pass (the driver reports it as a user error)."""


class GraphPass:
    """Base class: subclasses set `name`, write a docstring saying what they rewrite, and `run`."""

    name: ClassVar[str] = ""
    # A required pass is one the build cannot do without (lowering to VM code): not skippable.
    required: ClassVar[bool] = False

    def run(self, mod: Any, ctx: CompileContext) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    @classmethod
    def describe(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]


class TvmPhase(GraphPass):
    """A pass made of a fixed sequence of TVM transforms, measured by ops and kernels before/after."""

    def transforms(self, ctx: CompileContext) -> list[Any]:
        raise NotImplementedError

    def extra_stats(self, before: Any, after: Any) -> dict[str, Any]:
        return {}

    def run(self, mod: Any, ctx: CompileContext) -> tuple[Any, dict[str, Any]]:
        import tvm

        from .stats import count_kernels, count_ops

        ops_before, kernels_before = sum(count_ops(mod).values()), count_kernels(mod)
        with ctx.target:
            result = tvm.transform.Sequential(self.transforms(ctx))(mod)
        stats = {
            "ops_before": ops_before,
            "ops_after": sum(count_ops(result).values()),
            "kernels_before": kernels_before,
            "kernels_after": count_kernels(result),
        }
        stats.update(self.extra_stats(mod, result))
        return result, stats
