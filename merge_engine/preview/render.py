"""Render previews: targets x prompts x seeds, as PNGs with the WebUI's infotext, plus a grid.

Targets are planned first (headers only), so a bad reference or a half model fails before any
sampling. Each target's weights are then put into the loaded modules in place (pipeline.py) and
its images are sampled in batches. Images are numbered target-major, then prompt, then seed.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from merge_engine.errors import CheckpointError, MergeCancelled, OptionsError
from merge_engine.passes import torch_device
from merge_engine.plan import Plan, Resolver, plan
from merge_engine.preview.a1111_settings import infotext_parameters
from merge_engine.preview.effects import (
    FreeUState,
    dynamic_threshold,
    freeu_active,
    upscale_image,
    upscale_latents,
)
from merge_engine.preview.grid import make_grid
from merge_engine.preview.infotext import format_parameters, write_png
from merge_engine.preview.models import architecture_config, package_config
from merge_engine.preview.params import DEFAULT_PREDICTION, LATENT_UPSCALERS, Sampling, check_topics
from merge_engine.preview.pipeline import Anchor, PreviewModel
from merge_engine.preview.prompt import tokenize_weighted
from merge_engine.preview.sampling import KARRAS, ImageNoise, Schedule, c_in, denoised_from, sample
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
class DecodeVae:
    """A VAE from another file to decode every target with (the WebUI's `sd_vae`): the targets'
    own VAEs are left in their files; the infotext names this one, with its hash."""

    ref: str | ModelLeaf  # resolved by each target's resolver
    name: str  # as the infotext names it (the WebUI: the file name)


@dataclass(frozen=True)
class RenderedImage:
    index: int
    path: Path
    target_index: int
    prompt_index: int
    seed: int
    infotext: str
    topic_index: int = 0


@dataclass(frozen=True)
class PreviewResult:
    images: list[RenderedImage]
    grid: Path | None
    seconds: float
    columns: list[str]  # the grid's column headers (one per target of a grid row)
    rows: list[str]  # its row headers (one per grid row, topic, prompt and seed)
    derived: int = 0  # components derived from the anchor's sums rather than summed


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
    sampling: Sampling | Sequence[Sampling],
    out_dir: str | os.PathLike[str],
    *,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    image_name: Callable[[int], str] = lambda n: f"images/{n}.png",
    vae: DecodeVae | None = None,
    grid_rows: Sequence[str] | None = None,
    anchor: Recipe | None = None,
) -> PreviewResult:
    """Sample every (target, topic, prompt, seed) and write the PNGs under `out_dir`
    (`image_name`), and `out_dir/grid.png` when there is more than one image. A topic is one
    `Sampling` (several: the WebUI's settings of each of a model maker's test prompts).

    With `vae`, every target decodes with that VAE (the component is taken from its file in
    memory; nothing is written). With `grid_rows` (an XY sweep), the targets are a table, row
    by row, of len(grid_rows) rows: the grid has one column per target of a row and one row per
    (grid row, topic, prompt, seed). With `anchor`, the anchor's fp64 sums are kept in memory and
    targets near it are derived from them (see `pipeline.Anchor`)."""
    started = time.perf_counter()
    if not targets:
        raise OptionsError("give at least one preview target")
    topics = [sampling] if isinstance(sampling, Sampling) else list(sampling)
    check_topics(topics, len(targets))
    columns = len(targets) // len(grid_rows) if grid_rows else len(targets)
    if grid_rows and columns * len(grid_rows) != len(targets):
        raise OptionsError(f"{len(targets)} targets do not make {len(grid_rows)} grid rows")
    torch_device, dtype = pick_device(device)
    out = Path(out_dir)
    plans: list[Plan] = []
    sampled: list[Plan] = []  # what is sampled: the target, with the decode VAE where one is given
    try:
        for target in targets:
            plans.append(plan(target.recipe, target.resolver))
            sampled.append(plan(with_vae(target.recipe, vae.ref), target.resolver) if vae else plans[-1])
        if anchor is not None:
            sampled.append(plan(anchor, targets[0].resolver))  # last: closed with the others
        renderer = _Renderer(torch_device, dtype, should_cancel, Anchor(sampled[-1]) if anchor is not None else None)
        per_target = sum(t.images_per_target() for t in topics)
        total = len(targets) * per_target
        images: list[RenderedImage] = []
        pixels: list[object] = []
        hashes: list[str] = []
        # PNG encoding (zlib) runs beside the sampling: it releases the GIL and the GPU keeps busy.
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="png") as writer:
            written = []
            for t, (target, planned, run) in enumerate(zip(targets, plans, sampled[:len(targets)], strict=True)):
                model = renderer.model_for(run, is_single_model(target.recipe) and vae is None)
                model_hash = target.model_hash or _model_hash(target, planned)
                hashes.append(model_hash)
                vae_info = _vae_info(run, vae) if vae else None
                first = t * per_target
                for index, topic, prompt_index, seed, image in renderer.images(model, topics, first):
                    s = topics[topic]
                    text = format_parameters(s.prompts[prompt_index], s.negative_prompt,
                                             infotext_parameters(s, seed, model_hash, target.model_name, vae_info))
                    path = out / image_name(index)
                    written.append(writer.submit(_write, path, image, text))
                    images.append(RenderedImage(index, path, t, prompt_index, seed, text, topic))
                    pixels.append(image)
                    if progress:
                        progress(len(images), total)
            grid = out / "grid.png" if len(images) > 1 else None
            rows = _row_labels(topics, grid_rows)
            if grid is not None:
                s = topics[0]
                grid_text = format_parameters(s.prompts[0], s.negative_prompt, infotext_parameters(
                    s, s.seeds[0], hashes[0], targets[0].model_name, _vae_info(sampled[0], vae) if vae else None))
                cells = [[pixels[(r * columns + c) * per_target + i] for c in range(columns)]
                         for r in range(len(grid_rows or [""])) for i in range(per_target)]
                labels = [t.label for t in targets[:columns]]
                written.append(writer.submit(_write, grid, make_grid(cells, labels, rows), grid_text))
            for future in written:
                future.result()
        return PreviewResult(images, grid, time.perf_counter() - started, [t.label for t in targets[:columns]],
                             rows, renderer.anchor.derived if renderer.anchor else 0)
    finally:
        for planned in {id(p): p for p in plans + sampled}.values():
            planned.close()


def with_vae(recipe: Recipe, ref: str | ModelLeaf) -> Recipe:
    """`recipe` with its VAE taken from `ref`."""
    data = recipe.model_dump(mode="json")
    data["components"] = {**data.get("components", {}),
                          "vae": ref.model_dump(mode="json", exclude_none=True) if isinstance(ref, ModelLeaf) else ref}
    return Recipe.model_validate(data)


def _vae_info(planned: Plan, vae: DecodeVae) -> tuple[str, str]:
    """("VAE hash", "VAE") as the WebUI writes them: sha256[:10] of the file, its name."""
    return planned.inputs[planned.components["vae"][0][0]].sha256[:10], vae.name


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


def _row_labels(topics: Sequence[Sampling], grid_rows: Sequence[str] | None) -> list[str]:
    """One per (grid row, topic, prompt, seed): what differs between rows."""
    seeds = len({seed for s in topics for seed in s.seeds}) > 1
    return [" · ".join(part for part in (row, f"{prompt}  (seed {seed})" if seeds else prompt) if part)
            for row in grid_rows or [""] for s in topics for prompt in s.prompts for seed in s.seeds]


class _Renderer:
    def __init__(self, device: torch.device, dtype: torch.dtype, should_cancel: Callable[[], bool] | None,
                 anchor: Anchor | None = None):
        self.device, self.dtype = device, dtype
        self.should_cancel, self.anchor = should_cancel, anchor
        self.tokenizer = CLIPTokenizer.load()
        self.default_schedule = Schedule.ldm(**package_config()["schedule"])
        self.schedule = self.default_schedule
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
        self.model.anchor = self.anchor
        self.model.load(planned, exact_copy=exact_copy, should_cancel=self.should_cancel)
        self.schedule = _schedule_of(planned) or self.default_schedule
        return self.model

    def images(self, model: PreviewModel, topics: Sequence[Sampling], base: int):
        """(index, topic, prompt index, seed, pixels) of every image of one target, numbered from
        `base` in order topic, prompt, seed. Topics that differ only in prompts, negative prompt
        and seeds share batches (twelve one-prompt topics sample as three batches of four): each
        image's noise comes from its own seed, so its pixels do not depend on its batch."""
        jobs = []
        for topic, s in enumerate(topics):
            jobs += [(topic, p, seed) for p in range(len(s.prompts)) for seed in s.seeds]
        keys = [self._batch_key(s, topic) for topic, s in enumerate(topics)]
        index = base
        for _, group in itertools.groupby(jobs, key=lambda job: keys[job[0]]):
            group = list(group)
            s = topics[group[0][0]]
            for start in range(0, len(group), s.batch_size):
                if self.should_cancel and self.should_cancel():
                    raise MergeCancelled("preview cancelled")
                batch = group[start:start + s.batch_size]
                decoded = self._sample(model, s, [topics[t].prompts[p] for t, p, _ in batch], [seed for *_, seed in batch],
                                       [topics[t].negative_prompt for t, _, _ in batch])
                for (topic, prompt_index, seed), image in zip(batch, decoded, strict=True):
                    yield index, topic, prompt_index, seed, image
                    index += 1

    def _batch_key(self, s: Sampling, topic: int) -> object:
        """What a topic's images must share with another's to be sampled in one batch: every
        setting but prompts and seeds, and prompts of one length (a batch's contexts are padded
        to its longest prompt, as in the WebUI, which would not pad a topic sampled alone). A
        topic of mixed lengths, or with dynamic thresholding over all channels at once (it
        measures the whole batch, as the extension does), keeps batches of its own."""
        lengths = {len(tokenize_weighted(p, self.tokenizer)) for p in (*s.prompts, s.negative_prompt)}
        batch_wide = s.dynamic_thresholding is not None and not s.dynamic_thresholding.separate_feature_channels
        if batch_wide or len(lengths) > 1:
            return ("alone", topic)
        return replace(s, prompts=(), negative_prompt="", seeds=()), lengths.pop()

    def _conditioning(self, model: PreviewModel, prompts: list[str],
                      skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompts' contexts as one batch, each padded with empty-prompt chunks to the
        longest (one UNet call needs equal lengths, as in the WebUI), and the pooled vectors."""
        conds = [model.encode(p, self.tokenizer, skip) for p in prompts]
        empty = model.encode("", self.tokenizer, skip).context[:WINDOW]
        chunks = max(c.context.shape[0] // WINDOW for c in conds)
        contexts = [torch.cat([c.context, *[empty] * (chunks - c.context.shape[0] // WINDOW)]) for c in conds]
        pooled = [c.pooled for c in conds]
        return (torch.stack(contexts).to(self.dtype),
                torch.stack(pooled).to(self.dtype) if pooled[0] is not None else None)

    def _sample(self, model: PreviewModel, s: Sampling, prompts: list[str], seeds: list[int],
                negatives: list[str] | None = None) -> list:
        """txt2img as the WebUI's StableDiffusionProcessingTxt2Img.sample, hires fix included, of
        one batch: `s` gives the settings, and the negative prompt unless `negatives` are given."""
        negatives = negatives or [s.negative_prompt] * len(prompts)
        channels = model.modules["unet"].settings["config"]["in_channels"]
        config = model.modules["unet"].settings["config"]
        freeu = FreeUState.for_unet(s.freeu, list(config["block_out_channels"])) if s.freeu is not None else None
        rng = ImageNoise(seeds, (channels, s.height // 8, s.width // 8), self.device)
        sigmas = self.schedule.sigmas_for(s.steps, s.sampler in KARRAS)
        x = rng() * sigmas[0]
        x = self._run(model, s, prompts, negatives, s.width, s.height, x, sigmas, rng, freeu)
        if s.hires is None:
            return self._decode(model, x)
        return self._decode(model, self._hires(model, s, prompts, negatives, seeds, x, freeu))

    def _hires(self, model: PreviewModel, s: Sampling, prompts: list[str], negatives: list[str], seeds: list[int],
               x: torch.Tensor, freeu: FreeUState | None) -> torch.Tensor:
        """`sample_hr_pass`: upscale, then img2img with the second-pass steps and denoising."""
        hires = s.hires
        assert hires is not None
        width, height, truncate_x, truncate_y = hires.target_size(s.width, s.height)
        if hires.upscaler in LATENT_UPSCALERS:
            mode, antialias = LATENT_UPSCALERS[hires.upscaler]
            x = upscale_latents(x, height, width, mode, antialias)
        else:
            x = self._encode(model, [upscale_image(image, width, height, hires.upscaler)
                                     for image in self._decode(model, x, as_images=True)], seeds)
        x = x[:, :, truncate_y // 2:x.shape[2] - (truncate_y + 1) // 2, truncate_x // 2:x.shape[3] - (truncate_x + 1) // 2]
        rng = ImageNoise(seeds, x.shape[1:], self.device)  # the WebUI starts new generators for this pass
        noise = rng()
        total, t_enc = hires.steps(s.steps)
        sigmas = self.schedule.sigmas_for(total, s.sampler in KARRAS)[total - t_enc - 1:]
        return self._run(model, s, prompts, negatives, width, height, x + noise * sigmas[0], sigmas, rng, freeu)

    def _run(self, model: PreviewModel, s: Sampling, prompts: list[str], negatives: list[str], width: int, height: int,
             x: torch.Tensor, sigmas: torch.Tensor, rng: ImageNoise, freeu: FreeUState | None) -> torch.Tensor:
        """One sampling pass from `x` (already at noise level sigmas[0])."""
        n = len(prompts)
        prediction = s.prediction_type or DEFAULT_PREDICTION[model.architecture]
        # The unconditional half first, then the conditional one, in one batch.
        context, pooled = self._conditioning(model, negatives + prompts, s.clip_skip)
        added = None
        if pooled is not None:  # SDXL's size conditioning: the size this pass samples at
            time_ids = torch.tensor([[height, width, 0, 0, height, width]] * (2 * n), dtype=self.dtype,
                                    device=self.device)
            added = {"text_embeds": pooled, "time_ids": time_ids}
        unet = model.modules["unet"].module
        steps = len(sigmas) - 1
        calls = 0
        if freeu is not None:
            freeu.sampling_steps = steps

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            # sigma stays on the host (float32, as the WebUI's schedule is): nothing here waits
            # for the GPU, so kernel launches for the next step queue up while this one runs.
            x_in = (x * c_in(sigma).view(-1, 1, 1, 1).to(x.device)).to(self.dtype)
            t = self.schedule.sigma_to_t(sigma).to(self.device)
            with torch.no_grad(), freeu_active(unet, freeu):
                out = unet(torch.cat([x_in, x_in]), torch.cat([t, t]), encoder_hidden_states=context,
                           added_cond_kwargs=added, return_dict=False)[0].float()
            pred_uncond, pred_cond = out.chunk(2)
            d_uncond = denoised_from(pred_uncond, x, sigma, prediction)
            d_cond = denoised_from(pred_cond, x, sigma, prediction)
            if s.dynamic_thresholding is not None:
                result = dynamic_threshold(d_cond, d_uncond, s.cfg_scale, s.dynamic_thresholding, calls, steps)
            else:
                result = d_uncond + (d_cond - d_uncond) * s.cfg_scale
            calls += 1
            if freeu is not None:
                freeu.current_step += 1  # the extension counts after every CFG
            return result

        return sample(s.sampler, denoise, x, sigmas, rng)

    def _decode(self, model: PreviewModel, latents: torch.Tensor, as_images: bool = False) -> list:
        """`decode_first_stage`, then the WebUI's clamp((x + 1) / 2) * 255 cast to uint8 (truncated)."""
        vae = model.modules["vae"].module
        scale = model.modules["vae"].settings["config"]["scaling_factor"]
        vae_dtype = next(vae.parameters()).dtype
        with torch.no_grad():
            images = vae.decode((latents / scale).to(vae_dtype), return_dict=False)[0]
        images = (255.0 * torch.clamp((images.float() + 1.0) / 2.0, min=0.0, max=1.0)).to(torch.uint8)
        arrays = [image.permute(1, 2, 0).cpu().numpy() for image in images]
        if not as_images:
            return arrays
        from PIL import Image

        return [Image.fromarray(array) for array in arrays]

    def _encode(self, model: PreviewModel, images: list, seeds: list[int]) -> torch.Tensor:
        """`images_tensor_to_samples`: pixels to the latent posterior's sample, times the scale. The
        WebUI draws the sample's noise from its global generator, last seeded with the batch's
        last seed; here each image's own seed seeds it (the same at batch size 1)."""
        import numpy as np

        vae = model.modules["vae"].module
        scale = model.modules["vae"].settings["config"]["scaling_factor"]
        vae_dtype = next(vae.parameters()).dtype
        pixels = torch.from_numpy(np.stack([np.moveaxis(np.array(i).astype(np.float32) / 255.0, 2, 0) for i in images]))
        with torch.no_grad():
            posterior = vae.encode((pixels * 2 - 1).to(self.device, vae_dtype), return_dict=False)[0]
        mean, std = posterior.mean.float(), posterior.std.float()
        noise = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(int(seed)))
                             for seed in seeds]).to(mean.device)
        return (mean + std * noise) * scale


def _schedule_of(planned: Plan) -> Schedule | None:
    """The checkpoint's own alphas_cumprod, where it has one (the WebUI samples with it)."""
    key = next((k for k in planned.keys if k.key == "alphas_cumprod"), None)
    if key is None:
        return None
    term = key.terms[0]
    values = planned.inputs[term.input].checkpoint.read_tensor(term.key).reshape(-1)
    return Schedule(values) if values.numel() >= 2 and bool(torch.isfinite(values).all()) else None


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


