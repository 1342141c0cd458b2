"""decompose: inference-only rewrites of composite ops into primitive ones."""

from __future__ import annotations

from typing import Any

from .base import CompileContext, TvmPhase


class Decompose(TvmPhase):
    """Rewrites batch_norm, layer_norm-style composites and tensor-to-shape into primitive Relax ops for inference, and canonicalizes trivial bindings."""

    name = "decompose"

    def transforms(self, ctx: CompileContext) -> list[Any]:
        from tvm import relax

        return [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings()]
