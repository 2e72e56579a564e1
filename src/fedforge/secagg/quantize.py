"""Fixed point in the ring Z_{2^32}: what a client masks, and how the server reads the sum back.

A client's input is one vector of uint32 words: its example-weighted, clipped update
`round(w * delta * scale)` (every float entry of the model, in the global state's order), then
two counters: whether its update was within the clip bound before clipping (adaptive clipping's
bit), and its weighted training loss `round(w * loss * loss_scale)`. Its weight w (its example
count, at most `max_weight`; 1 under differential privacy, where every update counts once) is not
in the sum: the client declares it beside its masked input and the server refuses one past
`max_weight`, so that no client's share of the round's weight passes the cap (a counter inside
the sum could only be range-checked in total). Negative numbers wrap (two's complement), so the
masked sum mod 2^32 read as int32 is the sum.

The scales are the largest that cannot wrap: n clients with |delta_j| <= clip (an L2 bound on the
whole delta bounds each coordinate) and w <= max_weight sum to at most n * max_weight * clip in
absolute value, which the scale maps inside int32 with room for n roundings. A ring too small for
the sum of the weights is refused before the round (`QuantizationError`). Rounding to nearest
puts at most half a step on each client's coordinate, so each coordinate of the weighted mean is
off by at most `error_bound(count, total_weight)` = count / (2 * scale * total_weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RING_BITS = 32
RING_MAX = (1 << (RING_BITS - 1)) - 1  # the largest sum a coordinate may reach, read as int32
COUNTERS = 2  # unclipped, weighted loss
LOSS_BOUND = 1e4  # training losses are clamped to [-LOSS_BOUND, LOSS_BOUND] for the round's mean


class QuantizationError(ValueError):
    """A ring that cannot hold the sum, or an input past the bounds it was set up for."""


@dataclass(frozen=True)
class Quantizer:
    """The fixed point of one round of `clients` clients (the n the scales are set for)."""

    clients: int
    clip: float
    max_weight: int

    def __post_init__(self):
        if not (type(self.clients) is int and self.clients >= 1):
            raise QuantizationError(f"clients must be an integer >= 1, got {self.clients!r}")
        if not (isinstance(self.clip, (int, float)) and 0 < self.clip < 1e30):
            raise QuantizationError(f"the clip bound must be a number > 0, got {self.clip!r}")
        if not (type(self.max_weight) is int and self.max_weight >= 1):
            raise QuantizationError(f"max_weight must be an integer >= 1, got {self.max_weight!r}")
        if self.clients * self.max_weight > RING_MAX - self.clients:
            raise QuantizationError(
                f"the sum of {self.clients} weights of up to {self.max_weight} can wrap a {RING_BITS}-bit ring: "
                f"lower the weight bound (secagg_max_examples) or the clients per round"
            )

    @property
    def scale(self) -> float:
        return (RING_MAX - self.clients) / (self.clients * self.max_weight * self.clip)

    @property
    def loss_scale(self) -> float:
        return (RING_MAX - self.clients) / (self.clients * self.max_weight * LOSS_BOUND)

    def length(self, size: int) -> int:
        """The words of the input of a model with `size` float parameters."""
        return size + COUNTERS

    def encode(self, delta: np.ndarray, weight: int, unclipped: bool, loss: float) -> np.ndarray:
        """One client's input: `delta` (float, already clipped to L2 norm <= clip) weighted."""
        if not (type(weight) is int and 1 <= weight <= self.max_weight):
            raise QuantizationError(f"weight {weight!r} is not between 1 and {self.max_weight}")
        delta = np.asarray(delta, dtype=np.float64)
        peak = float(np.abs(delta).max()) if delta.size else 0.0
        if not np.isfinite(peak) or peak > self.clip * (1 + 1e-6):
            raise QuantizationError(f"a coordinate of {peak:.6g} is past the clip bound {self.clip:g}")
        q = np.rint(np.clip(delta, -self.clip, self.clip) * (weight * self.scale)).astype(np.int64)
        loss = float(np.clip(loss, -LOSS_BOUND, LOSS_BOUND)) if np.isfinite(loss) else LOSS_BOUND
        counters = np.array([int(unclipped), round(weight * loss * self.loss_scale)], dtype=np.int64)
        return np.concatenate([q, counters]).astype(np.uint32)

    def decode(self, total: np.ndarray, count: int, weight: int) -> Sum:
        """The sum of `count` clients' inputs, from its words mod 2^32, `weight` the sum of the
        weights they declared. A coordinate or counter past what `count` inputs within the bounds
        can reach (a client sent words past them; masking hides which) is clamped to that reach
        and counted in `Sum.clamped`, and a sum whose L2 norm is past Σw · clip (the most the
        clipped inputs' sum can have) is scaled down to it (`Sum.projected`): the round goes on,
        and whatever a client sent, the sum stays within 2 Σw · clip of the honest clients' sum in
        L2. QuantizationError for a count or declared weights the round cannot have."""
        if not 1 <= count <= self.clients:
            raise QuantizationError(f"a sum of {count} inputs, the ring is set for at most {self.clients}")
        if not count <= weight <= count * self.max_weight:
            raise QuantizationError(f"declared weights out of range for {count} inputs (total weight {weight})")
        signed = np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.int64)
        q, (unclipped, loss) = signed[:-COUNTERS], signed[-COUNTERS:].tolist()
        reach = int(weight * self.clip * self.scale) + count
        loss_reach = int(weight * LOSS_BOUND * self.loss_scale) + count
        clamped = (
            int(np.count_nonzero(np.abs(q) > reach)) + int(not 0 <= unclipped <= count) + int(abs(loss) > loss_reach)
        )
        total_delta = np.clip(q, -reach, reach).astype(np.float64) / self.scale
        # Honest inputs have L2 norms of at most w_i * clip (and half a step of rounding in each
        # coordinate), so their sum lies in that ball: a sum outside it is brought back to it.
        norm = float(np.linalg.norm(total_delta))
        ball = weight * self.clip + count * 0.5 * math.sqrt(total_delta.size) / self.scale
        projected = norm > ball
        if projected:
            total_delta *= ball / norm
        unclipped, loss = min(max(unclipped, 0), count), min(max(loss, -loss_reach), loss_reach)
        return Sum(total_delta, weight, unclipped, loss / self.loss_scale / weight, count, clamped, projected)

    def error_bound(self, count: int, total_weight: int) -> float:
        """The most each coordinate of the weighted mean can differ from the exact one."""
        return count / (2 * self.scale * total_weight)


@dataclass(frozen=True)
class Sum:
    """What the server learns from a round: the sum of the weighted deltas and of the counters."""

    weighted_delta: np.ndarray  # float64: sum_i w_i * delta_i
    weight: int
    unclipped: int
    loss: float  # the weighted mean training loss (each clamped to +-LOSS_BOUND)
    count: int
    clamped: int = 0  # coordinates and counters past the inputs' reach, clamped to it (a client sent words past them)
    projected: bool = False  # the sum's L2 norm was past what the inputs can reach: scaled down to it
