"""Independent random streams derived from one experiment seed.

Every random choice (partition, model init, client selection, each client's batch order)
draws from its own stream keyed by *what* it is for and *when*, so a choice never depends on
how many random numbers an earlier step consumed. That makes engines interchangeable and a
resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence

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
DEVICES = 14  # the clients' device profiles (devices.py: a sub-stream per quantity)
ASYNC_DISPATCH = 15  # asynchronous: a version's second and later dispatches (selection, batch seeds)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends only on `seed` and `keys`."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) & (2**63 - 1)


def derive_seeds(seed: int, *keys: int, each: Sequence[int]) -> list[int]:
    """`[derive_seed(seed, *keys, x) for x in each]`, for many x at once (a round's clients).

    NumPy's SeedSequence hash (its pool of 4 words, `mix_entropy` and `generate_state`), run
    on a column of x in uint32 arithmetic: one SeedSequence takes ~16 us, a round of 1,000
    clients 16 ms of the round loop's own time before it hands the round to the engine.
    """
    column = np.asarray(each, dtype=np.int64).reshape(-1)
    if column.size == 0:
        return []
    if column.min() < 0 or column.max() >= 2**32:  # words per x would differ between rows
        return [derive_seed(seed, *keys, int(x)) for x in column]
    head = np.concatenate([_words(v) for v in (seed, *keys)])
    entropy = np.empty((column.size, head.size + 1), dtype=np.uint32)
    entropy[:, :-1], entropy[:, -1] = head, column
    with np.errstate(over="ignore"):
        pool = _mixed(entropy)
        state = _generated(pool, 2)
    return ((state[:, 0].astype(np.int64) << 31 ^ state[:, 1].astype(np.int64)) & (2**63 - 1)).tolist()


# numpy/random/bit_generator.pyx's constants.
_POOL_SIZE, _XSHIFT = 4, 16
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715


def _words(value: int) -> np.ndarray:
    """An int as SeedSequence reads it: its 32-bit words, least significant first ([0] for 0)."""
    if value < 0:
        raise ValueError(f"seeds and keys must be >= 0, got {value}")
    words = [0] if value == 0 else []
    while value:
        words.append(value & 0xFFFFFFFF)
        value >>= 32
    return np.array(words, dtype=np.uint32)


class _Hash:
    """SeedSequence's `hashmix`, with its running constant (one per row: all rows take the same steps)."""

    def __init__(self) -> None:
        self.const = np.uint32(_INIT_A)

    def __call__(self, value: np.ndarray) -> np.ndarray:
        value = value ^ self.const
        self.const = self.const * np.uint32(_MULT_A)
        value = value * self.const
        return value ^ (value >> np.uint32(_XSHIFT))


def _mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    result: np.ndarray = np.uint32(_MIX_MULT_L) * x - np.uint32(_MIX_MULT_R) * y
    return result ^ (result >> np.uint32(_XSHIFT))


def _mixed(entropy: np.ndarray) -> list[np.ndarray]:
    """SeedSequence's `mix_entropy`: the pool of each row of `entropy` (rows, words) uint32."""
    hashmix = _Hash()
    zeros = np.zeros(len(entropy), dtype=np.uint32)
    pool = [hashmix(entropy[:, i] if i < entropy.shape[1] else zeros) for i in range(_POOL_SIZE)]
    for i_src in range(_POOL_SIZE):
        for i_dst in range(_POOL_SIZE):
            if i_src != i_dst:
                pool[i_dst] = _mix(pool[i_dst], hashmix(pool[i_src]))
    for i_src in range(_POOL_SIZE, entropy.shape[1]):
        for i_dst in range(_POOL_SIZE):
            pool[i_dst] = _mix(pool[i_dst], hashmix(entropy[:, i_src]))
    return pool


def _generated(pool: list[np.ndarray], words: int) -> np.ndarray:
    """SeedSequence's `generate_state(words, np.uint32)` of each row's pool: (rows, words)."""
    const = np.uint32(_INIT_B)
    out = np.empty((len(pool[0]), words), dtype=np.uint32)
    for i in range(words):
        value = pool[i % _POOL_SIZE] ^ const
        const = const * np.uint32(_MULT_B)
        value = value * const
        out[:, i] = value ^ (value >> np.uint32(_XSHIFT))
    return out


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU `torch.Generator` for the stream `(seed, *keys)`."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    """A numpy `Generator` for the stream `(seed, *keys)`."""
    return np.random.default_rng(derive_seed(seed, *keys))
