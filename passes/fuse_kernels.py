"""fuse-kernels: TVM's generic operator fusion over the legalized kernels."""

from __future__ import annotations

from typing import Any

from .base import CompileContext, TvmPhase


class FuseKernels(TvmPhase):
    """Groups injective/elementwise kernels into their producer (conv, matmul, reduction) by TIR op pattern, then merges each group into one TIR function, so fewer kernels run and fewer intermediates are stored."""

    name = "fuse-kernels"

    def transforms(self, ctx: CompileContext) -> list[Any]:
        from tvm import relax

        return [relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
