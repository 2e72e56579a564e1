"""The server's test inputs in three numbers, so that a client can tell that its data are not
prepared as the data the server evaluates on.

Where the server has test data whose inputs are one tensor of floats, its welcome carries
`test_inputs`: {"shape": one example's shape, "mean": m, "std": s} over the whole test split.
A client checks the values (a hostile server may send anything: at most MAX_DIMS dimensions of at
most MAX_SIZE each, finite numbers within +-MAX_VALUE), compares them with its own training inputs
and, when they differ markedly, warns on its console and sets `inputs_differ` in its updates: one
flag, never its own statistics. Markedly (`InputSummary.differs`): another shape per example, a
mean more than half the server's standard deviation away from the server's, or a standard
deviation more than 1.5 times (or less than 1/1.5 of) the server's. Measured on the built-in
datasets: a client holding a single class is at most 0.43 standard deviations away with 0.75 times
the spread (Fashion-MNIST's sandals; digits' classes within 0.04 and 0.95-1.06), inside the bounds;
inputs in [0, 1] where the server's are in [-1, 1] are 0.93 (digits) to 1.01 (Fashion-MNIST) away
with half the spread, and inputs standardized by their own mean and spread 0.52 to 0.60 away,
outside them. The synthetic dataset's clients differ in their inputs by design, and there the
server sends no summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_DIMS = 8
MAX_SIZE = 1 << 31
MAX_VALUE = 1e12
MEAN_TOLERANCE = 0.5  # in the server's standard deviations
STD_RATIO = 1.5
_CHUNK = 4096  # rows summed at a time, in float64


@dataclass(frozen=True)
class InputSummary:
    """One example's shape, and the mean and standard deviation of every input value."""

    shape: tuple[int, ...]
    mean: float
    std: float

    @classmethod
    def of(cls, x) -> InputSummary | None:
        """The summary of inputs `x`; None unless they are one tensor of floats with rows."""
        if (
            not isinstance(x, torch.Tensor)
            or not x.is_floating_point()
            or x.dim() == 0
            or x.numel() == 0
            or x.dim() - 1 > MAX_DIMS
        ):
            return None
        rows = x.detach().reshape(len(x), -1)
        total = squares = 0.0
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start : start + _CHUNK].double()
            total += float(chunk.sum())
            squares += float(chunk.square().sum())
        mean = total / rows.numel()
        std = math.sqrt(max(squares / rows.numel() - mean * mean, 0.0))
        if not (math.isfinite(mean) and math.isfinite(std) and abs(mean) <= MAX_VALUE and std <= MAX_VALUE):
            return None
        return cls(tuple(x.shape[1:]), mean, std)

    def to_header(self) -> dict:
        return {"shape": list(self.shape), "mean": self.mean, "std": self.std}

    @classmethod
    def from_header(cls, value) -> InputSummary:
        """The summary a server sent, or ValueError saying why it is refused."""
        if not isinstance(value, dict) or set(value) != {"shape", "mean", "std"}:
            raise ValueError("not a dict of shape, mean and std")
        shape, mean, std = value["shape"], value["mean"], value["std"]
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(type(n) is int and 1 <= n <= MAX_SIZE for n in shape)
        ):
            raise ValueError(f"its shape is not a list of at most {MAX_DIMS} sizes between 1 and {MAX_SIZE}")
        for name, number, low in (("mean", mean, -MAX_VALUE), ("std", std, 0.0)):
            if type(number) not in (int, float) or not low <= number <= MAX_VALUE:
                raise ValueError(f"its {name} is not a number in [{low:g}, {MAX_VALUE:g}]")
        return cls(tuple(shape), float(mean), float(std))

    def differs(self, mine: InputSummary) -> str | None:
        """How `mine` (a client's inputs) differ markedly from these (the server's), or None."""
        if mine.shape != self.shape:
            return f"one example's shape is {mine.shape}, the server's {self.shape}"
        if abs(mine.mean - self.mean) > MEAN_TOLERANCE * self.std:
            return (
                f"their mean is {mine.mean:.3g}, the server's {self.mean:.3g} (more than {MEAN_TOLERANCE:g} of "
                f"the server's standard deviation {self.std:.3g} apart)"
            )
        if not self.std / STD_RATIO <= mine.std <= self.std * STD_RATIO:
            return (
                f"their standard deviation is {mine.std:.3g}, the server's {self.std:.3g} (more than "
                f"{STD_RATIO:g} times apart)"
            )
        return None


__all__ = ["InputSummary"]
