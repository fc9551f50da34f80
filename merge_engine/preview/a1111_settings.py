"""Preview settings in the WebUI's own words: an A1111 txt2img API body (`/sdapi/v1/txt2img`), a
pasted infotext, and the infotext sdmerge writes, key for key in the WebUI's order.

Whatever a body or an infotext says that sdmerge cannot honour (another sampler, a refiner, face
restoration, an extension it does not have, a GPU noise source...) is an `OptionsError` naming
every such field: a setting is never dropped silently. Fields that only say where an image came
from (the model, its hash, the WebUI version) are not settings and are ignored.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from merge_engine.errors import OptionsError
from merge_engine.preview.infotext import parse_infotext
from merge_engine.preview.params import (
    DYNTHRES_MODES_WITH_VALUE,
    SAMPLERS,
    DynamicThresholding,
    FreeU,
    FreeUStage,
    Hires,
    Sampling,
)

WEBUI_SAMPLERS = {label: name for name, label in SAMPLERS.items()}
DYNTHRES_SCRIPT = "dynamic thresholding (cfg scale fix)"
FREEU_SCRIPT = "freeu"
# txt2img body fields sdmerge accepts only with the value that changes nothing
NEUTRAL = {
    "styles": [], "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1,
    "restore_faces": False, "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False,
    "eta": None, "s_min_uncond": 0, "s_churn": 0, "s_tmax": None, "s_tmin": 0, "s_noise": 1,
    "override_settings_restore_afterwards": True, "refiner_checkpoint": None, "refiner_switch_at": None,
    "disable_extra_networks": False, "firstpass_image": None, "comments": None, "firstphase_width": 0,
    "firstphase_height": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None,
    "hr_prompt": "", "hr_negative_prompt": "", "force_task_id": None, "sampler_index": None,
    "script_name": None, "script_args": [], "send_images": True, "save_images": False, "infotext": None,
    "hr_additional_modules": None, "hr_cfg": None, "hr_distilled_cfg": None,
}
NEUTRAL_SETTINGS = {"randn_source": "CPU", "eta_noise_seed_delta": 0, "sdxl_clip_l_skip": False,
                    "use_old_hires_fix_width_height": False, "img2img_extra_noise": 0,
                    "sgm_noise_multiplier": False, "always_discard_next_to_last_sigma": False}
IDENTITY_KEYS = ("Model", "Model hash", "Version", "User", "Prompt", "Negative prompt")


def infotext_parameters(s: Sampling, seed: int, model_hash: str, model_name: str,
                        vae: tuple[str, str] | None = None) -> dict[str, Any]:
    """The infotext's parameters in the WebUI's order (`processing.create_infotext`): its fixed
    keys, then the extras in the order the WebUI adds them (FreeU's in `process`, hires fix's in
    `init`, dynamic thresholding's in `process_batch`)."""
    p: dict[str, Any] = {"Steps": s.steps, "Sampler": s.sampler_label, "CFG scale": s.cfg_scale, "Seed": seed,
                         "Size": f"{s.width}x{s.height}", "Model hash": model_hash, "Model": model_name}
    if vae is not None:
        p["VAE hash"], p["VAE"] = vae
    if s.hires is not None:
        p["Denoising strength"] = s.hires.denoising_strength
    if s.clip_skip > 1:
        p["Clip skip"] = s.clip_skip
    p["RNG"] = "CPU"
    if s.freeu is not None:
        p.update(_freeu_parameters(s.freeu))
    if s.hires is not None:
        h = s.hires
        if h.resize_x == 0 and h.resize_y == 0:
            p["Hires upscale"] = h.scale
        else:
            p["Hires resize"] = f"{h.resize_x}x{h.resize_y}"
        if h.second_pass_steps:
            p["Hires steps"] = h.second_pass_steps
        p["Hires upscaler"] = h.upscaler
    if s.dynamic_thresholding is not None:
        p.update(_dynthres_parameters(s.dynamic_thresholding))
    return p


def _freeu_parameters(f: FreeU) -> dict[str, Any]:
    default = FreeUStage()
    dicts = [{x.name: getattr(stage, x.name) for x in fields(stage) if getattr(stage, x.name) != getattr(default, x.name)}
             for stage in f.stages]
    while dicts and not dicts[-1]:  # the extension drops trailing default stages
        dicts.pop()
    return {"FreeU Stages": json.dumps(dicts),
            "FreeU Schedule": ", ".join(str(v) for v in (f.start_ratio, f.stop_ratio, f.transition_smoothness)),
            "FreeU Version": f.version}


def _dynthres_parameters(d: DynamicThresholding) -> dict[str, Any]:
    p: dict[str, Any] = {"Dynamic thresholding enabled": True, "Mimic scale": d.mimic_scale,
                         "Separate Feature Channels": d.separate_feature_channels,
                         "Scaling Startpoint": d.scaling_startpoint, "Variability Measure": d.variability_measure,
                         "Interpolate Phi": d.interpolate_phi, "Threshold percentile": d.threshold_percentile}
    if d.mimic_mode != "Constant":
        p["Mimic mode"], p["Mimic scale minimum"] = d.mimic_mode, d.mimic_scale_min
    if d.cfg_mode != "Constant":
        p["CFG mode"], p["CFG scale minimum"] = d.cfg_mode, d.cfg_scale_min
    if d.cfg_mode in DYNTHRES_MODES_WITH_VALUE or d.mimic_mode in DYNTHRES_MODES_WITH_VALUE:
        p["Scheduler value"] = d.sched_val
    return p


# -- a txt2img API body --------------------------------------------------------------------------

def from_txt2img_payload(body: Any, *, seeds_given: bool = False) -> tuple[Sampling, str | None]:
    """(sampling, the VAE file name `override_settings.sd_vae` asks for, or None). A random seed
    (-1, the API's default) is refused unless `seeds_given`: the caller sets the seeds itself."""
    if not isinstance(body, dict):
        raise OptionsError("an A1111 txt2img payload is a JSON object")
    refused: list[str] = []
    known = {"prompt", "negative_prompt", "seed", "steps", "cfg_scale", "sampler_name", "scheduler", "width",
             "height", "batch_size", "n_iter", "enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps",
             "hr_resize_x", "hr_resize_y", "denoising_strength", "override_settings", "alwayson_scripts", *NEUTRAL}
    for key, value in body.items():
        if key not in known:
            refused.append(f"{key} (unknown to the txt2img API)")
        elif key in NEUTRAL and not _neutral(key, value, body):
            refused.append(f"{key}={value!r}")
    kwargs: dict[str, Any] = {"prompts": (_text(body.get("prompt", ""), "prompt"),),
                              "negative_prompt": _text(body.get("negative_prompt", ""), "negative_prompt")}
    seed = body.get("seed", -1)
    count = int(body.get("batch_size", 1) or 1) * int(body.get("n_iter", 1) or 1)
    if seeds_given and seed == -1:
        pass
    elif not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        refused.append(f"seed={seed!r} (a preview needs a fixed seed; -1 asks for a random one)")
    else:  # the WebUI numbers the images of a batch and its iterations from the seed up
        kwargs["seeds"] = tuple(seed + i for i in range(max(1, count)))
    for key, name in (("steps", "steps"), ("cfg_scale", "cfg_scale"), ("width", "width"), ("height", "height"),
                      ("batch_size", "batch_size")):
        if key in body:
            kwargs[name] = body[key]
    sampler = _sampler(body.get("sampler_name", "Euler"), body.get("scheduler"), refused)
    if sampler:
        kwargs["sampler"] = sampler
    vae = None
    settings = body.get("override_settings") or {}
    if not isinstance(settings, dict):
        refused.append("override_settings (not an object)")
        settings = {}
    for key, value in settings.items():
        if key == "CLIP_stop_at_last_layers":
            kwargs["clip_skip"] = value
        elif key == "sd_vae":
            vae = None if value in (None, "", "None", "Automatic") else str(value)
        elif key not in NEUTRAL_SETTINGS or value != NEUTRAL_SETTINGS[key]:
            refused.append(f"override_settings.{key}={value!r}")
    if body.get("enable_hr"):
        kwargs["hires"] = Hires(upscaler=body.get("hr_upscaler") or "Latent", scale=body.get("hr_scale", 2.0),
                                resize_x=body.get("hr_resize_x", 0) or 0, resize_y=body.get("hr_resize_y", 0) or 0,
                                second_pass_steps=body.get("hr_second_pass_steps", 0) or 0,
                                denoising_strength=body.get("denoising_strength", 0.7))
    scripts = body.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        refused.append("alwayson_scripts (not an object)")
        scripts = {}
    for title, script in scripts.items():
        args = script.get("args") if isinstance(script, dict) else None
        if str(title).lower() == DYNTHRES_SCRIPT:
            if (found := _dynthres_args(args, refused)) is not None:
                kwargs["dynamic_thresholding"] = found
        elif str(title).lower() == FREEU_SCRIPT:
            if (found := _freeu_args(args, refused)) is not None:
                kwargs["freeu"] = found
        else:
            refused.append(f"alwayson_scripts.{title} (an extension sdmerge does not have)")
    _refuse(refused, "txt2img payload")
    return _built(kwargs), vae


def _neutral(key: str, value: Any, body: dict) -> bool:
    """Whether a body field sdmerge does not implement is at a value that changes nothing."""
    if key == "subseed" or key.startswith("seed_resize_from"):  # no effect without their strength
        return not body.get("subseed_strength") if key == "subseed" else value in (-1, 0, None)
    if key == "eta":  # None: the sampler's default (1 for Euler a, the only sampler here it touches)
        return value in (None, 1, 1.0)
    if key in ("s_noise",):
        return value in (None, 1, 1.0)
    if key == "s_tmax":
        return value in (None, 0, float("inf"))
    return value == NEUTRAL[key] or value in (None, "", [], 0, False) and NEUTRAL[key] in (None, "", [], 0, False)


def _dynthres_args(args: Any, refused: list[str]) -> DynamicThresholding | None:
    """The extension's ui() order: enabled, mimic_scale, threshold_percentile, mimic_mode,
    mimic_scale_min, cfg_mode, cfg_scale_min, sched_val, separate_feature_channels,
    scaling_startpoint, variability_measure, interpolate_phi."""
    names = ["mimic_scale", "threshold_percentile", "mimic_mode", "mimic_scale_min", "cfg_mode", "cfg_scale_min",
             "sched_val", "separate_feature_channels", "scaling_startpoint", "variability_measure", "interpolate_phi"]
    if not isinstance(args, list) or not args or not isinstance(args[0], bool) or len(args) > len(names) + 1:
        refused.append("alwayson_scripts.Dynamic Thresholding (CFG Scale Fix).args (expected [enabled, mimic_scale, "
                       "threshold_percentile, ...] as the extension's API takes them)")
        return None
    return DynamicThresholding(**dict(zip(names, args[1:], strict=False))) if args[0] else None


def _freeu_args(args: Any, refused: list[str]) -> FreeU | None:
    """sd-webui-freeu's process(): a dict of its State, or [enable, start_ratio, stop_ratio,
    transition_smoothness, version, then 6 numbers per stage]."""
    if isinstance(args, list) and len(args) == 1 and isinstance(args[0], dict):
        state = dict(args[0])
        if not state.pop("enable", True):
            return None
        stages = [FreeUStage(**s) if isinstance(s, dict) else s for s in state.pop("stage_infos", [])]
        return FreeU(stages=tuple(stages), version=str(state.pop("version", "1")).removeprefix("Version "),
                     **state)
    if isinstance(args, list) and args and isinstance(args[0], bool) and len(args) >= 5:
        if not args[0]:
            return None
        flat, stages = args[5:], []
        per = len(fields(FreeUStage))
        for i in range(0, len(flat), per):
            stages.append(FreeUStage(*flat[i:i + per]))
        return FreeU(stages=tuple(stages), start_ratio=args[1], stop_ratio=args[2], transition_smoothness=args[3],
                     version=str(args[4]).removeprefix("Version "))
    refused.append("alwayson_scripts.FreeU.args (expected the extension's [enable, start, stop, smoothness, "
                   "version, stage values...] or [{...}])")
    return None


def _sampler(name: Any, scheduler: Any, refused: list[str]) -> str | None:
    label = str(name)
    if scheduler not in (None, "", "Automatic"):
        label = f"{label} {scheduler}" if label == "DPM++ 2M" and scheduler == "Karras" else f"{label}|{scheduler}"
    if label in WEBUI_SAMPLERS:
        return WEBUI_SAMPLERS[label]
    refused.append(f"sampler {name!r}{f' with schedule {scheduler!r}' if scheduler else ''} (sdmerge has "
                   f"{', '.join(WEBUI_SAMPLERS)})")
    return None


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise OptionsError(f"{what} must be text")
    return value


def _refuse(refused: list[str], what: str) -> None:
    if refused:
        raise OptionsError(f"the {what} asks for what sdmerge cannot honour: {'; '.join(refused)}",
                           details={"refused": refused})


def _built(kwargs: dict[str, Any]) -> Sampling:
    try:
        sampling = Sampling(**kwargs)
    except TypeError as exc:
        raise OptionsError(f"bad preview settings: {exc}") from None
    sampling.validate()
    return sampling


# -- a pasted infotext ---------------------------------------------------------------------------

def from_infotext(text: str) -> tuple[Sampling, str | None]:
    """(sampling, the VAE file name the infotext names, or None) from a WebUI infotext."""
    if not isinstance(text, str) or not text.strip():
        raise OptionsError("an infotext is the text the WebUI writes under an image (prompt, then parameters)")
    found = parse_infotext(text)
    refused: list[str] = []
    take = dict(found)
    kwargs: dict[str, Any] = {"prompts": (take.pop("Prompt"),), "negative_prompt": take.pop("Negative prompt")}
    for key in IDENTITY_KEYS:
        take.pop(key, None)
    for key, name, kind in (("Steps", "steps", int), ("CFG scale", "cfg_scale", float), ("Seed", "seeds", int),
                            ("Clip skip", "clip_skip", int)):
        if key in take:
            value = _parse(take.pop(key), kind, key, refused)
            if value is not None:
                kwargs[name] = (value,) if name == "seeds" else value
    if "Size" in take:
        width, _, height = take.pop("Size").partition("x")
        kwargs["width"], kwargs["height"] = _parse(width, int, "Size", refused), _parse(height, int, "Size", refused)
    sampler = _sampler(take.pop("Sampler", "Euler"), take.pop("Schedule type", None), refused)
    if sampler:
        kwargs["sampler"] = sampler
    if take.pop("RNG", "CPU") != "CPU":
        refused.append("RNG (only the CPU noise source is reproduced)")
    if str(take.pop("ENSD", "0")) != "0":
        refused.append("ENSD (eta noise seed delta)")
    vae = take.pop("VAE", None)
    take.pop("VAE hash", None)
    hires = {}
    for key, name, kind in (("Hires upscale", "scale", float), ("Hires steps", "second_pass_steps", int),
                            ("Hires upscaler", "upscaler", str), ("Denoising strength", "denoising_strength", float)):
        if key in take:
            hires[name] = _parse(take.pop(key), kind, key, refused)
    if "Hires resize" in take:
        x, _, y = take.pop("Hires resize").partition("x")
        hires["resize_x"], hires["resize_y"] = _parse(x, int, "Hires resize", refused), _parse(y, int, "Hires resize", refused)
    if set(hires) - {"denoising_strength"}:
        kwargs["hires"] = Hires(**hires)
    elif hires:
        refused.append("Denoising strength without hires fix (an img2img setting; previews are txt2img)")
    if "FreeU Stages" in take or "FreeU Schedule" in take:
        kwargs["freeu"] = _freeu_infotext(take, refused)
    if take.pop("Dynamic thresholding enabled", None) is not None:
        kwargs["dynamic_thresholding"] = _dynthres_infotext(take, refused)
    refused += [f"{key}: {value}" for key, value in take.items()]
    _refuse(refused, "infotext")
    return _built(kwargs), vae


def _freeu_infotext(take: dict[str, str], refused: list[str]) -> FreeU | None:
    try:
        stages = [FreeUStage(**s) for s in json.loads(take.pop("FreeU Stages", "[]"))]
        start, stop, smooth, *_ = (float(v) for v in take.pop("FreeU Schedule", "0.0, 1.0, 0.0").split(", "))
    except (ValueError, TypeError) as exc:
        refused.append(f"FreeU Stages / Schedule ({exc})")
        return None
    return FreeU(stages=tuple(stages), start_ratio=start, stop_ratio=stop, transition_smoothness=smooth,
                 version=take.pop("FreeU Version", "1"))


def _dynthres_infotext(take: dict[str, str], refused: list[str]) -> DynamicThresholding:
    fields_ = {"Mimic scale": ("mimic_scale", float), "Threshold percentile": ("threshold_percentile", float),
               "Mimic mode": ("mimic_mode", str), "Mimic scale minimum": ("mimic_scale_min", float),
               "CFG mode": ("cfg_mode", str), "CFG scale minimum": ("cfg_scale_min", float),
               "Scheduler value": ("sched_val", float), "Separate Feature Channels": ("separate_feature_channels", bool),
               "Scaling Startpoint": ("scaling_startpoint", str), "Variability Measure": ("variability_measure", str),
               "Interpolate Phi": ("interpolate_phi", float)}
    kwargs = {}
    for key, (name, kind) in fields_.items():
        if key in take:
            kwargs[name] = _parse(take.pop(key), kind, key, refused)
    return DynamicThresholding(**kwargs)


def _parse(value: str, kind: type, key: str, refused: list[str]) -> Any:
    try:
        if kind is bool:
            if value not in ("True", "False"):
                raise ValueError(value)
            return value == "True"
        if kind is int:
            number = float(value)
            if not number.is_integer():
                raise ValueError(value)
            return int(number)
        return kind(value)
    except ValueError:
        refused.append(f"{key}: {value!r} (not a {kind.__name__})")
        return None
