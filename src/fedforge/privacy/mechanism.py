"""The Gaussian mechanism on client updates: clipping, noise, adaptive clipping, and its settings.

Pure functions over dicts of tensors; randomness is always an explicit `torch.Generator`.

- DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
  Models"): each update's delta is clipped to L2 norm C, the clipped deltas are summed,
  Gaussian noise of std z*C is added to the sum, and the result is divided by the *expected*
  number of clients m. Dividing by the actual (or a noisy) count would make the denominator
  depend on who took part, and the sensitivity analysis would no longer hold.
- Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy 2021, "Differentially Private
  Learning with Adaptive Clipping"): C tracks the gamma-quantile of the update norms by the
  geometric step C <- C * exp(-eta * (b - gamma)), where b is a noised estimate of the fraction
  of updates with norm <= C. The count is itself a Gaussian mechanism, so the update noise
  shrinks to keep the total privacy that of one Gaussian of multiplier z (the paper's Thm. 1):
  z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2).

Only floating-point entries form the clipped vector and carry noise. Integer entries (e.g.
BatchNorm's `num_batches_tracked`, which counts a client's batches and so reveals its data
size) are outside the guarantee: the clipping leaves them as they are, and the privacy stage
does not release them (their mean delta is zero, so the global buffer keeps its value).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from ..errors import ConfigError

State = dict[str, torch.Tensor]

MODES = ("central", "client", "local")
# A clipped delta is scaled to just under C, so that rounding never takes its norm above C.
_CLIP_MARGIN = 1e-6
# x of `local_bound`: an honest local-DP update is over the bound with probability at most e^-x = 1e-9.
HONEST_TAIL = 9 * math.log(10)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclass(frozen=True)
class PrivacyConfig:
    """How updates are privatised, validated once.

    Attributes:
        noise_multiplier: z: the noise std over the clip bound, the total of the mechanism
            (with adaptive clipping, the count's noise takes a share of it; see
            `update_noise_multiplier`). 0 clips without noise: no privacy.
        expected_clients: m, the expected cohort size (q * N for Poisson sampling, k for a
            fixed size): the noisy sum is divided by it.
        mode: "central": the server clips and noises the raw updates. "client": each client
            clips before sending, the server only adds the noise (the deployment default; the
            server still sees the clipped updates one by one). "local": each client clips and
            noises its own update (std z*C), the server adds nothing: protects against the
            server too, at a cost of sqrt(m) more noise on the mean.
        clip: C, the L2 bound on each client's delta (the initial C when adaptive).
        adaptive: C follows the `target_quantile` of the update norms (Andrew et al. 2021).
        target_quantile: gamma, the fraction of updates meant to be left unclipped.
        clip_lr: eta, the step of the geometric update of C.
        count_stddev: sigma_b, the std of the noise on the unclipped count; None is m / 20.
    """

    noise_multiplier: float
    expected_clients: float
    mode: str = "client"
    clip: float = 1.0
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"privacy mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not (_finite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not (_finite(self.expected_clients) and self.expected_clients > 0):
            raise ConfigError(f"expected_clients must be > 0, got {self.expected_clients}")
        if not (_finite(self.clip) and self.clip > 0):
            raise ConfigError(f"clip bound must be > 0, got {self.clip}")
        if not self.adaptive:
            return
        if self.mode == "local":
            raise ConfigError("adaptive clipping needs the server to count unclipped updates: not with mode 'local'")
        if not (_finite(self.target_quantile) and 0 < self.target_quantile < 1):
            raise ConfigError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        if not (_finite(self.clip_lr) and self.clip_lr > 0):
            raise ConfigError(f"clip_lr must be > 0, got {self.clip_lr}")
        if self.count_stddev is not None and not (_finite(self.count_stddev) and self.count_stddev > 0):
            raise ConfigError(f"count_stddev must be > 0, got {self.count_stddev}")
        if self.noise_multiplier >= 2 * self.count_std:
            raise ConfigError(
                f"noise_multiplier {self.noise_multiplier} needs count_stddev > "
                f"{self.noise_multiplier / 2} for adaptive clipping, got {self.count_std}"
            )

    @property
    def count_std(self) -> float:
        """sigma_b: the std of the noise on the unclipped count (the paper's default m / 20)."""
        return self.count_stddev if self.count_stddev is not None else self.expected_clients / 20

    @property
    def update_noise_multiplier(self) -> float:
        """The multiplier of the noise on the update sum: z, or with adaptive clipping
        (z^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al. 2021, Thm. 1), so that the update and
        the count together are one Gaussian mechanism of multiplier z."""
        z = self.noise_multiplier
        if not self.adaptive or z == 0:
            return z
        return (z**-2 - (2 * self.count_std) ** -2) ** -0.5


def l2_norm(delta: State) -> float:
    """The L2 norm of all floating-point entries together, as one vector (in float64)."""
    norms = [torch.linalg.vector_norm(v.detach(), dtype=torch.float64) for v in delta.values() if v.is_floating_point()]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def clip_delta(delta: State, clip: float) -> tuple[State, float]:
    """The delta scaled to L2 norm <= `clip` (unchanged if already within), and its norm before.

    All float entries are one vector (the user-level bound of DP-FedAvg); integer entries are
    returned as they are (see the module docstring)."""
    norm = l2_norm(delta)
    if norm <= clip:
        return dict(delta), norm
    factor = clip / norm * (1 - _CLIP_MARGIN)
    return {k: v * factor if v.is_floating_point() else v for k, v in delta.items()}, norm


def local_bound(clip: float, noise_multiplier: float, size: int, tail: float = HONEST_TAIL) -> float:
    """The norm an honest local-DP update stays within but with probability e^-tail (1e-9 by default).

    Such an update is a delta clipped to C plus noise N(0, (zC)^2 I_d), d = `size` (the model's
    float entries), so its norm is at most C + ||noise||, and ||noise||^2 / (zC)^2 is chi-square
    with d degrees of freedom, which passes d + 2 sqrt(d x) + 2x with probability at most e^-x
    (Laurent and Massart 2000, Lemma 1). The bound is C (1 + z sqrt(d + 2 sqrt(d x) + 2x)): the
    server clips a local-DP update to it, so that one client moves the noised sum by no more than
    an honest client could (and not, say, by a norm of 10^6)."""
    return clip * (1 + noise_multiplier * math.sqrt(size + 2 * math.sqrt(size * tail) + 2 * tail))


def gaussian_noise(like: State, std: float, generator: torch.Generator) -> State:
    """Noise N(0, std^2) for each float entry of `like`, drawn on the CPU (so the same seed gives
    the same noise on every device and engine) and moved to the entry's device."""
    return {
        k: (torch.randn(v.shape, generator=generator, dtype=v.dtype) * std).to(v.device)
        for k, v in like.items()
        if v.is_floating_point()
    }


def add_noise(tensors: State, std: float, generator: torch.Generator) -> State:
    """`tensors` plus Gaussian noise of `std` on each float entry; std 0 returns them as they are."""
    if std == 0:
        return dict(tensors)
    noise = gaussian_noise(tensors, std, generator)
    return {k: v + noise[k] if k in noise else v for k, v in tensors.items()}


def adapt_clip(
    clip: float, unclipped: int, count: int, config: PrivacyConfig, generator: torch.Generator
) -> tuple[float, float]:
    """Andrew et al. (2021), Algorithm 1: the next clip bound, and the noised estimate of the
    fraction of updates that were not clipped.

    The count is centred, sum(b_i - 1/2), so that one client moves it by at most 1/2, noised
    with std sigma_b, divided by the expected m and shifted back by 1/2 (as in TensorFlow
    Privacy's quantile estimator): the Gaussian of multiplier 2 sigma_b in the paper's Thm. 1.

    Args:
        unclipped: how many updates of this round had norm <= clip (b_i = 1).
        count: how many updates there were.
    """
    noise = float(torch.randn((), generator=generator, dtype=torch.float64))
    estimate = (unclipped - count / 2 + config.count_std * noise) / config.expected_clients + 0.5
    return clip * math.exp(-config.clip_lr * (estimate - config.target_quantile)), estimate


def secure_generator() -> torch.Generator:
    """A generator for deployment noise, seeded from the OS's cryptographic source (`secrets`).

    The seed is unpredictable, so the noise cannot be replayed from a known seed as the
    simulation's can. Limits, as in most DP libraries' default mode: torch's Mersenne Twister
    is not a cryptographic generator, and floating-point Gaussian samples leak through their
    low bits (Mironov 2012, "On Significance of the Least Significant Bits for Differential
    Privacy"); neither is addressed here.
    """
    return torch.Generator().manual_seed(secrets.randbits(63))
