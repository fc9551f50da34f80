"""What the WebUI's extensions and hires fix do to sampling, written from their definitions.

* FreeU as sd-webui-freeu applies it (`lib_free_u/unet.py`): at every skip concatenation of the
  UNet's up path, the features of 1280, 640 and 320 channels (stages 0-2; the extension names
  them by width, which are SD1, SD2 and SDXL's up-path widths; here the UNet's own widths,
  widest first, so the same holds for any model, tiny test models included) have a channel band
  scaled by the backbone factor (version 2: by 1 + (b - 1) times each position's min-max
  normalised channel mean) and the skip features' lowest frequencies scaled by the skip factor,
  while the sampling step lies between the start and stop ratios.
* Dynamic thresholding as sd-dynamic-thresholding's `dynthres_core.DynThresh` computes it.
* Hires fix's upscaling: the WebUI's latent modes (torch's interpolate) and its Lanczos and
  Nearest upscalers (PIL), as `processing.sample_hr_pass` and `images.resize_image` use them.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch

from merge_engine.preview.params import DynamicThresholding, FreeU, FreeUStage

STAGE_CHANNELS = (1280, 640, 320)


# -- FreeU --------------------------------------------------------------------------------------

class FreeUState:
    """The extension's global state for one sampling: the settings, the step counter (kept across
    the first pass and the hires pass, as the extension's callback counts) and the pass's steps."""

    def __init__(self, settings: FreeU, stage_channels: tuple[int, ...] = STAGE_CHANNELS) -> None:
        self.settings, self.stage_channels = settings, stage_channels
        self.current_step = 0
        self.sampling_steps = 1

    @classmethod
    def for_unet(cls, settings: FreeU, block_out_channels: list[int]) -> FreeUState:
        """The stages are the up path's widths, widest first (SD's 1280, 640, 320)."""
        return cls(settings, tuple(sorted(set(block_out_channels), reverse=True))[:3])

    def schedule_ratio(self) -> float:
        """`get_schedule_ratio` of lib_free_u/unet.py."""
        s = self.settings
        start, stop = int(s.start_ratio * self.sampling_steps), int(s.stop_ratio * self.sampling_steps)
        step = self.current_step
        if start == stop:
            smooth = 0.0
        elif step < start:
            smooth = min(1.0, max(0.0, step / start))
        else:
            smooth = min(1.0, max(0.0, 1 + (step - start) / (start - stop)))
        flat = 1.0 if start <= step < stop else 0.0
        return _lerp(flat, smooth, s.transition_smoothness)


_active = threading.local()


@contextlib.contextmanager
def freeu_active(unet: torch.nn.Module, state: FreeUState | None) -> Iterator[None]:
    """While in this block, the UNet's up blocks apply `state` (None: FreeU off)."""
    _install_hook()
    blocks = getattr(unet, "up_blocks", [])
    for block in blocks:  # diffusers calls apply_freeu only where these are truthy
        for name in ("s1", "s2", "b1", "b2"):
            setattr(block, name, 1.0 if state is not None else None)
    _active.state = state
    try:
        yield
    finally:
        _active.state = None
        for block in blocks:
            for name in ("s1", "s2", "b1", "b2"):
                setattr(block, name, None)


def _install_hook() -> None:
    from diffusers.models.unets import unet_2d_blocks

    if getattr(unet_2d_blocks.apply_freeu, "sdmerge", False):
        return
    original = unet_2d_blocks.apply_freeu

    def apply_freeu(resolution_idx, hidden_states, res_hidden_states, **kwargs):
        state = getattr(_active, "state", None)
        if state is None:
            return original(resolution_idx, hidden_states, res_hidden_states, **kwargs)
        return free_u(hidden_states, res_hidden_states, state)

    apply_freeu.sdmerge = True
    unet_2d_blocks.apply_freeu = apply_freeu


def free_u(h: torch.Tensor, h_skip: torch.Tensor, state: FreeUState) -> tuple[torch.Tensor, torch.Tensor]:
    """`free_u_cat_hijack`, before its concatenation: the backbone `h` and the skip `h_skip`."""
    ratio = state.schedule_ratio()
    channels = h.shape[1]
    if ratio == 0 or channels not in state.stage_channels:
        return h, h_skip
    stage: FreeUStage = state.settings.stages[state.stage_channels.index(channels)]
    begin, end, inverted = ratio_to_region(stage.backbone_width, stage.backbone_offset, channels)
    index = torch.arange(channels, device=h.device)
    mask = (begin <= index) & (index <= end)
    if inverted:
        mask = ~mask
    mask = mask.reshape(1, -1, 1, 1).to(h.dtype)
    scale = backbone_scale(h, _lerp(1, stage.backbone_factor, ratio), state.settings.version)
    h = h * (mask * scale + (1 - mask))
    h_skip = filter_skip(h_skip, stage.skip_cutoff, _lerp(1, stage.skip_factor, ratio),
                         _lerp(1, stage.skip_high_end_factor, ratio))
    return h, h_skip


def backbone_scale(h: torch.Tensor, factor: float, version: str) -> torch.Tensor | float:
    if version == "1" or factor == 1:
        return factor
    mean = h.mean(1, keepdim=True)
    batch = h.shape[0]
    high = mean.view(batch, -1).max(dim=-1, keepdim=True).values
    low = mean.view(batch, -1).min(dim=-1, keepdim=True).values
    normalised = (mean - low.unsqueeze(2).unsqueeze(3)) / (high - low).unsqueeze(2).unsqueeze(3)
    # A feature map of one position has no spread: 0/0, where the extension would write NaN.
    return 1 + (factor - 1) * torch.nan_to_num(normalised, nan=0.0)


def filter_skip(x: torch.Tensor, threshold: float, scale: float, scale_high: float) -> torch.Tensor:
    if scale == 1 and scale_high == 1:
        return x
    freq = torch.fft.fftshift(torch.fft.fftn(x.to(torch.float32), dim=(-2, -1)), dim=(-2, -1))
    b, c, height, width = freq.shape
    mask = torch.full((b, c, height, width), float(scale_high), device=x.device)
    crow, ccol = height // 2, width // 2
    rows, cols = max(1, math.floor(crow * threshold)), max(1, math.floor(ccol * threshold))
    mask[..., crow - rows:crow + rows, ccol - cols:ccol + cols] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(x.dtype)


def ratio_to_region(width: float, offset: float, n: int) -> tuple[int, int, bool]:
    if width < 0:
        offset += width
        width = -width
    width = min(width, 1)
    if offset < 0:
        offset = 1 + offset - int(offset)
    offset = math.fmod(offset, 1.0)
    if width + offset <= 1:
        inverted, start, end = False, offset * n, (width + offset) * n
    else:
        inverted, start, end = True, (width + offset - 1) * n, offset * n
    return round(start), round(end), inverted


def _lerp(a: float, b: float, r: float) -> float:
    return (1 - r) * a + r * b


# -- dynamic thresholding -------------------------------------------------------------------------

def interpret_scale(scale: float, mode: str, minimum: float, step: int, max_steps: int, sched_val: float) -> float:
    """`DynThresh.interpret_scale`: a scale scheduled over the steps (fractions of max_steps - 1)."""
    scale -= minimum
    frac = step / (max_steps - 1) if max_steps > 1 else 0.0
    if mode == "Linear Down":
        scale *= 1.0 - frac
    elif mode == "Half Cosine Down":
        scale *= math.cos(frac)
    elif mode == "Cosine Down":
        scale *= math.cos(frac * 1.5707)
    elif mode == "Linear Up":
        scale *= frac
    elif mode == "Half Cosine Up":
        scale *= 1.0 - math.cos(frac)
    elif mode == "Cosine Up":
        scale *= 1.0 - math.cos(frac * 1.5707)
    elif mode == "Power Up":
        scale *= math.pow(frac, sched_val)
    elif mode == "Power Down":
        scale *= 1.0 - math.pow(frac, sched_val)
    elif mode == "Linear Repeating":
        portion = (frac * sched_val) % 1.0
        scale *= (0.5 - portion) * 2 if portion < 0.5 else (portion - 0.5) * 2
    elif mode == "Cosine Repeating":
        scale *= math.cos(frac * 6.28318 * sched_val) * 0.5 + 0.5
    elif mode == "Sawtooth":
        scale *= (frac * sched_val) % 1.0
    return scale + minimum


def dynamic_threshold(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float, settings: DynamicThresholding,
                      step: int, max_steps: int) -> torch.Tensor:
    """`DynThresh.dynthresh` for one conditioning per image of weight 1 (denoised predictions
    [batch, C, H, W])."""
    s = settings
    mimic = interpret_scale(s.mimic_scale, s.mimic_mode, s.mimic_scale_min, step, max_steps, s.sched_val)
    cfg = interpret_scale(cfg_scale, s.cfg_mode, s.cfg_scale_min, step, max_steps, s.sched_val)
    relative = cond - uncond
    mim_target = uncond + relative * mimic
    cfg_target = uncond + relative * cfg
    mim_flat, cfg_flat = mim_target.flatten(2), cfg_target.flatten(2)
    mim_means, cfg_means = mim_flat.mean(dim=2).unsqueeze(2), cfg_flat.mean(dim=2).unsqueeze(2)
    mim_centered, cfg_centered = mim_flat - mim_means, cfg_flat - cfg_means
    percentile = s.threshold_percentile * 0.01
    if s.separate_feature_channels:
        if s.variability_measure == "STD":
            mim_ref, cfg_ref = mim_centered.std(dim=2).unsqueeze(2), cfg_centered.std(dim=2).unsqueeze(2)
        else:
            mim_ref = mim_centered.abs().max(dim=2).values.unsqueeze(2)
            cfg_ref = torch.quantile(cfg_centered.abs(), percentile, dim=2).unsqueeze(2)
    elif s.variability_measure == "STD":
        mim_ref, cfg_ref = mim_centered.std(), cfg_centered.std()
    else:
        mim_ref, cfg_ref = mim_centered.abs().max(), torch.quantile(cfg_centered.abs(), percentile)
    if s.scaling_startpoint == "ZERO":
        result = cfg_flat * (mim_ref / cfg_ref)
    else:
        if s.variability_measure == "STD":
            renormalized = (cfg_centered / cfg_ref) * mim_ref
        else:
            top = torch.maximum(mim_ref, cfg_ref)
            renormalized = (cfg_centered.clamp(-top, top) / top) * mim_ref
        result = renormalized + cfg_means
    result = result.unflatten(2, mim_target.shape[2:])
    if s.interpolate_phi != 1.0:
        result = result * s.interpolate_phi + cfg_target * (1.0 - s.interpolate_phi)
    return result


# -- hires fix's upscalers ------------------------------------------------------------------------

def upscale_latents(latents: torch.Tensor, height: int, width: int, mode: str, antialias: bool) -> torch.Tensor:
    return torch.nn.functional.interpolate(latents, size=(height // 8, width // 8), mode=mode, antialias=antialias)


def upscale_image(image, width: int, height: int, upscaler: str):
    """`images.resize_image(0, image, width, height, upscaler_name)` for the model-free upscalers."""
    from PIL import Image

    lanczos = Image.Resampling.LANCZOS
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:  # Upscaler.upscale: to a multiple of 8, at most three rounds of do_upscale
        dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
        resample = lanczos if upscaler == "Lanczos" else Image.Resampling.NEAREST
        for _ in range(3):
            if image.width >= dest_w and image.height >= dest_h:
                break
            image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
        if image.width != dest_w or image.height != dest_h:
            image = image.resize((dest_w, dest_h), resample=lanczos)
    if image.width != width or image.height != height:
        image = image.resize((width, height), resample=lanczos)
    return image
