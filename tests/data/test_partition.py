import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedforge.data import dirichlet, iid, label_histogram, natural, partition, quantity, shards, split_holdout
from fedforge.errors import ConfigError


def assert_disjoint_cover(parts, n):
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert len(joined) == n, "some example is missing or repeated"
    assert np.array_equal(np.sort(joined), np.arange(n))


def labels_strategy():
    return (
        st.integers(20, 400)
        .flatmap(lambda n: st.tuples(st.just(n), st.integers(2, 10), st.integers(0, 2**32 - 1)))
        .map(lambda t: (np.random.default_rng(t[2]).integers(0, t[1], t[0]), t[1], t[2]))
    )


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 500), clients=st.integers(1, 50), seed=st.integers(0, 2**32 - 1))
def test_iid_equal_sizes(n, clients, seed):
    if clients > n:
        with pytest.raises(ConfigError, match="more than"):
            iid(n, clients, rng=np.random.default_rng(seed))
        return
    parts = iid(n, clients, rng=np.random.default_rng(seed))
    assert_disjoint_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=40, deadline=None)
@given(data=labels_strategy(), clients=st.integers(1, 8), alpha=st.floats(0.05, 100))
def test_dirichlet_disjoint_cover_and_min_size(data, clients, alpha):
    labels, _, seed = data
    try:
        parts = dirichlet(labels, clients, alpha=alpha, rng=np.random.default_rng(seed), min_size=1)
    except ConfigError as e:
        # NIID-Bench's cuts round down, so tiny classes can starve clients; that must be a clear
        # error, and only where data per client is scarce.
        assert "use fewer clients" in str(e)
        assert len(labels) < 20 * clients
        return
    assert_disjoint_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 1


def skew(labels, parts, num_classes):
    """Mean over clients of the largest label's share: 1/num_classes is balanced, 1 is one label."""
    h = label_histogram(labels, parts, num_classes)
    return float(np.mean(h.max(1) / h.sum(1)))


def test_dirichlet_small_alpha_skews_labels():
    labels = np.repeat(np.arange(10), 1000)
    low = dirichlet(labels, 20, alpha=0.1, rng=np.random.default_rng(0))
    high = dirichlet(labels, 20, alpha=100.0, rng=np.random.default_rng(0))
    assert skew(labels, low, 10) > 0.5
    assert skew(labels, high, 10) < 0.2
    assert min(map(len, low)) >= 10  # the default min_size


def test_dirichlet_impossible_min_size_is_a_clear_error():
    with pytest.raises(ConfigError, match="use fewer clients"):
        dirichlet(np.zeros(100, dtype=int), 10, alpha=0.5, rng=np.random.default_rng(0), min_size=11, max_tries=5)


@settings(max_examples=30, deadline=None)
@given(data=labels_strategy(), clients=st.integers(1, 8), per=st.integers(1, 3))
def test_shards_cover_and_sizes(data, clients, per):
    labels, _, seed = data
    if clients * per > len(labels):
        with pytest.raises(ConfigError, match="shards"):
            shards(labels, clients, rng=np.random.default_rng(seed), shards_per_client=per)
        return
    parts = shards(labels, clients, rng=np.random.default_rng(seed), shards_per_client=per)
    assert_disjoint_cover(parts, len(labels))
    shard = len(labels) / (clients * per)
    for p in parts:
        assert abs(len(p) - per * shard) <= per


def test_shards_give_two_labels_per_client_on_balanced_data():
    labels = np.repeat(np.arange(10), 600)
    parts = shards(labels, 10, rng=np.random.default_rng(3))
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    assert_disjoint_cover(parts, len(labels))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(10, 2000), clients=st.integers(1, 10), sigma=st.floats(0, 3), seed=st.integers(0, 2**32 - 1))
def test_quantity_cover_and_min_size(n, clients, sigma, seed):
    parts = quantity(n, clients, rng=np.random.default_rng(seed), sigma=sigma)
    assert_disjoint_cover(parts, n)
    assert min(len(p) for p in parts) >= 1


def test_quantity_sigma_controls_spread():
    equal = quantity(1000, 10, rng=np.random.default_rng(0), sigma=0.0)
    spread = quantity(10_000, 50, rng=np.random.default_rng(0), sigma=2.0)
    assert [len(p) for p in equal] == [100] * 10
    sizes = np.array([len(p) for p in spread])
    assert sizes.max() > 10 * np.median(sizes)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards", "quantity"])
def test_same_seed_same_partition(name):
    labels = np.repeat(np.arange(5), 200)
    a = partition(name, labels, 7, rng=np.random.default_rng(42))
    b = partition(name, labels, 7, rng=np.random.default_rng(42))
    c = partition(name, labels, 7, rng=np.random.default_rng(43))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_natural_one_client_per_group_in_order():
    groups = np.array([2, 0, 2, 7, 0, 2])
    parts = natural(groups, 3)
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2, 5], [3]]
    assert all(p.dtype == np.int64 for p in parts)
    assert [p.tolist() for p in partition("natural", np.zeros(6), 3, rng=np.random.default_rng(0), groups=groups)] == [
        p.tolist() for p in parts
    ]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), num_groups=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_natural_disjoint_cover_of_whole_groups(n, num_groups, seed):
    groups = np.random.default_rng(seed).integers(0, num_groups, n) * 3 - 5  # any ids, not only 0..k-1
    parts = natural(groups, len(np.unique(groups)))
    assert_disjoint_cover(parts, n)
    assert all(len(np.unique(groups[p])) == 1 for p in parts)
    assert [groups[p][0] for p in parts] == sorted(np.unique(groups).tolist())


@pytest.mark.parametrize(
    "clients, groups, message",
    [
        (2, np.array([0, 1, 2]), "num_clients must be 3, the number of groups in the data, got 2"),
        (4, np.array([0, 1, 2]), "num_clients must be 3"),
        (1, np.zeros((2, 2)), r"groups must give one id per example, got shape \(2, 2\)"),
    ],
)
def test_natural_refuses_another_number_of_clients(clients, groups, message):
    with pytest.raises(ConfigError, match=message):
        natural(groups, clients)


def test_label_histogram_of_sequences_counts_each_last_label():
    targets = np.array([[5, 1], [5, 0], [2, 1]])  # next-symbol targets: one example's last is its label
    assert label_histogram(targets, [np.array([0, 1]), np.array([2])], 3).tolist() == [[1, 1, 0], [0, 1, 0]]


def test_natural_needs_groups():
    with pytest.raises(ConfigError, match="the natural partition needs each example's group"):
        partition("natural", np.zeros(4), 2, rng=np.random.default_rng(0))
    with pytest.raises(ConfigError, match="3 group ids for 4 examples"):
        partition("natural", np.zeros(4), 2, rng=np.random.default_rng(0), groups=np.array([0, 1, 1]))


def test_unknown_partition():
    with pytest.raises(ConfigError, match="unknown partition 'pathological'"):
        partition("pathological", np.zeros(10), 2, rng=np.random.default_rng(0))


def test_split_holdout():
    parts = iid(1000, 4, rng=np.random.default_rng(0))
    train, test = split_holdout(parts, 0.2, rng=np.random.default_rng(1))
    for p, tr, te in zip(parts, train, test, strict=True):
        assert len(te) == 50 and len(tr) == 200
        assert np.array_equal(np.sort(np.concatenate([tr, te])), np.sort(p))
