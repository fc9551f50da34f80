"""Samplers over the sigma (noise level) parametrisation, as the WebUI's k-diffusion samplers work.

The training schedule is ldm's: betas linear in sqrt between 0.00085 and 0.012 over 1000 steps.
A denoiser wraps the UNet: it scales the input by 1/sqrt(sigma^2+1), passes the continuous
timestep that matches sigma, and turns the prediction (epsilon or v) into a denoised estimate;
classifier-free guidance runs the unconditional and conditional halves in one batch.

Noise comes from one CPU generator per image, seeded with that image's seed: the first draw is
the initial latent, later draws feed the ancestral samplers. The numbers are then the same on
any device and batch size, and equal the WebUI's with its "RNG: CPU" setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Denoise = Callable[[torch.Tensor, float], torch.Tensor]  # (x, sigma) -> denoised


class Schedule:
    def __init__(self, beta_start: float, beta_end: float, train_steps: int):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, train_steps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: float) -> float:
        """The continuous timestep whose sigma this is (log-sigma interpolation)."""
        log_sigma = math.log(sigma)
        low = int(self.log_sigmas.le(log_sigma).sum()) - 1
        low = min(max(low, 0), len(self.log_sigmas) - 2)
        lo, hi = float(self.log_sigmas[low]), float(self.log_sigmas[low + 1])
        w = min(max((lo - log_sigma) / (lo - hi), 0.0), 1.0)
        return low + w

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        low, high = t.floor().long(), t.ceil().long()
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def sigmas_for(self, steps: int, karras: bool) -> torch.Tensor:
        """`steps` noise levels from the highest down, then 0 (k-diffusion's discretisations)."""
        if karras:
            rho = 7.0
            ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
            lo, hi = self.sigma_min ** (1 / rho), self.sigma_max ** (1 / rho)
            sigmas = (hi + ramp * (lo - hi)) ** rho
        else:
            t = torch.linspace(len(self.sigmas) - 1, 0, steps, dtype=torch.float64)
            sigmas = self.t_to_sigma(t)
        return torch.cat([sigmas, sigmas.new_zeros(1)])


def denoised_from(prediction: torch.Tensor, x: torch.Tensor, sigma: float, kind: str) -> torch.Tensor:
    if kind == "epsilon":
        return x - sigma * prediction
    # v-prediction: x0 = c_skip * x + c_out * v
    return x * (1 / (sigma**2 + 1)) - prediction * (sigma / (sigma**2 + 1) ** 0.5)


def c_in(sigma: float) -> float:
    return 1 / (sigma**2 + 1) ** 0.5


def sample(sampler: str, denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor,
           generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Run `sampler` from x (already scaled by sigmas[0]) down to sigma 0."""
    step = _SAMPLERS[sampler]
    state: dict = {}
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        x = step(x, denoised, sigma, sigma_next, generators, state)
    return x


def _euler(x, denoised, sigma, sigma_next, generators, state):
    d = (x - denoised) / sigma
    return x + d * (sigma_next - sigma)


def _euler_ancestral(x, denoised, sigma, sigma_next, generators, state):
    sigma_up = min(sigma_next, math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0)))
    sigma_down = math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))
    d = (x - denoised) / sigma
    x = x + d * (sigma_down - sigma)
    if sigma_next > 0:
        x = x + noise_like(x, generators) * sigma_up
    return x


def _dpmpp_2m(x, denoised, sigma, sigma_next, generators, state):
    """DPM-Solver++(2M): second order from the previous step's denoised estimate."""
    t, t_next = -math.log(sigma), (-math.log(sigma_next) if sigma_next > 0 else math.inf)
    h = t_next - t
    old = state.get("old_denoised")
    if old is None or sigma_next == 0:
        d = denoised
    else:
        r = state["h_last"] / h
        d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
    state["old_denoised"], state["h_last"] = denoised, h
    if sigma_next == 0:
        return denoised
    return (sigma_next / sigma) * x - math.expm1(-h) * d


_SAMPLERS = {"euler": _euler, "euler_a": _euler_ancestral, "dpmpp_2m_karras": _dpmpp_2m}
KARRAS = {"dpmpp_2m_karras"}


def noise_like(x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One draw per image from its own CPU generator, moved to x's device and dtype."""
    shape = x.shape[1:]
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]).to(x.device, x.dtype)
