"""lower-vm: the last step before VM code generation."""

from __future__ import annotations

from typing import Any

from .base import CompileContext, TvmPhase


class LowerVM(TvmPhase):
    """Lowers tensor allocations to VM builtins, frees each tensor after its last use, lowers shape computations and runtime builtins, and names the entry functions."""

    name = "lower-vm"
    required = True

    def transforms(self, ctx: CompileContext) -> list[Any]:
        from tvm import relax

        return [
            relax.transform.LowerAllocTensor(),
            relax.transform.KillAfterLastUse(),
            relax.transform.LowerRuntimeBuiltin(),
            relax.transform.ComputePrimValue(),
            relax.transform.VMShapeLower(),
            relax.transform.AttachGlobalSymbol(),
        ]
