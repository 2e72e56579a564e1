"""Where a run's clients train, as settings."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .._options import check_choices, option
from ..errors import ConfigError
from . import ENGINES, IN_PROCESS_ENGINES
from .ray_options import check_options as check_ray_options


@dataclass(frozen=True)
class EngineSettings:
    """The engine, its device and its resources (TOML: flat keys or the table [engine])."""

    engine: str = option(
        "auto",
        "where clients run (auto: vectorized for dense models, e.g. Linear/ReLU, and "
        "on CUDA; sequential for convolutions on the CPU, recurrent layers and what vectorized "
        "cannot batch)",
        ENGINES,
    )
    max_memory: str = option(
        "auto", "working memory for clients trained together (vectorized engine; auto: 64MiB on the CPU, 1GiB on CUDA)"
    )
    ray_address: str | None = option(
        None,
        "engine ray: the cluster to join, host:port of its head (`ray start "
        "--head`) or ray://host:port (default: a new local Ray)",
    )
    ray_workers: int = option(2, "engine ray: long-lived workers (Ray actors), each loading the data once")
    ray_cpus_per_worker: float = option(1.0, "engine ray: CPUs Ray reserves for each worker (fractions allowed)")
    ray_gpus_per_worker: float = option(
        0.0, "engine ray: GPUs reserved for each worker (fractions allowed; above 0 it trains on CUDA)"
    )
    ray_engine: str = option(
        "auto", "engine ray: the in-process engine each worker trains its clients with", IN_PROCESS_ENGINES
    )
    device: str = option("auto", "auto, cpu, cuda or cuda:N (auto: cuda when available)")

    def __post_init__(self):
        check_choices(self, EngineSettings)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        self.max_memory_bytes()
        check_ray_options(self.ray_workers, self.ray_cpus_per_worker, self.ray_gpus_per_worker, self.ray_engine)

    def max_memory_bytes(self) -> int | None:
        """The vectorized engine's budget; None for auto (its default for the device)."""
        return None if self.max_memory == "auto" else parse_bytes(self.max_memory, "max_memory")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str, name: str) -> int:
    """Bytes from a size like "512MiB", "2GB" or "1000000"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"{name} must be auto or a size like 512MiB or 2GB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
