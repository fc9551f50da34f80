"""Summing one chunk of one output tensor: on the CPU, or on an accelerator.

Each worker thread owns one accumulator and its buffers, sized to the chunk, so memory does not
grow with the number of models or their size.

On the CPU, an fp32 sum of fp16/bf16/fp32 sources is one call to the native kernel (kernels.py):
each source read once, summed in cache and rounded into the output. Otherwise (fp64 sums, other
dtypes, or a build without the kernel) sources are widened into a reused fp32 (or fp64) scratch
buffer and then added: same-dtype adds beat torch's mixed-dtype in-place add several times over.
Both give the same bytes.

On a GPU, sources are read (positioned reads, no mapping) into two pinned host buffers in turn,
so reading the next source overlaps the copy of the previous one to the device; the sum stays on
the device and only the rounded result comes back.
"""

from __future__ import annotations

import torch

from . import kernels
from .checkpoint import ITEMSIZE, torch_dtype
from .errors import NonFiniteError
from .plan import KeyPlan, Plan


def add_term(acc: torch.Tensor, src: torch.Tensor, coefficient: float, first: bool,
             scratch: torch.Tensor | None) -> torch.Tensor:
    """acc (+)= coefficient * src. On the CPU, narrow sources are widened into `scratch` first:
    that and a same-dtype add beat torch's mixed-dtype in-place add several times over."""
    if first:
        acc.copy_(src)
        if coefficient != 1.0:
            acc.mul_(coefficient)
        return acc
    if scratch is not None and src.dtype != acc.dtype:
        src = scratch.copy_(src)
    return acc.add_(src, alpha=coefficient)


class CpuAccumulator:
    def __init__(self, plan: Plan, acc_dtype: torch.dtype, chunk: int, check_finite: bool):
        self.plan, self.check_finite, self.chunk = plan, check_finite, chunk
        native = acc_dtype == torch.float32 and kernels.native() is not None
        self.native = kernels.NativeSum(plan, chunk, check_finite) if native else None
        self.staging = torch.empty(chunk * 8, dtype=torch.uint8)
        self.scratch = torch.empty(chunk, dtype=acc_dtype)
        self.acc = torch.empty(chunk, dtype=acc_dtype)
        self.out = torch.empty(chunk * 8, dtype=torch.uint8)

    def read(self, key: KeyPlan, term_index: int, start: int, stop: int, staging: torch.Tensor) -> torch.Tensor:
        term = key.terms[term_index]
        return self.plan.inputs[term.input].checkpoint.read_into(term.key, start, stop, staging)

    def sum_chunk(self, key: KeyPlan, start: int, stop: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """The rounded weighted sum of elements [start, stop), as bytes ready to write: in `into`
        (uint8, aligned for the output dtype; or a buffer such as the output's block) when given,
        else in a buffer of this accumulator."""
        if into is not None and not isinstance(into, torch.Tensor):
            into = torch.frombuffer(into, dtype=torch.uint8)
        done = self.sum_native(key, start, stop, into) if self.native is not None else None
        if done is None:
            done = self.sum_torch(key, start, stop, into)
        for term in key.terms:  # a file that shrank under its mapping was read as zeros: refuse them
            self.plan.inputs[term.input].checkpoint.check_intact(term.key)
        return done

    def sum_torch(self, key: KeyPlan, start: int, stop: int, into: torch.Tensor | None) -> torch.Tensor:
        n = stop - start
        acc, scratch = self.acc[:n], self.scratch[:n]
        for j, term in enumerate(key.terms):
            add_term(acc, self.read(key, j, start, stop, self.staging), term.coefficient, j == 0, scratch)
        return self.finish(key, start, stop, acc, into)

    def sum_native(self, key: KeyPlan, start: int, stop: int, into: torch.Tensor | None) -> torch.Tensor | None:
        """The same sum in one native pass (kernels.NativeSum); None where a dtype is not one the
        kernel takes, or where something is not finite (then the torch path names it)."""
        if not self.native.serves(key):
            return None
        if into is None:
            into = self.out[: (stop - start) * ITEMSIZE[key.dtype]]
        return into if self.native.sum_at(key, start, stop, into.data_ptr()) else None

    def finish(self, key: KeyPlan, start: int, stop: int, acc: torch.Tensor,
               into: torch.Tensor | None = None) -> torch.Tensor:
        """Round once into `into` or the output buffer (on the host), check the range, return the bytes."""
        if into is None:
            into = self.out[: (stop - start) * ITEMSIZE[key.dtype]]
        result = into.view(torch_dtype(key.dtype))
        # On a device, round there and bring back only the narrow result.
        result.copy_(acc if acc.device.type == "cpu" else acc.to(result.dtype))
        if self.check_finite:
            self.check_range(key, start, stop, acc, result)
        return result.view(torch.uint8)

    def check_range(self, key: KeyPlan, start: int, stop: int, acc: torch.Tensor, result: torch.Tensor) -> None:
        # One pass over the sum: NaN fails both comparisons, Inf and overflow fail one.
        if acc.numel() == 0:
            return
        limit = torch.finfo(result.dtype).max
        low, high = torch.aminmax(acc)
        if bool(low >= -limit) and bool(high <= limit):
            return
        self.blame_non_finite(key, start, stop, acc.cpu())
        if result.element_size() == 1 or not bool(torch.isfinite(result).all()):  # the rounding overflowed
            # (fp8 too: torch saturates some casts, and a clipped weight is no more honest than an Inf)
            raise NonFiniteError(f"the merged values overflow {key.dtype} (beyond ±{limit:g}); choose a wider output dtype",
                                 component=key.component, key=key.key)

    def blame_non_finite(self, key: KeyPlan, start: int, stop: int, acc: torch.Tensor) -> None:
        """The sum is not finite (or only its reduction overflowed): find the input at fault."""
        staging = torch.empty((stop - start) * 8, dtype=torch.uint8)
        for j, term in enumerate(key.terms):
            if not bool(torch.isfinite(_wide(self.read(key, j, start, stop, staging))).all()):
                raise NonFiniteError(
                    'input tensor holds NaN or Inf (set output.non_finite to "keep" to merge anyway)',
                    model=self.plan.inputs[term.input].name, component=key.component, key=key.key,
                )
        if not bool(torch.isfinite(acc).all()):
            raise NonFiniteError("the weighted sum overflows", component=key.component, key=key.key)


def _wide(values: torch.Tensor) -> torch.Tensor:
    """fp8 widened (torch has no isfinite for it); other dtypes as they are."""
    return values.float() if values.element_size() == 1 else values


class DeviceAccumulator(CpuAccumulator):
    def __init__(self, plan: Plan, acc_dtype: torch.dtype, chunk: int, check_finite: bool, device: torch.device):
        self.plan, self.check_finite, self.device = plan, check_finite, device
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.pinned = [torch.empty(chunk * 8, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        self.copied = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self.on_device = [torch.empty(chunk * 8, dtype=torch.uint8, device=device) for _ in range(2)]
        self.acc = torch.empty(chunk, dtype=acc_dtype, device=device)
        self.out = torch.empty(chunk * 8, dtype=torch.uint8, pin_memory=cuda)

    def sum_chunk(self, key: KeyPlan, start: int, stop: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """As on the CPU, but the result always lands in this accumulator's pinned buffer first:
        device-to-host copies into pinned memory are the fast ones."""
        if self.stream is None:
            return self._sum_chunk(key, start, stop)
        with torch.cuda.stream(self.stream):
            return self._sum_chunk(key, start, stop)

    def _sum_chunk(self, key: KeyPlan, start: int, stop: int) -> torch.Tensor:
        n = stop - start
        acc = self.acc[:n]
        for j, term in enumerate(key.terms):
            slot = j % 2
            if self.copied[slot] is not None:
                self.copied[slot].synchronize()  # the pinned buffer's last copy has left
            # Positioned reads straight into pinned memory: no page faults, one DMA-able buffer.
            src = self.plan.inputs[term.input].checkpoint.pread_into(term.key, start, stop, self.pinned[slot])
            nbytes = n * src.element_size()
            host = self.pinned[slot][:nbytes]
            on_device = self.on_device[slot][:nbytes]
            on_device.copy_(host, non_blocking=True)
            if self.copied[slot] is not None:
                self.copied[slot].record()
            add_term(acc, on_device.view(src.dtype), term.coefficient, j == 0, None)  # mixed adds are fast there
        return self.finish(key, start, stop, acc)
