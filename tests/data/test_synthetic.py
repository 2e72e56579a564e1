import numpy as np

from fedforge.data.synthetic import synthetic


def test_shape_sizes_and_split():
    data, train, test = synthetic(1.0, 1.0, rng=np.random.default_rng(0))
    assert len(train) == len(test) == 30
    assert data.train.x.shape[1] == 60 and data.num_classes == 10
    for tr, te in zip(train, test, strict=True):
        n = len(tr) + len(te)
        assert n >= 50  # lognormal(4, 2) + 50
        assert len(tr) == int(0.9 * n)
    assert np.array_equal(np.concatenate(train), np.arange(len(data.train)))
    assert data.train.y.min() >= 0 and data.train.y.max() < 10


def test_seeded_and_heterogeneity_grows_with_alpha_beta():
    a, _, _ = synthetic(1.0, 1.0, rng=np.random.default_rng(5))
    b, _, _ = synthetic(1.0, 1.0, rng=np.random.default_rng(5))
    assert (a.train.x == b.train.x).all()
    iid_like, parts, _ = synthetic(0.0, 0.0, rng=np.random.default_rng(1))
    skewed, parts_s, _ = synthetic(2.0, 2.0, rng=np.random.default_rng(1))

    def spread_of_means(d, p):  # how far apart the devices' feature means are
        return float(np.std([d.train.x[idx].mean(0).numpy() for idx in p], axis=0).mean())

    assert spread_of_means(skewed, parts_s) > 1.5 * spread_of_means(iid_like, parts)
