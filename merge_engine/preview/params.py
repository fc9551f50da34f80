"""What a preview asks for: sampling parameters, validated without torch (the API uses them)."""

from __future__ import annotations

from dataclasses import dataclass

from merge_engine.errors import OptionsError

# Our sampler names -> the WebUI's names (written in the infotext, so the WebUI can reproduce).
SAMPLERS = {"euler": "Euler", "euler_a": "Euler a", "dpmpp_2m_karras": "DPM++ 2M Karras"}
PREDICTION_TYPES = ("epsilon", "v_prediction")
# SD2 768-v and 512-base files are identical in keys and shapes; community SD2 merges are
# overwhelmingly 768-v, so v-prediction is SD2's default and epsilon must be asked for.
DEFAULT_PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}
MAX_SIDE = 2048
MAX_STEPS = 150
MAX_IMAGES = 1024


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "seeds", tuple(self.seeds))

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
        if not 1 <= self.steps <= MAX_STEPS:
            raise OptionsError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        if not 0 <= self.cfg_scale <= 30:
            raise OptionsError(f"cfg_scale must be between 0 and 30, got {self.cfg_scale}")
        if self.sampler not in SAMPLERS:
            raise OptionsError(f"unknown sampler {self.sampler!r} (choose from {', '.join(SAMPLERS)})")
        for name, side in (("width", self.width), ("height", self.height)):
            if not isinstance(side, int) or side % 8 or not 8 <= side <= MAX_SIDE:
                raise OptionsError(f"{name} must be a multiple of 8 between 8 and {MAX_SIDE}, got {side}")
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise OptionsError(f"unknown prediction_type {self.prediction_type!r} "
                               f"(choose from {', '.join(PREDICTION_TYPES)})")
        if not 1 <= self.batch_size <= 64:
            raise OptionsError(f"batch_size must be between 1 and 64, got {self.batch_size}")
        total = targets * len(self.prompts) * len(self.seeds)
        if total > MAX_IMAGES:
            raise OptionsError(f"{total} images asked for; at most {MAX_IMAGES} per preview")

    @property
    def sampler_label(self) -> str:
        return SAMPLERS[self.sampler]

    def images_per_target(self) -> int:
        return len(self.prompts) * len(self.seeds)
