"""Split a dataset's indices across clients: IID and the usual non-IID schemes.

Every partitioner takes the randomness as a `numpy.random.Generator` and returns one int64
index array per client; the arrays are disjoint and together cover the data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..errors import ConfigError

Partition = list[np.ndarray]


def _check_clients(num_examples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > num_examples:
        raise ConfigError(f"num_clients={num_clients} is more than the {num_examples} training examples")


def iid(num_examples: int, num_clients: int, *, rng: np.random.Generator) -> Partition:
    """Shuffle and split into `num_clients` parts of equal size (sizes differ by at most one)."""
    _check_clients(num_examples, num_clients)
    return [part.astype(np.int64) for part in np.array_split(rng.permutation(num_examples), num_clients)]


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    *,
    alpha: float,
    rng: np.random.Generator,
    min_size: int | None = None,
    max_tries: int = 1000,
) -> Partition:
    """Label skew: each class is spread over clients in Dirichlet(alpha) proportions.

    The scheme of Hsu et al. 2019 as implemented by NIID-Bench (Li et al. 2022): a client
    already holding its fair share N / num_clients receives no more, and the draw is repeated
    until every client has at least `min_size` examples (default: min(10, N // (2 * clients)),
    at least 1).
    """
    labels = np.asarray(labels)
    n = len(labels)
    _check_clients(n, num_clients)
    if not alpha > 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}")
    if min_size is None:
        min_size = max(1, min(10, n // (2 * num_clients)))
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == k) for k in classes]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for members in by_class:
            members = rng.permutation(members)
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = p * (sizes < n / num_clients)
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(members)).astype(np.int64)[:-1]
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
                sizes[client] += len(chunk)
        if sizes.min() >= min_size:
            return [np.concatenate(p).astype(np.int64) for p in parts]
    raise ConfigError(
        f"dirichlet partition: no draw in {max_tries} gave every one of {num_clients} clients"
        f" {min_size} examples; use fewer clients or a larger alpha (got {alpha})"
    )


def shards(labels: np.ndarray, num_clients: int, *, rng: np.random.Generator, shards_per_client: int = 2) -> Partition:
    """Pathological non-IID of McMahan et al. 2017: sort by label, cut into equal shards,
    give each client `shards_per_client` shards at random."""
    labels = np.asarray(labels)
    n = len(labels)
    _check_clients(n, num_clients)
    if shards_per_client < 1:
        raise ConfigError(f"shards_per_client must be >= 1, got {shards_per_client}")
    num_shards = num_clients * shards_per_client
    if num_shards > n:
        raise ConfigError(f"{num_shards} shards ({num_clients} clients x {shards_per_client}) exceed {n} examples")
    # Shuffle first so that ties within a label are broken at random, then sort stably.
    order = rng.permutation(n)
    order = order[np.argsort(labels[order], kind="stable")]
    pieces = np.array_split(order, num_shards)
    owner = rng.permutation(num_shards)
    return [
        np.concatenate([pieces[s] for s in owner[c * shards_per_client : (c + 1) * shards_per_client]]).astype(np.int64)
        for c in range(num_clients)
    ]


def quantity(
    num_examples: int, num_clients: int, *, rng: np.random.Generator, sigma: float = 1.0, min_size: int = 1
) -> Partition:
    """Quantity skew: IID labels, client sizes proportional to lognormal(0, sigma) draws.

    Every client gets at least `min_size` examples; sigma = 0 gives equal sizes.
    """
    _check_clients(num_examples, num_clients)
    if sigma < 0:
        raise ConfigError(f"sigma must be >= 0, got {sigma}")
    if min_size * num_clients > num_examples:
        raise ConfigError(f"{num_clients} clients x min_size {min_size} exceed {num_examples} examples")
    weights = rng.lognormal(0.0, sigma, num_clients)
    spare = num_examples - min_size * num_clients
    extra = np.floor(weights / weights.sum() * spare).astype(np.int64)
    # Hand the examples lost to rounding to the clients with the largest remainders.
    remainder = weights / weights.sum() * spare - extra
    extra[np.argsort(-remainder)[: spare - extra.sum()]] += 1
    sizes = extra + min_size
    return [part.astype(np.int64) for part in np.split(rng.permutation(num_examples), np.cumsum(sizes)[:-1])]


def natural(groups: np.ndarray, num_clients: int) -> Partition:
    """One client per group of the data (a speaker, a writer, a patient): client c holds, in
    their order, the examples of the c-th smallest group id. No randomness: the data's own split.

    `num_clients` must equal the number of groups; groups are never merged or split, so that a
    client is one real party of the data.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise ConfigError(f"natural partition: groups must give one id per example, got shape {groups.shape}")
    ids, inverse = np.unique(groups, return_inverse=True)
    if num_clients != len(ids):
        raise ConfigError(
            f"natural partition gives one client per group: num_clients must be {len(ids)}, the "
            f"number of groups in the data, got {num_clients}"
        )
    order = np.argsort(inverse, kind="stable")
    return [part.astype(np.int64) for part in np.split(order, np.cumsum(np.bincount(inverse))[:-1])]


PARTITIONS: dict[str, str] = {
    "iid": "equal random split (the tutorial)",
    "dirichlet": "label skew, Dirichlet(alpha) class proportions per client",
    "shards": "sorted by label, shards_per_client shards each (McMahan et al. 2017)",
    "quantity": "IID labels, lognormal(0, sigma) client sizes",
    "natural": "one client per group of the data (shakespeare: per speaking role); num_clients = the groups",
}


def partition(
    name: str,
    labels: np.ndarray,
    num_clients: int,
    *,
    rng: np.random.Generator,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    sigma: float = 1.0,
    groups: np.ndarray | None = None,
) -> Partition:
    """Dispatch to the partitioner called `name`, passing the options it uses (`groups`: each
    example's group id, for the natural partition)."""
    labels = np.asarray(labels)
    schemes: dict[str, Callable[[], Partition]] = {
        "iid": lambda: iid(len(labels), num_clients, rng=rng),
        "dirichlet": lambda: dirichlet(labels, num_clients, alpha=alpha, rng=rng),
        "shards": lambda: shards(labels, num_clients, rng=rng, shards_per_client=shards_per_client),
        "quantity": lambda: quantity(len(labels), num_clients, rng=rng, sigma=sigma),
        "natural": lambda: natural(_groups(groups, len(labels)), num_clients),
    }
    if name not in schemes:
        raise ConfigError(f"unknown partition {name!r} (choose from: {', '.join(schemes)})")
    return schemes[name]()


def _groups(groups: np.ndarray | None, num_examples: int) -> np.ndarray:
    if groups is None:
        raise ConfigError("the natural partition needs each example's group (a speaker, a writer); this data has none")
    if len(groups) != num_examples:
        raise ConfigError(f"natural partition: {len(groups)} group ids for {num_examples} examples")
    return groups


def split_holdout(
    parts: Sequence[np.ndarray], fraction: float, *, rng: np.random.Generator
) -> tuple[Partition, Partition]:
    """Split each client's indices into (train, test), the test part a `fraction` of it."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"client_test_fraction must be in [0, 1), got {fraction}")
    train, test = [], []
    for part in parts:
        shuffled = rng.permutation(part)
        k = round(len(part) * fraction)
        test.append(shuffled[:k])
        train.append(shuffled[k:])
    return train, test


def label_histogram(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Counts of each label per client, shape (num_clients, num_classes). A sequence target counts
    its last element, one per example (for shakespeare, LEAF's label: the character after the 80)."""
    labels = np.asarray(labels)
    if labels.ndim > 1:
        labels = labels.reshape(len(labels), -1)[:, -1]
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
