import pytest
import torch

from fedforge.errors import ConfigError
from fedforge.models import MODELS, build_model, count_parameters


@pytest.mark.parametrize(
    "name, parameters",
    [
        ("mlp", 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10),
        ("2nn", 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10),  # McMahan et al.: 199,210
        ("cnn", 1_663_370),  # McMahan et al.'s CNN on 28x28: the paper's 1,663,370
        ("simple-cnn", 44_426),  # NIID-Bench's SimpleCNNMNIST
        ("logreg", 7850),
    ],
)
def test_parameter_counts_and_output(name, parameters):
    model = build_model(name, (1, 28, 28), 10)
    assert count_parameters(model) == parameters
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_init_depends_on_seed_only_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("mlp", (1, 28, 28), 10, seed=5)
    assert torch.equal(torch.rand(1), before), "building a model consumed the global RNG"
    b = build_model("mlp", (1, 28, 28), 10, seed=5)
    c = build_model("mlp", (1, 28, 28), 10, seed=6)
    for (_, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb)
        assert not torch.equal(pa, pc)


def test_unknown_model():
    with pytest.raises(ConfigError, match=f"unknown model 'resnet' \\(choose from: {', '.join(MODELS)}\\)"):
        build_model("resnet", (1, 28, 28), 10)


@pytest.mark.parametrize("name, fast", [("mlp", True), ("2nn", True), ("logreg", True), ("cnn", False), ("simple-cnn", False)])
def test_which_built_ins_take_the_fast_mlp_kernel(name, fast):
    from fedforge.fastmlp import mlp_layout

    assert (mlp_layout(build_model(name, (1, 28, 28), 10)) is not None) == fast
