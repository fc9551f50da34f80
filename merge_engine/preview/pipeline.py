"""A loaded model for previews, whose weights are replaced in place, component by component.

A preview target is a plan (a registered file is the plan of a one-model recipe). The modules
are built once per architecture and shape; each component then carries a fingerprint of where
its weights came from (the input files' sha256 and the exact weights), and a new target only
rewrites the components whose fingerprint differs: swapping a text encoder leaves the UNet
alone. Recipe weights are summed in memory with the merge engine's own accumulator, chunk by
chunk, and rounded once to the recipe's output dtype, so a variant previewed in memory holds
exactly the bytes the same recipe merged to disk would.

A sweep may name an anchor (`Anchor`): a recipe whose fp64 sums are kept in memory, so that a
variant near it (leave one out, one weight changed) is derived from them with a read of the few
models whose coefficients differ, not of all of them.
"""

from __future__ import annotations

import json
import os
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from merge_engine.accumulate import CpuAccumulator, add_term
from merge_engine.architecture import layout
from merge_engine.checkpoint import ITEMSIZE, torch_dtype
from merge_engine.errors import CheckpointError, MergeCancelled
from merge_engine.evaluate import KeyEvaluation
from merge_engine.plan import KeyPlan, Plan
from merge_engine.preview.models import ComponentModule, build_component, check_complete
from merge_engine.preview.prompt import apply_emphasis, tokenize_weighted
from merge_engine.preview.tokenizer import CLIPTokenizer, pad_token_for

CHUNK = 1 << 20  # elements summed at a time for in-memory merges

Fingerprint = tuple[Any, ...]


def fingerprint(plan: Plan, component: str, keys: list[KeyPlan], exact_copy: bool) -> Fingerprint:
    """Where a component's weights come from: its inputs (by sha256) and exact weights, and the
    dtype they are rounded to, or "stored" where they are an input's own bytes (see `_merged`)."""
    terms = tuple((plan.inputs[i].sha256, str(c)) for i, c in plan.components[component])
    if component in plan.expressions or component in plan.blocks:  # weights per key: the source says it all
        canonical = plan.canonical_recipe
        source = canonical.components.get(component, canonical.merge)
        terms += (json.dumps(source if isinstance(source, str) else source.model_dump(mode="json"), sort_keys=True),)
    stored = exact_copy or all(_is_copy(plan, key) for key in keys)
    output = plan.recipe.output
    return component, terms, "stored" if stored else (output.component_dtypes.get(component, output.dtype), output.accumulate)


def _is_copy(plan: Plan, key: KeyPlan) -> bool:
    """A one-term key of weight 1 whose stored dtype is the output's: widening and rounding
    would give back the stored bytes, so they are used as they are."""
    term = key.terms[0]
    stored = plan.inputs[term.input].checkpoint.tensors[term.key].dtype
    if key.expression is not None:
        return False
    return key.kind == "integer" or (len(key.terms) == 1 and term.coefficient == 1 and stored == key.dtype)


@dataclass
class Conditioning:
    context: torch.Tensor  # [tokens, channels] (several 77-token chunks concatenated)
    pooled: torch.Tensor | None = None  # SDXL


@dataclass
class PreviewModel:
    """Modules for one architecture on one device, in one dtype."""

    architecture: str
    device: torch.device
    dtype: torch.dtype
    modules: dict[str, ComponentModule] = field(default_factory=dict)
    loaded: dict[str, Fingerprint] = field(default_factory=dict)
    shapes: dict[str, Any] = field(default_factory=dict)
    _text_cache: dict[str, Conditioning] = field(default_factory=dict)
    _uploader: _Uploader | None = None
    anchor: Anchor | None = None  # set by a sweep whose variants are derived from one recipe's sums

    # -- weights -------------------------------------------------------------------------------

    def load(self, plan: Plan, *, exact_copy: bool = False,
             should_cancel: Callable[[], bool] | None = None) -> list[str]:
        """Make the modules hold `plan`'s weights; returns the components that were rewritten."""
        if plan.architecture != self.architecture:
            raise CheckpointError(f"a {plan.architecture} target cannot use {self.architecture} modules")
        needed = [c for c in layout(self.architecture).prefixes if c in plan.components]
        missing = [c for c in layout(self.architecture).prefixes if c not in plan.components]
        if missing:
            raise CheckpointError(f"a preview needs a full model; this target has no {', '.join(missing)}",
                                  model=plan.recipe.name or plan.inputs[0].name, component=missing[0])
        keys_of = {c: [k for k in plan.keys if k.component == c] for c in needed}
        pooled_width = None
        if self.architecture == "sdxl":
            prefix = layout("sdxl").prefixes["text_encoder_2"]
            pooled_width = next(k.shape[1] for k in keys_of["text_encoder_2"] if k.key == prefix + "text_projection")
        changed = []
        for component in needed:
            stamp = fingerprint(plan, component, keys_of[component], exact_copy)
            if self.loaded.get(component) == stamp:
                continue
            if should_cancel and should_cancel():
                raise MergeCancelled("preview cancelled")
            self.loaded.pop(component, None)  # half-written weights must never pass for the old ones
            self._write(plan, component, keys_of[component], exact_copy, pooled_width)
            self.loaded[component] = stamp
            if component.startswith("text_encoder"):
                self._text_cache.clear()
            changed.append(component)
        return changed

    def _write(self, plan: Plan, component: str, keys: list[KeyPlan], exact_copy: bool,
               pooled_width: int | None) -> None:
        prefix = layout(self.architecture).prefixes[component]
        by_key = {k.key[len(prefix):]: k for k in keys}
        model = plan.recipe.name or plan.inputs[plan.components[component][0][0]].name
        check_complete(self.architecture, component, [k.key for k in keys], model)
        shapes = {k: p.shape for k, p in by_key.items()}
        if self.shapes.get(component) != shapes:
            built = build_component(self.architecture, component, shapes, pooled_width=pooled_width, model=model)
            dtype = torch.float32 if self._upcast(component, built) else self.dtype
            built.module.to(dtype).to_empty(device=self.device).eval().requires_grad_(False)
            if any(True for _ in built.module.buffers()):
                raise CheckpointError(f"the {component} module has buffers the checkpoint cannot fill")
            self.modules[component], self.shapes[component] = built, shapes
        accumulator = CpuAccumulator(plan, torch.float64 if plan.recipe.output.accumulate == "fp64" else torch.float32,
                                     CHUNK, plan.recipe.output.non_finite == "error")
        staging = torch.empty(CHUNK * 8, dtype=torch.uint8)
        derived = self.anchor.derivation(plan, component) if self.anchor is not None else None
        if self.device.type == "cuda" and self._uploader is None:
            self._uploader = _Uploader(self.device)  # pinned memory is slow to allocate: once
        uploader = self._uploader
        try:
            with torch.no_grad():
                for source, param in self.modules[component].targets():
                    key = by_key[source]
                    if uploader and (exact_copy or _is_copy(plan, key)):
                        term = key.terms[0]
                        uploader.copy(plan.inputs[term.input].checkpoint, term.key, param)
                    elif derived is not None and derived.covers(key):
                        param.copy_(derived.tensor(key, accumulator).view(param.shape))
                    else:
                        param.copy_(_merged(plan, key, accumulator, staging, exact_copy).view(param.shape))
                if uploader:
                    uploader.finish()
        except BaseException:
            if uploader:
                uploader.abort()
            raise
        for item in plan.inputs + (self.anchor.plan.inputs if derived is not None else ()):
            item.checkpoint.check_unchanged()  # the weights loaded are those the fingerprint names
            item.checkpoint.release()

    def _upcast(self, component: str, built: ComponentModule) -> bool:
        """The SDXL VAE overflows in fp16; it decodes in fp32 like diffusers' force_upcast."""
        return component == "vae" and self.dtype == torch.float16 and built.settings["config"].get("force_upcast", False)

    # -- text ----------------------------------------------------------------------------------

    def encode(self, prompt: str, tokenizer: CLIPTokenizer, clip_skip: int = 1) -> Conditioning:
        """A prompt's conditioning: emphasis applied per 77-token chunk, chunks concatenated.
        `clip_skip` has the WebUI's meaning (see `clip_layer`)."""
        cached = self._text_cache.get((prompt, clip_skip))
        if cached is not None:
            return cached
        chunks = tokenize_weighted(prompt, tokenizer)
        contexts, pooled = [], None
        encoders = [c for c in ("text_encoder", "text_encoder_2") if c in self.modules]
        for chunk in chunks:
            parts = []
            for component in encoders:
                cm = self.modules[component]
                window = chunk.window(pad_token_for(self.architecture, component))
                ids = torch.tensor([window.tokens], device=self.device)
                weights = torch.tensor([window.weights], device=self.device)
                settings = cm.settings
                layer, final_norm = clip_layer(self.architecture, settings, clip_skip)
                with torch.no_grad():
                    z, pool = cm.module(ids, layer=layer, final_norm=final_norm, pooled=settings["pooled"])
                parts.append(apply_emphasis(z.float(), weights))
                if pool is not None and pooled is None:
                    pooled = pool[0].float()  # the first chunk's pooled vector, as the WebUI does
            contexts.append(torch.cat(parts, dim=-1)[0])
        result = Conditioning(torch.cat(contexts, dim=0), pooled)
        self._text_cache[(prompt, clip_skip)] = result
        return result


def clip_layer(architecture: str, settings: dict, clip_skip: int) -> tuple[int, bool]:
    """(layer, final norm) of a text encoder under the WebUI's CLIP_stop_at_last_layers: SD1 takes
    the output of the clip_skip-th layer from the end, then the final layer norm
    (FrozenCLIPEmbedderWithCustomWords); SD2's OpenCLIP always takes its penultimate layer (the
    WebUI ignores the setting there), and so do SDXL's encoders (unless its sdxl_clip_l_skip
    option is on, which is off by default)."""
    if architecture == "sd1" and clip_skip > 1:
        return -clip_skip, True
    return settings["layer"], settings["final_norm"]


def _merged(plan: Plan, key: KeyPlan, accumulator: CpuAccumulator, staging: torch.Tensor,
            exact_copy: bool) -> torch.Tensor:
    """The whole tensor for `key`: the stored tensor for an exact copy, else the engine's sum."""
    term = key.terms[0]
    if key.expression is not None:  # a non-linear method, evaluated as the merge does
        out = torch.empty(key.numel, dtype=torch_dtype(key.dtype))
        flat, size = out.view(torch.uint8), out.element_size()
        evaluation = KeyEvaluation(plan, key, accumulator, accumulator.acc.dtype, torch.device("cpu"), CHUNK,
                                   plan.recipe.output.non_finite == "error")
        for start, stop, data in evaluation.results():
            flat[start * size: stop * size] = data
        return out
    if exact_copy or _is_copy(plan, key):
        # The stored tensor itself; for a one-term recipe of the same dtype the engine's widen
        # and round would give back these very bytes.
        checkpoint = plan.inputs[term.input].checkpoint
        info = checkpoint.tensors[term.key]
        if info.nbytes > staging.numel():  # used only where the stored bytes are not aligned
            staging = torch.empty(info.nbytes, dtype=torch.uint8)
        return checkpoint.read_into(term.key, 0, info.numel, staging)
    out = torch.empty(key.numel, dtype=torch_dtype(key.dtype))
    flat = out.view(torch.uint8)
    size = out.element_size()
    for start in range(0, key.numel, CHUNK):
        stop = min(start + CHUNK, key.numel)
        flat[start * size: stop * size] = accumulator.sum_chunk(key, start, stop)
    return out


def available_memory() -> int:
    """Bytes of memory the system can still give without swapping (MemAvailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class Anchor:
    """The fp64 sums of one plan's float tensors, computed once per component and kept, from which
    variants near the plan are derived: a variant whose exact coefficients are `alpha` times the
    anchor's on all but a few models is `alpha * S + sum(d_r * x_r)` over those few models, read
    once each. Leaving model j out of a uniform of N is `N/(N-1) * S - 1/(N-1) * x_j`: one model
    read instead of N - 1; one weight changed in a weighted sum is one model read too.

    Only variants accumulated in fp64 are derived (the sums are fp64, and the result is then the
    variant's own fp64 sum to a few units of fp64 rounding: the same bytes once rounded to the
    output dtype but where a value sits within ~1e-15 of a rounding boundary). The sums cost 8
    bytes a parameter (SD1.5's UNet: 6.9 GB); a component whose sums would not fit in
    `memory_fraction` of the memory available is summed directly for every variant instead."""

    def __init__(self, plan: Plan, memory_fraction: float = 0.5):
        self.plan = plan
        self.memory_fraction = memory_fraction
        self.sums: dict[str, dict[str, torch.Tensor] | None] = {}  # None: too big to keep
        self.keys = {k.key: k for k in plan.keys}
        self.derived = 0  # components derived rather than summed (for reports and tests)

    def derivation(self, plan: Plan, component: str) -> _Derivation | None:
        """How `plan`'s component follows from the anchor's, or None if it is no cheaper."""
        if (plan.recipe.output.accumulate != "fp64" or component not in self.plan.components
                or component in plan.expressions or component in self.plan.expressions
                or component in plan.blocks or component in self.plan.blocks):
            return None
        full = _by_sha(self.plan, component)
        variant = _by_sha(plan, component)
        if len(full) < 3:
            return None
        ratios = Counter(variant[s] / c for s, c in full.items() if s in variant and c != 0)
        if not ratios:
            return None
        alpha = max(ratios.items(), key=lambda item: (item[1], -abs(item[0] - 1)))[0]
        corrections = {s: variant.get(s, Fraction(0)) - alpha * full.get(s, Fraction(0))
                       for s in full.keys() | variant.keys()}
        corrections = {s: d for s, d in corrections.items() if d != 0}
        if len(corrections) >= len(variant):
            return None  # summing the variant itself reads as few models
        sums = self._sums(component)
        if sums is None:
            return None
        self.derived += 1
        return _Derivation(self, plan, component, float(alpha), sorted(corrections.items()), sums)

    def _sums(self, component: str) -> dict[str, torch.Tensor] | None:
        if component in self.sums:
            return self.sums[component]
        keys = [k for k in self.plan.keys if k.component == component and k.kind == "float"]
        if 8 * sum(k.numel for k in keys) > self.memory_fraction * available_memory():
            self.sums[component] = None
            return None
        accumulator = CpuAccumulator(self.plan, torch.float64, CHUNK, False)
        sums = {}
        for key in keys:
            total = torch.empty(key.numel, dtype=torch.float64)
            for start in range(0, key.numel, CHUNK):
                stop = min(start + CHUNK, key.numel)
                acc, scratch = total[start:stop], accumulator.scratch[: stop - start]
                for j, term in enumerate(key.terms):
                    source = accumulator.read(key, j, start, stop, accumulator.staging)
                    add_term(acc, source, term.coefficient, j == 0, scratch)
            sums[key.key] = total
        for item in self.plan.inputs:
            item.checkpoint.check_unchanged()
            item.checkpoint.release()
        self.sums[component] = sums
        return sums


def _by_sha(plan: Plan, component: str) -> dict[str, Fraction]:
    terms: dict[str, Fraction] = {}
    for i, c in plan.components[component]:
        terms[plan.inputs[i].sha256] = terms.get(plan.inputs[i].sha256, Fraction(0)) + c
    return terms


@dataclass
class _Derivation:
    anchor: Anchor
    plan: Plan
    component: str
    alpha: float
    corrections: list[tuple[str, Fraction]]  # (sha256, coefficient) of the models read
    sums: dict[str, torch.Tensor]

    def covers(self, key: KeyPlan) -> bool:
        """A float key whose every term is a model of the component (so the sums hold it)."""
        ours = self.anchor.keys.get(key.key)
        return (key.kind == "float" and key.key in self.sums and ours is not None and ours.shape == key.shape
                and len({t.input for t in key.terms}) == len(self.plan.components[self.component])
                and len({t.input for t in ours.terms}) == len(self.anchor.plan.components[self.component]))

    def tensor(self, key: KeyPlan, accumulator: CpuAccumulator) -> torch.Tensor:
        """`key`'s variant tensor: alpha * S + the corrections, rounded once to its dtype."""
        sources = [self._source(sha, key) for sha, _ in self.corrections]
        out = torch.empty(key.numel, dtype=torch_dtype(key.dtype))
        flat, size = out.view(torch.uint8), out.element_size()
        total = self.sums[key.key]
        wide = torch.empty(CHUNK, dtype=torch.float64)
        scratch = torch.empty(CHUNK, dtype=torch.float64)
        staging = torch.empty(CHUNK * 8, dtype=torch.uint8)
        for start in range(0, key.numel, CHUNK):
            stop = min(start + CHUNK, key.numel)
            acc = wide[: stop - start].copy_(total[start:stop])
            if self.alpha != 1.0:
                acc.mul_(self.alpha)
            for (checkpoint, stored), (_, d) in zip(sources, self.corrections, strict=True):
                acc.add_(scratch[: stop - start].copy_(checkpoint.read_into(stored, start, stop, staging)),
                         alpha=float(d))
            flat[start * size: stop * size] = accumulator.finish(key, start, stop, acc)
        for checkpoint, stored in sources:
            checkpoint.check_intact(stored)
        return out

    def _source(self, sha: str, key: KeyPlan):
        """(checkpoint, stored key) of a model read for a correction: from the variant's plan, or
        the anchor's where the variant left the model out."""
        for plan, kp in ((self.plan, key), (self.anchor.plan, self.anchor.keys[key.key])):
            for term in kp.terms:
                if plan.inputs[term.input].sha256 == sha:
                    return plan.inputs[term.input].checkpoint, term.key
        raise AssertionError(f"model {sha[:10]} is in neither plan")


class _Uploader:
    """Stored tensors to GPU parameters. Reader threads fill pinned slots with positioned reads
    (reads from the page cache scale with threads); this thread queues each filled slot's copy to
    the device, in order, straight into the parameter or through a device buffer for a cast. A
    slot is refilled only after its copy has left."""

    SLOT = 32 << 20
    READERS = 4

    def __init__(self, device: torch.device):
        self.pinned = [torch.empty(self.SLOT, dtype=torch.uint8, pin_memory=True) for _ in range(2 * self.READERS)]
        self.on_device = torch.empty(self.SLOT, dtype=torch.uint8, device=device)  # stream order guards it
        self.copied: list[torch.cuda.Event | None] = [None] * len(self.pinned)
        self.free = deque(range(len(self.pinned)))
        self.pending: deque = deque()
        self.pool = ThreadPoolExecutor(self.READERS, thread_name_prefix="upload")

    def copy(self, checkpoint, key: str, param: torch.Tensor) -> None:
        info = checkpoint.tensors[key]
        step = self.SLOT // ITEMSIZE[info.dtype]
        flat = param.view(-1)
        for start in range(0, info.numel, step):
            stop = min(start + step, info.numel)
            slot = self._take()
            read = self.pool.submit(checkpoint.pread_into, key, start, stop, self.pinned[slot])
            self.pending.append((read, slot, flat[start:stop]))
            if len(self.pending) > self.READERS:
                self._send()

    def _take(self) -> int:
        while not self.free:
            self._send()
        slot = self.free.popleft()
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()  # that buffer's last copy has left
        return slot

    def _send(self) -> None:
        read, slot, target = self.pending.popleft()
        host = read.result()
        if host.dtype == target.dtype:
            target.copy_(host, non_blocking=True)
        else:
            staged = self.on_device[: host.numel() * host.element_size()]
            staged.copy_(self.pinned[slot][: staged.numel()], non_blocking=True)
            target.copy_(staged.view(host.dtype))  # the cast, on the GPU
        event = torch.cuda.Event()
        event.record()
        self.copied[slot] = event
        self.free.append(slot)

    def abort(self) -> None:
        """Drop what is queued (after its reads end: they write into our pinned buffers)."""
        while self.pending:
            read, slot, _ = self.pending.popleft()
            try:
                read.result()
            except Exception:
                pass
            self.free.append(slot)

    def finish(self) -> None:
        while self.pending:
            self._send()
        torch.cuda.synchronize()
