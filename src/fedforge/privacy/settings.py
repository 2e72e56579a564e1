"""Differential privacy as settings."""

from __future__ import annotations

from dataclasses import dataclass

from .._options import check_choices, option
from ..errors import ConfigError
from .accountant import METHODS
from .mechanism import MODES
from .run import DifferentialPrivacy


@dataclass(frozen=True)
class PrivacySettings:
    """Differential privacy (TOML: flat keys or the table [privacy]); off unless `dp` is set."""

    dp: str | None = option(
        None,
        "differential privacy: client (clients clip, the server adds noise), central (the "
        "server clips and noises) or local (each client noises its own update)",
        MODES,
    )
    clip: float = option(1.0, "dp: the bound C on each client's update norm (the first C with adaptive_clip)")
    noise_multiplier: float | None = option(None, "dp: noise std over C (default: calibrated for target_epsilon)")
    target_epsilon: float | None = option(None, "dp: the privacy budget; the run stops before a round would pass it")
    delta: float = option(1e-5, "dp: delta of the (epsilon, delta) guarantee; < 1/num_clients")
    adaptive_clip: bool = option(False, "dp: C follows clip_quantile of the update norms (Andrew et al. 2021)")
    clip_quantile: float = option(0.5, "dp, adaptive_clip: the share of updates meant to be left unclipped")
    clip_lr: float = option(0.2, "dp, adaptive_clip: step of the geometric update of C")
    accountant: str | None = option(
        None,
        "dp: pld or rdp (default: pld; rdp for fixed-size sampling, the only analysis dp-accounting has for it)",
        METHODS,
    )

    def __post_init__(self):
        check_choices(self, PrivacySettings)
        if self.dp is None and (self.target_epsilon is not None or self.noise_multiplier is not None):
            raise ConfigError(
                "target_epsilon and noise_multiplier are for differential privacy: add --dp client (or central, local)"
            )
        self.privacy()

    def privacy(self) -> DifferentialPrivacy | None:
        """The run's differential privacy settings, or None without --dp."""
        if self.dp is None:
            return None
        return DifferentialPrivacy(
            mode=self.dp,
            clip=self.clip,
            noise_multiplier=self.noise_multiplier,
            target_epsilon=self.target_epsilon,
            delta=self.delta,
            adaptive=self.adaptive_clip,
            target_quantile=self.clip_quantile,
            clip_lr=self.clip_lr,
            accountant=self.accountant,
        )
