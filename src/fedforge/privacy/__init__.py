"""User-level differential privacy: clipped and noised updates, and the accountant.

A stage of the round loop (select -> run clients -> privatize -> server optimizer), never a
strategy wrapper. `sampling` says who takes part, `mechanism` holds the clipping and noise,
`stage` applies them to a round's updates, `accountant` turns the run into (epsilon, delta)
with Google's dp-accounting (the optional `dp` extra).
"""

from __future__ import annotations

from .accountant import Accountant, calibrate, check_delta, check_epsilon, round_event
from .mechanism import (
    HONEST_TAIL,
    PrivacyConfig,
    adapt_clip,
    add_noise,
    clip_delta,
    gaussian_noise,
    l2_norm,
    local_bound,
    secure_generator,
)
from .run import SAMPLINGS, DifferentialPrivacy, PrivacyRun, PrivacyRunState, sampling_for
from .sampling import FixedSizeSampling, PoissonSampling, Sampling, poisson_sample
from .stage import PrivacyState, PrivacyStats, check_strategy, privatize, privatize_update

__all__ = [
    "HONEST_TAIL",
    "SAMPLINGS",
    "Accountant",
    "DifferentialPrivacy",
    "FixedSizeSampling",
    "PoissonSampling",
    "PrivacyConfig",
    "PrivacyRun",
    "PrivacyRunState",
    "PrivacyState",
    "PrivacyStats",
    "Sampling",
    "adapt_clip",
    "add_noise",
    "calibrate",
    "check_delta",
    "check_epsilon",
    "check_strategy",
    "clip_delta",
    "gaussian_noise",
    "l2_norm",
    "local_bound",
    "poisson_sample",
    "privatize",
    "privatize_update",
    "round_event",
    "sampling_for",
    "secure_generator",
]
