"""The native kernels (`_kernels.c`, `_methods.c`), where the package was built with them.

They give the same bytes as the torch paths, 1.6-1.7x faster for the linear merge pass itself on
a CPU. A build without a C compiler has no `_kernels`, and merges take the torch path.
SDMERGE_NATIVE=0 turns them off too (for comparisons). Importing this module does not import
torch: a linear merge the native kernel serves never needs it (execute.py).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import TYPE_CHECKING

from .buffers import HostBuffer

try:
    from . import _kernels
except ImportError:  # built without a C compiler
    _kernels = None

if TYPE_CHECKING:
    import torch

    from .plan import KeyPlan, Plan, Term

KINDS = {"F16": 0, "BF16": 1, "F32": 2}  # the element types the kernels read and write, by safetensors name
LARGEST = {"F16": 65504.0, "BF16": 3.3895313892515355e38, "F32": 3.4028234663852886e38}  # finite maxima


@functools.cache
def torch_kinds() -> dict[torch.dtype, int]:
    """KINDS by torch dtype."""
    import torch

    return {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def native() -> ModuleType | None:
    """The native module, or None where it is not built or turned off."""
    if os.environ.get("SDMERGE_NATIVE", "1") == "0":
        return None
    return _kernels


def describe() -> str:
    if _kernels is None:
        return "torch (the native kernel is not built: install with a C compiler)"
    if native() is None:
        return "torch (SDMERGE_NATIVE=0)"
    return f"native ({_kernels.ISA})"


def serves(plan: Plan, key: KeyPlan) -> bool:
    """Whether the weighted sum kernel takes this key: linear, its output and sources fp16, bf16
    or fp32."""
    return (key.expression is None and key.dtype in KINDS
            and all(plan.inputs[t.input].checkpoint.tensors[t.key].dtype in KINDS for t in key.terms))


class NativeSum:
    """A linear key's weighted sum over elements [start, stop) in one native call: each source
    read once from its mapped file, summed in fp32 in cache and rounded once into the output's
    bytes. Torch-free, so a merge it serves whole never imports torch (execute.py); the torch
    accumulator (accumulate.py) uses it too. One per thread: the staging buffers are its own."""

    def __init__(self, plan: Plan, chunk: int, check_finite: bool):
        self.plan, self.chunk, self.check_finite = plan, chunk, check_finite
        self.native = native()
        self.stagings: list[HostBuffer] = []  # one per term, made when a source is unaligned
        self.out: HostBuffer | None = None

    def sum_at(self, key: KeyPlan, start: int, stop: int, address: int) -> bool:
        """Write the rounded sum at `address`; False where something is not finite and that is
        an error (nothing is raised here: the torch path then names the model at fault)."""
        terms = []
        for j, term in enumerate(key.terms):
            checkpoint = self.plan.inputs[term.input].checkpoint
            terms.append((checkpoint.address_of(term.key, start, stop, self._staging(j)),
                          KINDS[self._dtype(term)], term.coefficient))
        limit = LARGEST[key.dtype] if self.check_finite else float("inf")
        in_range = self.native.weighted_sum(address, KINDS[key.dtype], stop - start, terms, limit)
        for term in key.terms:  # a file that shrank under its mapping was read as zeros: refuse them
            self.plan.inputs[term.input].checkpoint.check_intact(term.key)
        return in_range or not self.check_finite

    def output(self) -> HostBuffer:
        """A buffer for one chunk's result, where it cannot go straight into the output's block."""
        if self.out is None:
            self.out = HostBuffer(self.chunk * 8)
        return self.out

    def serves(self, key: KeyPlan) -> bool:
        return self.native is not None and serves(self.plan, key)

    def _dtype(self, term: Term) -> str:
        return self.plan.inputs[term.input].checkpoint.tensors[term.key].dtype

    def _staging(self, j: int) -> HostBuffer:
        while len(self.stagings) <= j:  # pages are only touched if a source is unaligned
            self.stagings.append(HostBuffer(self.chunk * 8))
        return self.stagings[j]

    def close(self) -> None:
        for buffer in [*self.stagings, *([self.out] if self.out else [])]:
            buffer.close()
        self.stagings, self.out = [], None

