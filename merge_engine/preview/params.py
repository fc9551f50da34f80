"""What a preview asks for: sampling parameters, validated without torch (the API uses them).

Beyond prompt, seeds, steps, sampler, CFG and size, the settings model makers take from their
WebUI: clip skip, hires fix, FreeU (sd-webui-freeu) and dynamic thresholding
(sd-dynamic-thresholding), each with the WebUI's (or the extension's) names, ranges and defaults,
so an A1111 payload or infotext maps onto them one to one (a1111_settings.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from merge_engine.errors import OptionsError

# Our sampler names -> the WebUI's names (written in the infotext, so the WebUI can reproduce).
SAMPLERS = {"euler": "Euler", "euler_a": "Euler a", "dpmpp_2m_karras": "DPM++ 2M Karras"}
PREDICTION_TYPES = ("epsilon", "v_prediction")
# SD2 768-v and 512-base files are identical in keys and shapes; community SD2 merges are
# overwhelmingly 768-v, so v-prediction is SD2's default and epsilon must be asked for.
DEFAULT_PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}
MIN_SIDE, MAX_SIDE = 64, 2048  # the WebUI's width and height sliders, in steps of 8
MAX_STEPS = 1000
MAX_IMAGES = 1024
# The WebUI's latent upscale modes (shared.latent_upscale_modes) and the pixel-space upscalers
# that need no model (nothing may be downloaded).
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_UPSCALERS = ("Lanczos", "Nearest")
DYNTHRES_MODES = ("Constant", "Linear Down", "Cosine Down", "Half Cosine Down", "Linear Up", "Cosine Up",
                  "Half Cosine Up", "Power Up", "Power Down", "Linear Repeating", "Cosine Repeating", "Sawtooth")
DYNTHRES_MODES_WITH_VALUE = ("Power Up", "Power Down", "Linear Repeating", "Cosine Repeating", "Sawtooth")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise OptionsError(message)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Hires:
    """The WebUI's hires fix: upscale the first pass's result (`scale`, or to `resize_x` x
    `resize_y`), then an img2img pass of `second_pass_steps` (0: as many as the first pass) at
    `denoising_strength`."""

    upscaler: str = "Latent"
    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    second_pass_steps: int = 0
    denoising_strength: float = 0.7

    def validate(self) -> None:
        _check(self.upscaler in LATENT_UPSCALERS or self.upscaler in PIXEL_UPSCALERS,
               f"hires upscaler {self.upscaler!r} is not one sdmerge has (no model-based upscalers: nothing is "
               f"downloaded); choose from {', '.join([*LATENT_UPSCALERS, *PIXEL_UPSCALERS])}")
        _check(_number(self.scale) and 1 <= self.scale <= 4, f"hires scale must be between 1 and 4, got {self.scale}")
        for name in ("resize_x", "resize_y"):
            side = getattr(self, name)
            _check(isinstance(side, int) and not isinstance(side, bool) and (side == 0 or MIN_SIDE <= side <= MAX_SIDE),
                   f"hires {name} must be 0 or between {MIN_SIDE} and {MAX_SIDE}, got {side}")
        _check(isinstance(self.second_pass_steps, int) and 0 <= self.second_pass_steps <= MAX_STEPS,
               f"hires second_pass_steps must be between 0 and {MAX_STEPS}, got {self.second_pass_steps}")
        _check(_number(self.denoising_strength) and 0 < self.denoising_strength <= 1,
               f"hires denoising_strength must be in (0, 1], got {self.denoising_strength}")

    def target_size(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(upscaled width, height, truncate_x, truncate_y), as the WebUI computes them
        (processing.calculate_target_resolution): a resize that changes the aspect is cropped."""
        if self.resize_x == 0 and self.resize_y == 0:
            return int(width * self.scale), int(height * self.scale), 0, 0
        if self.resize_y == 0:
            return self.resize_x, self.resize_x * height // width, 0, 0
        if self.resize_x == 0:
            return self.resize_y * width // height, self.resize_y, 0, 0
        if width / height < self.resize_x / self.resize_y:
            to_x, to_y = self.resize_x, self.resize_x * height // width
        else:
            to_x, to_y = self.resize_y * width // height, self.resize_y
        return to_x, to_y, (to_x - self.resize_x) // 8, (to_y - self.resize_y) // 8

    def steps(self, first_pass_steps: int) -> tuple[int, int]:
        """(steps of the schedule, steps run): the WebUI's setup_img2img_steps with explicit steps."""
        requested = self.second_pass_steps or first_pass_steps
        return int(requested / min(self.denoising_strength, 0.999)), requested - 1


@dataclass(frozen=True)
class FreeUStage:
    """One FreeU stage of sd-webui-freeu: the up-block features of 1280, 640 or 320 channels."""

    backbone_factor: float = 1.0
    skip_factor: float = 1.0
    backbone_offset: float = 0.0
    backbone_width: float = 0.5
    skip_cutoff: float = 0.0
    skip_high_end_factor: float = 1.0


@dataclass(frozen=True)
class FreeU:
    """FreeU as sd-webui-freeu applies it: per stage a backbone factor (version 2 scales it by
    each position's normalised channel mean) and a low-frequency skip factor, between
    `start_ratio` and `stop_ratio` of the sampling steps."""

    stages: tuple[FreeUStage, ...] = (FreeUStage(), FreeUStage(), FreeUStage())
    start_ratio: float = 0.0
    stop_ratio: float = 1.0
    transition_smoothness: float = 0.0
    version: str = "2"

    def __post_init__(self) -> None:
        stages = tuple(s if isinstance(s, FreeUStage) else FreeUStage(**s) for s in self.stages)
        object.__setattr__(self, "stages", (stages + (FreeUStage(),) * 3)[:3] if len(stages) <= 3 else stages)

    def validate(self) -> None:
        _check(len(self.stages) == 3, f"FreeU has 3 stages (1280, 640, 320 channels), got {len(self.stages)}")
        _check(self.version in ("1", "2"), f"FreeU version must be 1 or 2, got {self.version!r}")
        for name in ("start_ratio", "stop_ratio", "transition_smoothness"):
            value = getattr(self, name)
            _check(_number(value) and 0 <= value <= 1, f"FreeU {name} must be between 0 and 1, got {value}")
        for i, stage in enumerate(self.stages):
            for f in fields(stage):
                value = getattr(stage, f.name)
                _check(_number(value) and -10 <= value <= 10, f"FreeU stage {i} {f.name} must be a number, got {value!r}")


@dataclass(frozen=True)
class DynamicThresholding:
    """sd-dynamic-thresholding ("CFG scale fix"), with the extension's parameters and defaults;
    `threshold_percentile` is in percent, as the extension's UI and API take it."""

    mimic_scale: float = 7.0
    threshold_percentile: float = 100.0
    mimic_mode: str = "Constant"
    mimic_scale_min: float = 0.0
    cfg_mode: str = "Constant"
    cfg_scale_min: float = 0.0
    sched_val: float = 4.0
    separate_feature_channels: bool = True
    scaling_startpoint: str = "MEAN"
    variability_measure: str = "AD"
    interpolate_phi: float = 1.0

    def validate(self) -> None:
        for name, low, high in (("mimic_scale", 0, 100), ("threshold_percentile", 0, 100), ("mimic_scale_min", 0, 100),
                                ("cfg_scale_min", 0, 100), ("sched_val", 0, 100), ("interpolate_phi", 0, 1)):
            value = getattr(self, name)
            _check(_number(value) and low <= value <= high,
                   f"dynamic thresholding {name} must be between {low} and {high}, got {value!r}")
        _check(self.threshold_percentile > 0, "dynamic thresholding threshold_percentile must be above 0")
        for name in ("mimic_mode", "cfg_mode"):
            _check(getattr(self, name) in DYNTHRES_MODES,
                   f"dynamic thresholding {name} {getattr(self, name)!r} is not one of {', '.join(DYNTHRES_MODES)}")
        _check(isinstance(self.separate_feature_channels, bool), "separate_feature_channels must be true or false")
        _check(self.scaling_startpoint in ("MEAN", "ZERO"), f"scaling_startpoint must be MEAN or ZERO, got "
                                                            f"{self.scaling_startpoint!r}")
        _check(self.variability_measure in ("AD", "STD"), f"variability_measure must be AD or STD, got "
                                                          f"{self.variability_measure!r}")


@dataclass(frozen=True)
class Sampling:
    prompts: tuple[str, ...]
    negative_prompt: str = ""
    seeds: tuple[int, ...] = (0,)
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "euler"
    width: int = 512
    height: int = 512
    prediction_type: str | None = None  # None: the architecture's default (DEFAULT_PREDICTION)
    batch_size: int = 4
    clip_skip: int = 1  # the WebUI's CLIP_stop_at_last_layers
    hires: Hires | None = None
    freeu: FreeU | None = None
    dynamic_thresholding: DynamicThresholding | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        for name, kind in (("hires", Hires), ("freeu", FreeU), ("dynamic_thresholding", DynamicThresholding)):
            value = getattr(self, name)
            if isinstance(value, dict):  # from stored JSON
                object.__setattr__(self, name, kind(**value))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, targets: int = 1) -> None:
        """Raise OptionsError naming the first bad parameter."""
        if not self.prompts:
            raise OptionsError("give at least one prompt")
        if not all(isinstance(p, str) for p in self.prompts) or not isinstance(self.negative_prompt, str):
            raise OptionsError("prompts must be text")
        if not self.seeds:
            raise OptionsError("give at least one seed")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
                raise OptionsError(f"seed {seed!r} must be an integer in [0, 2^32)")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise OptionsError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        if not 0 <= self.cfg_scale <= 30:
            raise OptionsError(f"cfg_scale must be between 0 and 30, got {self.cfg_scale}")
        if self.sampler not in SAMPLERS:
            raise OptionsError(f"unknown sampler {self.sampler!r} (choose from {', '.join(SAMPLERS)})")
        for name, side in (("width", self.width), ("height", self.height)):
            if isinstance(side, bool) or not isinstance(side, int) or side % 8 or not MIN_SIDE <= side <= MAX_SIDE:
                raise OptionsError(f"{name} must be a multiple of 8 between {MIN_SIDE} and {MAX_SIDE}, got {side}")
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise OptionsError(f"unknown prediction_type {self.prediction_type!r} "
                               f"(choose from {', '.join(PREDICTION_TYPES)})")
        if not 1 <= self.batch_size <= 64:
            raise OptionsError(f"batch_size must be between 1 and 64, got {self.batch_size}")
        if isinstance(self.clip_skip, bool) or not isinstance(self.clip_skip, int) or not 1 <= self.clip_skip <= 12:
            raise OptionsError(f"clip_skip must be between 1 and 12, got {self.clip_skip}")
        for extra in (self.hires, self.freeu, self.dynamic_thresholding):
            if extra is not None:
                extra.validate()
        if self.hires is not None:
            width, height, _, _ = self.hires.target_size(self.width, self.height)
            if not (MIN_SIDE <= width <= MAX_SIDE * 2 and MIN_SIDE <= height <= MAX_SIDE * 2):
                raise OptionsError(f"hires fix would sample at {width}x{height}; at most {MAX_SIDE * 2} a side")
        total = targets * len(self.prompts) * len(self.seeds)
        if total > MAX_IMAGES:
            raise OptionsError(f"{total} images asked for; at most {MAX_IMAGES} per preview")

    @property
    def sampler_label(self) -> str:
        return SAMPLERS[self.sampler]

    def images_per_target(self) -> int:
        return len(self.prompts) * len(self.seeds)


def check_topics(topics: Sequence[Sampling], targets: int) -> None:
    """Every topic's settings, and the preview's image count."""
    if not topics:
        raise OptionsError("give at least one topic (prompt and settings)")
    for s in topics:
        s.validate(targets)
    total = targets * sum(s.images_per_target() for s in topics)
    if total > MAX_IMAGES:
        raise OptionsError(f"{total} images asked for; at most {MAX_IMAGES} per preview")
