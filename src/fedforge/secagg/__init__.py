"""Secure aggregation for deployments: the server learns only the sum of the round's updates.

`SecureAggregation` holds what a user asks for (`fedforge server --secure-aggregation`); the
protocol is `protocol.py` (pure state machines), carried over gRPC by the network engine
(`engines/network.py`) and the client (`network/client.py`). See docs/secure-aggregation.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..strategies import check_linear
from .protocol import ProtocolError, SecAggFailed, degree_for, threshold_for
from .quantize import QuantizationError, Quantizer


@dataclass(frozen=True)
class SecureAggregation:
    """Secure aggregation as a user asks for it.

    Attributes:
        threshold: t, the shares that give back a client's secrets: a fraction f of its holders
            (its neighbours and itself; t = floor(f * holders) + 1) or a count; more than half the
            holders. A round completes while t holders of every secret survive.
        neighbours: each client's neighbours (None: every other client up to 64 participants, a
            random Harary graph of degree 2 * ceil(2 * log2 n) above: SecAgg+).
        clip: the bound on each client's update norm (L2; the DP clip replaces it under --dp);
            it sets the fixed point's range, so an update past it is clipped.
        max_examples: the largest example count a client's weight may have (larger ones are
            capped); with clip and the clients per round it sets the fixed point's precision.
    """

    threshold: float | int = 0.5
    neighbours: int | None = None
    clip: float = 10.0
    max_examples: int = 1 << 16

    def __post_init__(self):
        t = self.threshold
        if type(t) is int:
            if t < 2:
                raise ConfigError(f"secagg threshold must be a count >= 2 or a fraction in [0.5, 1), got {t}")
        elif not (isinstance(t, float) and 0.5 <= t < 1):
            raise ConfigError(f"secagg threshold must be a count >= 2 or a fraction in [0.5, 1), got {t!r}")
        if self.neighbours is not None and not (type(self.neighbours) is int and self.neighbours >= 2):
            raise ConfigError(f"secagg neighbours must be a count >= 2, got {self.neighbours!r}")
        if not (isinstance(self.clip, (int, float)) and 0 < self.clip < 1e30):
            raise ConfigError(f"secagg clip must be a number > 0, got {self.clip!r}")
        if not (type(self.max_examples) is int and self.max_examples >= 1):
            raise ConfigError(f"secagg max_examples must be an integer >= 1, got {self.max_examples!r}")

    def check(self, config, clients_per_round: int) -> None:
        """Refuse, in one line, what secure aggregation cannot serve: a strategy that needs each
        update, differential privacy the server would apply to raw updates, a ring the round's sum
        could wrap, a threshold the round's neighbourhoods cannot meet."""
        check_linear(config.strategy_object(), "secure aggregation")
        if config.dp == "central":
            raise ConfigError(
                "secure aggregation with dp central: the server would have to clip updates it cannot "
                "see; use --dp client (the clients clip, the server noises the sum)"
            )
        if config.dp == "local":
            raise ConfigError(
                "secure aggregation with dp local: use --dp client (the clients clip, the server noises "
                "the sum: the same guarantee for far less noise)"
            )
        if clients_per_round < 2:
            raise ConfigError("secure aggregation needs at least 2 clients per round")
        try:
            self.quantizer(clients_per_round, config.clip if config.dp else None)
            threshold_for(self.threshold, degree_for(clients_per_round, self.neighbours) + 1)
        except (QuantizationError, ProtocolError) as e:
            raise ConfigError(f"secure aggregation: {e}") from None

    def quantizer(self, clients: int, dp_clip: float | None) -> Quantizer:
        """The fixed point for a round of `clients`: under DP every update weighs 1 and the DP clip
        bounds it; otherwise weights are example counts up to max_examples."""
        if dp_clip is not None:
            return Quantizer(clients, float(dp_clip), 1)
        return Quantizer(clients, float(self.clip), self.max_examples)


__all__ = ["ProtocolError", "QuantizationError", "SecAggFailed", "SecureAggregation"]
