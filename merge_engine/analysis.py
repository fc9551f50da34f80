"""Weight analysis: how far apart checkpoints are, per component, from one streaming pass.

Every model is read once, tensor by tensor, chunk by chunk. A chunk of one key is loaded from
every model into the rows of an fp64 matrix M whose first row is a pivot p (the base model,
or else the first model, whose own difference is zero and needs no row) and whose other rows
are x_i - p; `G += M Mᵀ` then
accumulates, per component (and per UNet block), every inner product at once. From that one
small matrix come all pairwise L2 distances, cosine similarities, norms and distances to the
uniform mean. Subtracting the pivot first keeps the distances between near-identical
fine-tunes exact (no cancellation of two huge squared norms); the pivot row restores the raw
inner products that cosines and norms need. Memory is O(N² per block + one chunk per thread).

Identical components (byte for byte) are confirmed in analysis_identity.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .analysis_identity import identical_groups
from .analysis_math import ComponentFigures, component_figures, pivot_last
from .architecture import check_compatible, detect
from .checkpoint import Checkpoint, open_checkpoint
from .errors import LayoutMismatchError, NonFiniteError, SdmergeError
from .passes import Progress, StreamingPass, torch_device

METRICS = ("l2", "cosine")
CHUNK_BYTES = 4 << 20  # per thread: the fp64 rows stay in cache between the widen and the Gram
DEVICE_CHUNK_BYTES = 64 << 20  # on a GPU: fewer, bigger reads and products
_DEVICE_PATH_ON_CPU = False  # tests run the GPU code path on the CPU to check its arithmetic
UNET_PREFIX = "model.diffusion_model."


class AnalysisError(SdmergeError):
    """The analysis request itself is invalid (too few models, unknown metric or component)."""

    code = "invalid_analysis"


@dataclass(frozen=True)
class AnalysisInput:
    """One model to analyse. `id` is the caller's (registry id in the service, position in the CLI)."""

    path: Path
    name: str
    id: str | int
    sha256: str | None = None

    def describe(self) -> dict:
        return {"id": self.id, "name": self.name, "sha256": self.sha256}


@dataclass
class Analysis:
    models: list[AnalysisInput]
    base: AnalysisInput | None
    architecture: str | None
    metrics: tuple[str, ...]
    components: dict[str, ComponentFigures] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "models": [m.describe() for m in self.models],
            "base": self.base.describe() if self.base else None,
            "architecture": self.architecture,
            "metrics": list(self.metrics),
            "components": {c: f.to_dict(self.metrics) for c, f in self.components.items()},
        }


def analyze(models: Sequence[AnalysisInput | str | os.PathLike[str]], components: Sequence[str] | None = None,
            metrics: Sequence[str] = METRICS, base: AnalysisInput | str | os.PathLike[str] | None = None,
            progress: Callable[[Progress], None] | None = None, should_cancel: Callable[[], bool] | None = None,
            *, threads: int = 0, chunk_bytes: int | None = None, device: str = "cpu") -> Analysis:
    """Distances between `models` per component; with `base`, between their task vectors.
    `device="cuda"` sums the Gram matrices on a GPU (fp64 there too); reading stays on the host."""
    started = time.perf_counter()
    inputs = [_as_input(m, i) for i, m in enumerate(models)]
    base_input = _as_input(base, "base") if base is not None else None
    metrics = tuple(dict.fromkeys(metrics or METRICS))
    if len(inputs) < 2:
        raise AnalysisError(f"an analysis compares at least 2 models, got {len(inputs)}")
    if unknown := [m for m in metrics if m not in METRICS]:
        raise AnalysisError(f"unknown metric {unknown[0]!r} (use {', '.join(METRICS)})")
    rows = [base_input] + inputs if base_input else inputs  # row 0 is the pivot
    offset = len(rows) - len(inputs)  # where the models' rows start
    checkpoints: list[Checkpoint] = []
    try:
        for item in rows:
            checkpoints.append(open_checkpoint(item.path, name=item.name))
        layout = _Layout.build(rows, checkpoints, components)
        target = torch_device(device, AnalysisError)
        if chunk_bytes is None:
            chunk_bytes = CHUNK_BYTES if target.type == "cpu" else DEVICE_CHUNK_BYTES
        grams = _Pass(layout, checkpoints, threads, chunk_bytes, progress, should_cancel, target).run()
        result = Analysis(inputs, base_input, layout.architecture, metrics)
        for component, accumulated in grams.items():
            blocks = {name: pivot_last(g, has_base=base_input is not None) for name, g in accumulated.items()}
            keys = [[entry[2][row] for entry in layout.keys[component]] for row in range(offset, len(rows))]
            identical = identical_groups(sum(blocks.values()), checkpoints[offset:], keys)
            result.components[component] = component_figures(
                blocks, relative=base_input is not None, identical=identical,
                keys=len(layout.keys[component]), params=layout.params[component])
        for checkpoint in checkpoints:  # the figures are of the files the report names
            checkpoint.check_unchanged()
    finally:
        for checkpoint in checkpoints:
            checkpoint.close()
    result.seconds = time.perf_counter() - started
    return result


def inputs_from_files(paths: Sequence[str | os.PathLike[str]], *, hashes: bool = True,
                      ids: Sequence[str | int] | None = None) -> list[AnalysisInput]:
    """The CLI's models: id = position on the command line (or `ids`), name = file name, sha256 if `hashes`."""
    from .hashing import hash_file

    found = []
    for index, path in enumerate(map(Path, paths)):
        open_checkpoint(path).close()  # a clear error for a missing or non-checkpoint file
        found.append(AnalysisInput(path, path.name, ids[index] if ids else index, hash_file(path).sha256 if hashes else None))
    return found


def _as_input(model: AnalysisInput | str | os.PathLike[str], index: str | int) -> AnalysisInput:
    if isinstance(model, AnalysisInput):
        return model
    path = Path(model)
    return AnalysisInput(path, path.name, index)


def block_of(key: str) -> str:
    """The UNet block a canonical key belongs to: input_blocks.N, middle_block, output_blocks.N, ..."""
    parts = key[len(UNET_PREFIX):].split(".")
    return ".".join(parts[:2]) if parts[0] in ("input_blocks", "output_blocks") else parts[0]


@dataclass
class _Layout:
    """The keys every row shares, per component, checked before any weight is read."""

    architecture: str | None
    keys: dict[str, list[tuple[str, str, list[str]]]]  # component -> (canonical key, block, file key per row)
    numel: dict[str, int]
    params: dict[str, int]

    @classmethod
    def build(cls, rows: list[AnalysisInput], checkpoints: list[Checkpoint], wanted: Sequence[str] | None) -> _Layout:
        infos = [detect(c.tensors, model=r.name) for r, c in zip(rows, checkpoints, strict=True)]
        named = [(r.name, i) for r, i in zip(rows, infos, strict=True)]
        components = list(wanted) if wanted else list(infos[0].components)
        if not components:
            raise AnalysisError("no component to analyse", model=rows[0].name)
        keys, numel, params = {}, {}, {}
        for component in dict.fromkeys(components):
            for name, info in named:
                if component not in info.components:
                    raise LayoutMismatchError(f"model has no {component} to compare", model=name, component=component)
            check_compatible(named, component)  # families and UNet variants must agree
            keys[component] = cls._keys(component, named, checkpoints)
            for _, _, file_keys in keys[component]:
                numel[file_keys[0]] = checkpoints[0].tensors[file_keys[0]].numel
            params[component] = sum(numel[k[2][0]] for k in keys[component])
        architecture = next((i.architecture for _, i in named if i.architecture), None)
        return cls(architecture, keys, numel, params)

    @staticmethod
    def _keys(component: str, named: list, checkpoints: list[Checkpoint]) -> list:
        first_name, first = named[0]
        ref = set(first.components[component])
        for name, info in named[1:]:
            theirs = set(info.components[component])
            for missing, holder in ((ref - theirs, name), (theirs - ref, first_name)):
                if missing:
                    raise LayoutMismatchError(f"key missing here but present in the other models "
                                              f"({len(missing)} keys differ)", model=holder,
                                              component=component, key=sorted(missing)[0])
        out = []
        for key in sorted(ref):
            file_keys = [info.stored_key(key) for _, info in named]
            tensors = [c.tensors[k] for c, k in zip(checkpoints, file_keys, strict=False)]
            if not tensors[0].is_float:
                continue  # integer buffers (position ids) are indices, not weights
            for (name, _), tensor in zip(named[1:], tensors[1:], strict=True):
                if tensor.shape != tensors[0].shape or not tensor.is_float:
                    raise LayoutMismatchError(
                        f"{tensor.dtype}{list(tensor.shape)} differs from {tensors[0].dtype}"
                        f"{list(tensors[0].shape)} in {first_name}", model=name, component=component, key=key)
            block = block_of(key) if component == "unet" else component
            out.append((key, block, file_keys))
        return out


class _Pass(StreamingPass):
    """The one streaming pass: a few threads, each with its own chunk matrix and Gram matrices.

    Chunks are dealt to threads round-robin and the threads' sums are added in thread order,
    so for a given thread count the figures do not depend on scheduling."""

    def __init__(self, layout: _Layout, checkpoints: list[Checkpoint], threads: int, chunk_bytes: int,
                 progress: Callable[[Progress], None] | None, should_cancel: Callable[[], bool] | None,
                 device: torch.device):
        bytes_total = sum(sum(ck.tensors[k].nbytes for ck, k in zip(checkpoints, keys, strict=True))
                          for entries in layout.keys.values() for _, _, keys in entries)
        super().__init__(checkpoints, threads, sum(len(v) for v in layout.keys.values()), bytes_total,
                         progress, should_cancel, "analysis")
        self.layout, self.device = layout, device
        self.rows = len(checkpoints)
        self.chunk = max(4096, chunk_bytes // (8 * self.rows))
        self.items = [(c, block, keys, start, min(start + self.chunk, layout.numel[keys[0]]))
                      for c, entries in layout.keys.items() for _, block, keys in entries
                      for start in range(0, max(layout.numel[keys[0]], 1), self.chunk)]
        self.results: list[dict] = [{} for _ in range(self.threads)]

    def run(self) -> dict[str, dict[str, np.ndarray]]:
        self.run_threads()
        grams: dict[str, dict[str, np.ndarray]] = {c: {} for c in self.layout.keys}
        for partial in self.results:
            for (component, block), gram in partial.items():
                if isinstance(gram, torch.Tensor):
                    gram = gram.cpu().numpy()
                grams[component][block] = grams[component].get(block, 0) + gram
        return grams

    def work(self, index: int) -> None:
        if self.device.type == "cpu" and not _DEVICE_PATH_ON_CPU:
            self._work_cpu(index)
        else:
            self._work_device(index)

    def _items_of(self, index: int):
        return self.items[index::self.threads]

    def _work_device(self, index: int) -> None:
        """The same pass with the Gram on a GPU: each model's chunk is read with positioned reads
        into pinned host memory, copied to the device, widened there to fp64, and `G += M Mᵀ`
        runs there; the host waits only for the copies before reusing its buffers. Whether every
        sum stayed finite is kept on the device and read once at the end (no sync per chunk); if
        one did not, the inputs are searched for the tensor at fault."""
        grams: dict = self.results[index]
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        cuda = self.device.type == "cuda"
        pinned = [torch.empty(self.chunk * 8, dtype=torch.uint8, pin_memory=cuda) for _ in range(self.rows)]
        raw = torch.empty((self.rows, self.chunk * 8), dtype=torch.uint8, device=self.device)
        matrix = torch.empty((self.rows, self.chunk), dtype=torch.float64, device=self.device)
        copied = None
        for component, block, keys, start, stop in self._items_of(index):
            if self.stop.is_set():
                return
            n = stop - start
            if copied is not None:
                copied.synchronize()  # the pinned buffers' last copies have left
            for row, (checkpoint, key) in enumerate(zip(self.checkpoints, keys, strict=True)):
                values = checkpoint.pread_into(key, start, stop, pinned[row])
                nbytes = n * values.element_size()
                on_device = raw[row, :nbytes]
                on_device.copy_(pinned[row][:nbytes], non_blocking=True)
                matrix[row, :n].copy_(on_device.view(values.dtype))
            if cuda:
                copied = torch.cuda.Event()
                copied.record()
            rows = matrix[:, :n]
            rows[1:] -= rows[0]
            gram = grams.get((component, block))
            if gram is None:
                gram = grams[(component, block)] = torch.zeros((self.rows, self.rows), dtype=torch.float64,
                                                               device=self.device)
            gram.addmm_(rows, rows.T)
            finite &= torch.isfinite(gram.diagonal()).all()
            self.advance(sum(n * (ck.tensors[k].nbytes // max(ck.tensors[k].numel, 1))
                             for ck, k in zip(self.checkpoints, keys, strict=True)),
                         stop == self.layout.numel[keys[0]])
        if not bool(finite):
            self._find_non_finite([item[:3] for item in self._items_of(index)])

    def _find_non_finite(self, items: list[tuple[str, str, list[str]]]) -> None:
        """A sum went non-finite somewhere in `items` (component, block, keys): name the input."""
        for component, _, keys in dict.fromkeys((c, b, tuple(k)) for c, b, k in items):
            for checkpoint, key in zip(self.checkpoints, keys, strict=True):
                if not bool(torch.isfinite(checkpoint.read_tensor(key).float()).all()):
                    raise NonFiniteError("tensor holds NaN or Inf", model=checkpoint.name, component=component,
                                         key=key)
        component, _, keys = items[0]
        raise NonFiniteError("weights too large for fp64 inner products", component=component, key=keys[0])

    def _work_cpu(self, index: int) -> None:
        grams = self.results[index]
        buffer = np.empty((self.rows, self.chunk), dtype=np.float64)
        widened = torch.from_numpy(buffer)  # the same memory: torch widens faster than numpy
        single = torch.empty(self.chunk, dtype=torch.float32)  # fp16 -> fp32 -> fp64 beats one step
        staging = torch.empty(self.chunk * 8, dtype=torch.uint8)
        for component, block, keys, start, stop in self._items_of(index):
            if self.stop.is_set():
                return
            n = stop - start
            matrix = buffer[:, :n]
            for row, (checkpoint, key) in enumerate(zip(self.checkpoints, keys, strict=True)):
                values = checkpoint.read_into(key, start, stop, staging)
                if values.element_size() == 2:
                    values = single[:n].copy_(values)
                widened[row, :n].copy_(values)
                checkpoint.check_intact(key)
            widened[1:, :n] -= widened[0, :n]
            gram = grams.get((component, block))
            if gram is None:
                gram = grams[(component, block)] = np.zeros((self.rows, self.rows))
            torch.from_numpy(gram).addmm_(widened[:, :n], widened[:, :n].T)  # faster than numpy's here
            if not np.isfinite(gram[np.diag_indices(self.rows)]).all():
                self._non_finite(matrix, component, keys)
            self.advance(sum(n * (ck.tensors[k].nbytes // max(ck.tensors[k].numel, 1))
                             for ck, k in zip(self.checkpoints, keys, strict=True)),
                         stop == self.layout.numel[keys[0]])

    def _non_finite(self, matrix: np.ndarray, component: str, keys: list[str]) -> None:
        for row in range(self.rows):
            if not np.isfinite(matrix[row]).all():
                raise NonFiniteError("tensor holds NaN or Inf", model=self.checkpoints[row].name,
                                     component=component, key=keys[row])
        raise NonFiniteError("weights too large for fp64 inner products", component=component, key=keys[0])
