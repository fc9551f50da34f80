"""Render previews: targets x prompts x seeds, as PNGs with the WebUI's infotext, plus a grid.

Targets are planned first (headers only), so a bad reference or a half model fails before any
sampling. Each target's weights are then put into the loaded modules in place (pipeline.py) and
its images are sampled in batches. Images are numbered target-major, then prompt, then seed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_engine.errors import CheckpointError, MergeCancelled, OptionsError
from merge_engine.passes import torch_device
from merge_engine.plan import Plan, Resolver, plan
from merge_engine.preview.grid import make_grid
from merge_engine.preview.infotext import format_infotext, write_png
from merge_engine.preview.models import architecture_config, package_config
from merge_engine.preview.params import DEFAULT_PREDICTION, Sampling
from merge_engine.preview.pipeline import PreviewModel
from merge_engine.preview.sampling import KARRAS, Schedule, c_in, denoised_from, sample
from merge_engine.preview.tokenizer import CHUNK_LENGTH, CLIPTokenizer
from merge_engine.recipe import ModelLeaf, Recipe

__all__ = ["Sampling", "Target", "RenderedImage", "PreviewResult", "render_previews", "is_single_model"]

WINDOW = CHUNK_LENGTH + 2


@dataclass(frozen=True)
class Target:
    label: str
    recipe: Recipe
    resolver: Resolver
    model_name: str
    model_hash: str | None = None  # None: sha256[:10] of a single file, else the recipe hash[:10]


@dataclass(frozen=True)
class RenderedImage:
    index: int
    path: Path
    target_index: int
    prompt_index: int
    seed: int
    infotext: str


@dataclass(frozen=True)
class PreviewResult:
    images: list[RenderedImage]
    grid: Path | None
    seconds: float
    columns: list[str]  # the grid's column headers (one per target)
    rows: list[str]  # its row headers (one per prompt and seed)


def is_single_model(recipe: Recipe) -> bool:
    """A recipe that is one file, as is: its weights are loaded exactly, not re-rounded."""
    return not recipe.components and isinstance(recipe.merge, str | ModelLeaf)


def pick_device(device: str) -> tuple[torch.device, torch.dtype]:
    """"auto": the GPU in fp16 when there is one, else the CPU in fp32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = torch_device(device)
    return chosen, (torch.float16 if chosen.type == "cuda" else torch.float32)


def render_previews(
    targets: Sequence[Target],
    sampling: Sampling,
    out_dir: str | os.PathLike[str],
    *,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    image_name: Callable[[int], str] = lambda n: f"images/{n}.png",
) -> PreviewResult:
    """Sample every (target, prompt, seed) and write the PNGs under `out_dir` (`image_name`), and
    `out_dir/grid.png` when there is more than one image."""
    started = time.perf_counter()
    if not targets:
        raise OptionsError("give at least one preview target")
    sampling.validate(len(targets))
    torch_device, dtype = pick_device(device)
    out = Path(out_dir)
    plans: list[Plan] = []
    try:
        for target in targets:
            plans.append(plan(target.recipe, target.resolver))
        renderer = _Renderer(sampling, torch_device, dtype, should_cancel)
        total = len(targets) * sampling.images_per_target()
        images: list[RenderedImage] = []
        pixels: list[object] = []
        hashes: list[str] = []
        # PNG encoding (zlib) runs beside the sampling: it releases the GIL and the GPU keeps busy.
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="png") as writer:
            written = []
            for t, (target, planned) in enumerate(zip(targets, plans, strict=True)):
                model = renderer.model_for(planned, is_single_model(target.recipe))
                model_hash = target.model_hash or _model_hash(target, planned)
                hashes.append(model_hash)
                for index, prompt_index, seed, image in renderer.images(model, t):
                    text = format_infotext(sampling.prompts[prompt_index], sampling.negative_prompt, sampling.steps,
                                           sampling.sampler_label, sampling.cfg_scale, seed, sampling.width,
                                           sampling.height, model_hash, target.model_name)
                    path = out / image_name(index)
                    written.append(writer.submit(_write, path, image, text))
                    images.append(RenderedImage(index, path, t, prompt_index, seed, text))
                    pixels.append(image)
                    if progress:
                        progress(len(images), total)
            grid = out / "grid.png" if len(images) > 1 else None
            if grid is not None:
                grid_text = _grid_infotext(targets, sampling, hashes[0])
                written.append(writer.submit(_write, grid, _grid(targets, sampling, pixels), grid_text))
            for future in written:
                future.result()
        return PreviewResult(images, grid, time.perf_counter() - started, [t.label for t in targets],
                             _row_labels(sampling))
    finally:
        for planned in plans:
            planned.close()


def _model_hash(target: Target, planned: Plan) -> str:
    if is_single_model(target.recipe):
        return planned.inputs[0].sha256[:10]
    return planned.recipe_hash[:10]


def _write(path: Path, image, infotext: str) -> Path:
    """Write under a temporary name and rename: a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write_png(partial, image, infotext)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _grid(targets: Sequence[Target], sampling: Sampling, pixels: list) -> object:
    per_target = sampling.images_per_target()
    rows = [[pixels[t * per_target + r] for t in range(len(targets))] for r in range(per_target)]
    return make_grid(rows, [t.label for t in targets], _row_labels(sampling))


def _row_labels(sampling: Sampling) -> list[str]:
    return [f"{prompt}  (seed {seed})" if len(sampling.seeds) > 1 else prompt
            for prompt in sampling.prompts for seed in sampling.seeds]


def _grid_infotext(targets: Sequence[Target], sampling: Sampling, model_hash: str) -> str:
    return format_infotext(sampling.prompts[0], sampling.negative_prompt, sampling.steps, sampling.sampler_label,
                           sampling.cfg_scale, sampling.seeds[0], sampling.width, sampling.height,
                           model_hash, targets[0].model_name)


class _Renderer:
    def __init__(self, sampling: Sampling, device: torch.device, dtype: torch.dtype,
                 should_cancel: Callable[[], bool] | None):
        self.sampling, self.device, self.dtype = sampling, device, dtype
        self.should_cancel = should_cancel
        self.tokenizer = CLIPTokenizer.load()
        self.schedule = Schedule(**package_config()["schedule"])
        self.model: PreviewModel | None = None  # one architecture's modules in memory at a time

    def model_for(self, planned: Plan, exact_copy: bool) -> PreviewModel:
        architecture = planned.architecture or ""
        architecture_config(architecture)  # a clear error for what cannot be previewed
        if planned.variant not in (None, "normal"):
            raise CheckpointError(f"previews sample text-to-image models; this is a {planned.variant} UNet "
                                  "(it needs an image or mask input)",
                                  model=planned.recipe.name or planned.inputs[0].name, component="unet")
        if self.model is None or self.model.architecture != architecture:
            self.model = None  # let the old modules go before the new ones are built
            self.model = _kept(architecture, self.device, self.dtype)
        self.model.load(planned, exact_copy=exact_copy, should_cancel=self.should_cancel)
        return self.model

    def images(self, model: PreviewModel, target_index: int):
        s = self.sampling
        jobs = [(p, seed) for p in range(len(s.prompts)) for seed in s.seeds]
        base = target_index * len(jobs)
        for start in range(0, len(jobs), s.batch_size):
            if self.should_cancel and self.should_cancel():
                raise MergeCancelled("preview cancelled")
            batch = jobs[start:start + s.batch_size]
            decoded = self._sample(model, batch)
            for offset, ((prompt_index, seed), image) in enumerate(zip(batch, decoded, strict=True)):
                yield base + start + offset, prompt_index, seed, image

    def _conditioning(self, model: PreviewModel, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompts' contexts as one batch, each padded with empty-prompt chunks to the
        longest (one UNet call needs equal lengths, as in the WebUI), and the pooled vectors."""
        conds = [model.encode(p, self.tokenizer) for p in prompts]
        empty = model.encode("", self.tokenizer).context[:WINDOW]
        chunks = max(c.context.shape[0] // WINDOW for c in conds)
        contexts = [torch.cat([c.context, *[empty] * (chunks - c.context.shape[0] // WINDOW)]) for c in conds]
        pooled = [c.pooled for c in conds]
        return (torch.stack(contexts).to(self.dtype),
                torch.stack(pooled).to(self.dtype) if pooled[0] is not None else None)

    def _sample(self, model: PreviewModel, batch: list[tuple[int, int]]) -> list:
        s = self.sampling
        n = len(batch)
        prediction = s.prediction_type or DEFAULT_PREDICTION[model.architecture]
        # The unconditional half first, then the conditional one, in one batch.
        context, pooled = self._conditioning(model, [s.negative_prompt] * n + [s.prompts[p] for p, _ in batch])
        added = None
        if pooled is not None:
            size = [s.height, s.width, 0, 0, s.height, s.width]
            time_ids = torch.tensor([size] * (2 * n), dtype=self.dtype, device=self.device)
            added = {"text_embeds": pooled, "time_ids": time_ids}
        unet = model.modules["unet"].module
        guidance = s.cfg_scale

        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            # sigma is a Python float: nothing here waits for the GPU, so kernel launches for the
            # next step queue up while this one runs.
            x_in = (x * c_in(sigma)).to(self.dtype)
            t = torch.full((2 * n,), self.schedule.sigma_to_t(sigma), dtype=torch.float32, device=self.device)
            with torch.no_grad():
                out = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=context,
                           added_cond_kwargs=added, return_dict=False)[0].float()
            pred_uncond, pred_cond = out.chunk(2)
            d_uncond = denoised_from(pred_uncond, x, sigma, prediction)
            d_cond = denoised_from(pred_cond, x, sigma, prediction)
            return d_uncond + guidance * (d_cond - d_uncond)

        generators = [torch.Generator().manual_seed(seed) for _, seed in batch]
        latent_shape = (model.modules["unet"].settings["config"]["in_channels"], s.height // 8, s.width // 8)
        noise = torch.stack([torch.randn(latent_shape, generator=g) for g in generators]).to(self.device)
        sigmas = self.schedule.sigmas_for(s.steps, s.sampler in KARRAS)
        x = noise * float(sigmas[0])
        x = sample(s.sampler, denoise, x, sigmas, generators)
        return self._decode(model, x)

    def _decode(self, model: PreviewModel, latents: torch.Tensor) -> list:
        vae = model.modules["vae"].module
        scale = model.modules["vae"].settings["config"]["scaling_factor"]
        vae_dtype = next(vae.parameters()).dtype
        with torch.no_grad():
            images = vae.decode((latents / scale).to(vae_dtype), return_dict=False)[0]
        images = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return [image.permute(1, 2, 0).cpu().numpy() for image in images]


# On a GPU the last model stays loaded between calls (a worker's next preview job often wants the
# same UNet); its components are still rewritten whenever their fingerprints differ.
_KEPT: dict[tuple[str, torch.device, torch.dtype], PreviewModel] = {}


def _kept(architecture: str, device: torch.device, dtype: torch.dtype) -> PreviewModel:
    if device.type == "cpu":
        return PreviewModel(architecture, device, dtype)
    key = (architecture, device, dtype)
    if key not in _KEPT:
        _KEPT.clear()
        _KEPT[key] = PreviewModel(architecture, device, dtype)
    return _KEPT[key]


