"""Samplers over the sigma (noise level) parametrisation, as the WebUI runs k-diffusion's.

The schedule is k-diffusion's `DiscreteSchedule` over the model's own `alphas_cumprod` (the
checkpoint's buffer when it has one, else ldm's: betas linear in sqrt between 0.00085 and 0.012
over 1000 steps, cumulated in float64 and stored as float32), and everything after is float32
tensors, as the WebUI computes it: sigmas, the discretisations (`get_sigmas`, Karras), the
timestep of a sigma (log-sigma interpolation), and each sampler's update. The denoiser
(`denoised_from`) is `CompVisDenoiser` / `CompVisVDenoiser`.

Noise comes from one CPU generator per image, seeded with that image's seed (the WebUI's
`ImageRNG` with "RNG: CPU"): the first draw is the initial latent, later draws feed the
ancestral samplers; the hires pass starts a new generator per image. The numbers are then the
same on any device and batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma per image) -> denoised
Noise = Callable[[], torch.Tensor]  # the next draw of every image's generator, shaped like x


class Schedule:
    def __init__(self, alphas_cumprod: torch.Tensor):
        alphas_cumprod = alphas_cumprod.to(torch.float32)
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def ldm(cls, beta_start: float, beta_end: float, train_steps: int) -> Schedule:
        """ldm's `register_schedule` ("linear"): float64 betas and their cumulative product,
        made a float32 buffer."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, train_steps, dtype=torch.float64).numpy() ** 2
        return cls(torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32))

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high = low + 1
        lo, hi = self.log_sigmas[low], self.log_sigmas[high]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * high).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def get_sigmas(self, n: int) -> torch.Tensor:
        """`DiscreteSchedule.get_sigmas(n)`: n levels evenly spaced in timestep, then 0."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return _append_zero(self.t_to_sigma(t))

    def karras(self, n: int, rho: float = 7.0) -> torch.Tensor:
        """`get_sigmas_karras` between the model's smallest and largest sigma."""
        ramp = torch.linspace(0, 1, n)
        lo, hi = self.sigma_min ** (1 / rho), self.sigma_max ** (1 / rho)
        return _append_zero((hi + ramp * (lo - hi)) ** rho)

    def sigmas_for(self, steps: int, karras: bool) -> torch.Tensor:
        return self.karras(steps) if karras else self.get_sigmas(steps)


def _append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


def denoised_from(prediction: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, kind: str) -> torch.Tensor:
    """The denoised estimate from the UNet's output at noise level `sigma` (one per image)."""
    sigma = sigma.view(-1, *([1] * (x.ndim - 1))).to(x.device)
    if kind == "epsilon":  # CompVisDenoiser: c_out = -sigma
        return x + prediction * -sigma
    c_skip = 1 / (sigma**2 + 1)  # CompVisVDenoiser, sigma_data = 1
    c_out = -sigma * 1 / (sigma**2 + 1) ** 0.5
    return prediction * c_out + x * c_skip


def c_in(sigma: torch.Tensor) -> torch.Tensor:
    return 1 / (sigma**2 + 1) ** 0.5


def sample(sampler: str, denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise) -> torch.Tensor:
    """Run `sampler` from x (noise already scaled to sigmas[0]) down to the last sigma."""
    return _SAMPLERS[sampler](denoise, x, sigmas, noise)


def _euler(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise) -> torch.Tensor:
    s_in = torch.ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i] * s_in)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def _euler_ancestral(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise) -> torch.Tensor:
    s_in = torch.ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise() * sigma_up
    return x


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """k-diffusion's `get_ancestral_step`: the noise level to step down to, and the noise to add."""
    if not eta:
        return sigma_to, sigma_to.new_zeros([])
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def _dpmpp_2m(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise) -> torch.Tensor:
    """DPM-Solver++(2M): second order from the previous step's denoised estimate."""
    s_in = torch.ones(x.shape[0])
    old = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i] * s_in)
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * denoised
        else:
            r = (t - -sigmas[i - 1].log()) / h
            blended = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * blended
        old = denoised
    return x


_SAMPLERS = {"euler": _euler, "euler_a": _euler_ancestral, "dpmpp_2m_karras": _dpmpp_2m}
KARRAS = {"dpmpp_2m_karras"}


class ImageNoise:
    """The WebUI's `ImageRNG` with "RNG: CPU": one generator per image, seeded with its seed."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device):
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.shape, self.device = tuple(shape), device

    def __call__(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)
