"""Evaluating a key whose recipe holds a non-linear method: its `Sum`/`Apply` tree, chunk by chunk.

Every `Apply` becomes its method's streaming program (methods/programs.py). Programs are
prepared bottom-up: an inner method's passes run before the passes of the method that reads it,
and an input is read only when a program asks for it, so memory is a few chunks of each input
plus per-tensor statistics. Once prepared, a tree whose every method turned out to be a weighted
sum with per-tensor weights (geometric median, model stock, slerp over models or linear
sources) is handed to the accumulator as one more weighted sum: the native kernel, rounded once,
like a linear merge. Otherwise each chunk is computed in the accumulation dtype and rounded once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import torch

from .accumulate import CpuAccumulator
from .checkpoint import ITEMSIZE
from .errors import MergeCancelled, NonFiniteError
from .methods.programs import PROGRAMS, Inputs, Program, finite_source
from .plan import Apply, KeyPlan, Plan, Sum, Term

WORKING_BYTES = 48 << 20  # per key in flight: every input's chunk and the method's temporaries
TEMPORARIES = 6  # working copies a method makes of its stacked inputs


class KeyEvaluation:
    def __init__(self, plan: Plan, key: KeyPlan, accumulator: CpuAccumulator, dtype: torch.dtype,
                 device: torch.device, chunk: int, check_finite: bool,
                 reread: Callable[[int], None] = lambda nbytes: None):
        self.plan, self.key, self.accumulator, self.reread = plan, key, accumulator, reread
        self.dtype, self.device, self.check_finite = dtype, device, check_finite
        self.files = {t.input: t.key for t in key.terms}
        width = torch.finfo(dtype).bits // 8
        self.chunk = max(1 << 12, min(chunk, WORKING_BYTES // (width * TEMPORARIES * max(1, len(self.files)))))
        self.staging = torch.empty(self.chunk * 8, dtype=torch.uint8)
        self.stagings: dict[int, torch.Tensor] = {}
        self.input_bytes = sum(ITEMSIZE[plan.inputs[t.input].checkpoint.tensors[t.key].dtype] for t in key.terms)
        self.programs: dict[int, Program] = {}
        self.checked: set[tuple[int, int]] = set()  # (input, chunk start) found finite
        self._build(key.expression)

    def _build(self, total: Sum) -> None:
        for part, _ in total.parts:
            if isinstance(part, Apply):
                counts = {}
                for name, value in part.inputs:
                    for inner in _sums(value):
                        self._build(inner)
                    counts[name] = len(value) if isinstance(value, tuple) else None if value is None else 1
                self.programs[id(part)] = PROGRAMS[part.method](
                    dict(part.params), self.key.key, self.key.numel, counts, self.dtype, self.device)

    def ranges(self) -> Iterator[tuple[int, int]]:
        for start in range(0, self.key.numel, self.chunk):
            yield start, min(start + self.chunk, self.key.numel)

    # -- preparing ---------------------------------------------------------------------------------

    def prepare(self, stopped: Callable[[], bool] = lambda: False) -> None:
        self._prepare(self.key.expression, stopped)

    def _prepare(self, total: Sum, stopped: Callable[[], bool]) -> None:
        for part, _ in total.parts:
            if not isinstance(part, Apply):
                continue
            for _, value in part.inputs:
                for inner in _sums(value):
                    self._prepare(inner, stopped)
            program = self.programs[id(part)]
            for index in range(program.passes):
                for start, stop in self.ranges():
                    if stopped():
                        raise MergeCancelled("the merge was stopped")
                    program.gather(index, start, stop, self._inputs(part, start, stop))
                    self._check_intact()
                    self.reread((stop - start) * self.input_bytes)
                program.end_pass(index)

    # -- values ------------------------------------------------------------------------------------

    def _inputs(self, apply: Apply, start: int, stop: int) -> Inputs:
        values = dict(apply.inputs)

        def get(name: str, index: int | None) -> torch.Tensor:
            value = values[name]
            return self.value(value[index] if index is not None else value, start, stop)

        def raw(name: str, index: int | None) -> torch.Tensor | None:
            value = values[name]
            total = value[index] if index is not None else value
            if total is None or len(total.parts) != 1 or self.device.type != "cpu":
                return None
            part, c = total.parts[0]
            return None if isinstance(part, Apply) or c != 1.0 else self._raw(part, start, stop)

        return Inputs(get, raw)

    def value(self, total: Sum, start: int, stop: int) -> torch.Tensor:
        result = None
        for part, c in total.parts:
            if isinstance(part, Apply):
                term = self.programs[id(part)].chunk(start, stop, self._inputs(part, start, stop))
            else:
                term = self._read(part, start, stop)
            term = term if c == 1.0 else term * c
            result = term if result is None else result + term
        return result

    def _read(self, index: int, start: int, stop: int) -> torch.Tensor:
        checkpoint = self.plan.inputs[index].checkpoint
        raw = checkpoint.read_into(self.files[index], start, stop, self.staging)
        value = raw.to(self.device).to(self.dtype)
        if self.check_finite and (index, start) not in self.checked:
            self._check_finite(index, start, value)
        return value

    def _raw(self, index: int, start: int, stop: int) -> torch.Tensor | None:
        """An input's chunk as the file holds it, for a native pass: None where the kernels cannot
        read it (another dtype; NaN or Inf in it, which is an error here unless they are kept)."""
        if index not in self.stagings:  # each its own: a native pass holds every input at once
            self.stagings[index] = torch.empty(self.chunk * 8, dtype=torch.uint8)
        checkpoint = self.plan.inputs[index].checkpoint
        value = finite_source(checkpoint.read_into(self.files[index], start, stop, self.stagings[index]))
        if value is None:
            if self.check_finite and (index, start) not in self.checked:
                self._read(index, start, stop)  # names the model if it is NaN or Inf that stopped it
            return None
        self.checked.add((index, start))
        return value

    def _check_finite(self, index: int, start: int, value: torch.Tensor) -> None:
        """Each input chunk once, by its sum: NaN or Inf anywhere makes it non-finite (an overflowing
        sum of finite values is then told apart by the exact test)."""
        self.checked.add((index, start))
        if value.numel() and not bool(torch.isfinite(value.sum())) and not bool(torch.isfinite(value).all()):
            raise NonFiniteError('input tensor holds NaN or Inf (set output.non_finite to "keep" to merge anyway)',
                                 model=self.plan.inputs[index].name, component=self.key.component, key=self.key.key)

    def _check_intact(self) -> None:
        for term in self.key.terms:  # a file that shrank under its mapping was read as zeros: refuse them
            self.plan.inputs[term.input].checkpoint.check_intact(term.key)

    # -- the result --------------------------------------------------------------------------------

    def weighted_sum(self) -> KeyPlan | None:
        """The prepared key as one weighted sum of its inputs, where it is one."""
        weights = self._weights(self.key.expression, 1.0)
        if weights is None:
            return None
        terms = tuple(Term(i, self.files[i], w) for i, w in weights.items() if w != 0.0)
        terms = terms or (Term(next(iter(weights)), self.files[next(iter(weights))], 0.0),)
        return replace(self.key, terms=terms, expression=None)

    def _weights(self, total: Sum, scale: float) -> dict[int, float] | None:
        out: dict[int, float] = {}
        for part, c in total.parts:
            if not isinstance(part, Apply):
                out[part] = out.get(part, 0.0) + c * scale
                continue
            coefficients = self.programs[id(part)].coefficients()
            if coefficients is None:
                return None
            for name, value in part.inputs:
                weights = coefficients.get(name)
                if value is None or weights is None:
                    continue
                for inner, w in zip(_sums(value), weights if isinstance(weights, list) else [weights], strict=True):
                    found = self._weights(inner, c * scale * w)
                    if found is None:
                        return None
                    for i, v in found.items():
                        out[i] = out.get(i, 0.0) + v
        return out

    def results(self, stopped: Callable[[], bool] = lambda: False) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, the rounded bytes) of every chunk, in order; prepares first."""
        self.prepare(stopped)
        linear = self.weighted_sum()
        for start, stop in self.ranges():
            if stopped():
                raise MergeCancelled("the merge was stopped")
            if linear is not None:
                yield start, stop, self.accumulator.sum_chunk(linear, start, stop)
            else:
                acc = self.value(self.key.expression, start, stop)
                self._check_intact()
                yield start, stop, self.accumulator.finish(self.key, start, stop, acc)


def _sums(value: Sum | tuple[Sum, ...] | None) -> tuple[Sum, ...]:
    return value if isinstance(value, tuple) else () if value is None else (value,)
