"""Independent random streams derived from one experiment seed.

Every random choice (partition, model init, client selection, each client's batch order)
draws from its own stream keyed by *what* it is for and *when*, so a choice never depends on
how many random numbers an earlier step consumed. That makes engines interchangeable and a
resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch

# Stream purposes: never renumber, seeds of past runs depend on them.
PARTITION = 1
MODEL_INIT = 2
SELECTION = 3
CLIENT_BATCHES = 4
CLIENT_TEST_SPLIT = 5
LOCAL_EPOCHS = 6
STRAGGLERS = 7
DROPOUT = 8
MALICIOUS = 9
ATTACK_NOISE = 10
DATASET = 11
DP_NOISE = 12  # the privacy stage's noise on a round's sum (and on its unclipped count)
DP_LOCAL_NOISE = 13  # a client's own noise under local DP


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends only on `seed` and `keys`."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) & (2**63 - 1)


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU `torch.Generator` for the stream `(seed, *keys)`."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    """A numpy `Generator` for the stream `(seed, *keys)`."""
    return np.random.default_rng(derive_seed(seed, *keys))
