import sys

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
        ("resnet8", 77_754),  # stem 176, blocks 4,672, 14,528, 57,728 (shortcuts included), fc 650
        ("logreg", 7850),
    ],
)
def test_parameter_counts_and_output(name, parameters):
    model = build_model(name, (1, 28, 28), 10)
    assert count_parameters(model) == parameters
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_char_lstm_is_leafs_shakespeare_model():
    model = build_model("char-lstm", (80,), 80)
    # Embedding 80x8, LSTM 8->256 and 256->256, linear 256->80. LEAF's TensorFlow BasicLSTMCell has
    # one bias per layer where PyTorch's LSTM has two: 817,872 parameters there.
    assert (
        count_parameters(model)
        == 80 * 8 + (4 * 256 * (8 + 256) + 2 * 4 * 256) + (4 * 256 * (256 + 256) + 2 * 4 * 256) + 256 * 80 + 80
        == 819_920
    )
    for dtype in (torch.int32, torch.int64):
        assert model(torch.zeros(3, 80, dtype=dtype)).shape == (3, 80, 80)
    with pytest.raises(ConfigError, match=r"model 'char-lstm' needs sequences of symbol ids \(length,\), got shape"):
        build_model("char-lstm", (1, 28, 28), 10)


def test_init_depends_on_seed_only_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("mlp", (1, 28, 28), 10, seed=5)
    assert torch.equal(torch.rand(1), before), "building a model consumed the global RNG"
    b = build_model("mlp", (1, 28, 28), 10, seed=5)
    c = build_model("mlp", (1, 28, 28), 10, seed=6)
    for (_, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters(), strict=True):
        assert torch.equal(pa, pb)
        assert not torch.equal(pa, pc)


def test_unknown_model():
    with pytest.raises(ConfigError, match=f"unknown model 'resnet' \\(choose from: {', '.join(MODELS)}, or package"):
        build_model("resnet", (1, 28, 28), 10)


@pytest.mark.parametrize(
    "name, fast",
    [("mlp", True), ("2nn", True), ("logreg", True), ("cnn", False), ("simple-cnn", False), ("resnet8", False)],
)
def test_which_built_ins_take_the_fast_mlp_kernel(name, fast):
    from fedforge.fastmlp import mlp_layout

    assert (mlp_layout(build_model(name, (1, 28, 28), 10)) is not None) == fast


USER_MODELS = """
import torch
from torch import nn

def wide(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), 32), nn.Tanh(),
                         nn.Linear(32, num_classes))

def not_a_module(input_shape, num_classes):
    return "a string"

def broken(input_shape, num_classes):
    raise RuntimeError("no GPU here")

def narrow(input_shape, num_classes):  # for inputs of 100 features, not the data's 60
    return nn.Sequential(nn.Flatten(), nn.Linear(100, num_classes))

class Buggy(nn.Linear):
    def forward(self, x):
        return undefined_name(x)  # noqa: F821 - a bug in the model's code, not a mismatch with the data

def buggy(input_shape, num_classes):
    return Buggy(60, num_classes)
"""


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(USER_MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    sys.modules.pop("my_models", None)


def test_a_user_model_factory_runs_from_the_command_line(user_models, capsys):
    from fedforge.cli import main

    assert (
        main(
            [
                "run",
                "-q",
                "--dataset",
                "synthetic",
                "--num-clients",
                "3",
                "--clients-per-round",
                "3",
                "--rounds",
                "2",
                "--model",
                "my_models:wide",
                "--out-dir",
                "runs",
                "--name",
                "mine",
            ]
        )
        == 0
    )
    state = torch.load(user_models / "runs" / "mine" / "model.pt")
    assert [tuple(v.shape) for v in state.values()] == [(32, 60), (32,), (10, 32), (10,)]
    again = build_model("my_models:wide", (60,), 10, seed=0)  # seeded like a built-in
    assert torch.equal(again[1].weight, build_model("my_models:wide", (60,), 10, seed=0)[1].weight)


@pytest.mark.parametrize(
    "model, message",
    [
        ("no_such_module:make", "cannot import model factory 'no_such_module:make': ModuleNotFoundError"),
        ("my_models:missing", "model factory 'my_models:missing': my_models has no 'missing'"),
        ("my_models:not_a_module", "model factory 'my_models:not_a_module' returned str, not a torch.nn.Module"),
        ("my_models:broken", "model factory 'my_models:broken' failed: RuntimeError: no GPU here"),
        (
            "my_models:narrow",
            "model my_models:narrow does not fit the data: on a batch of inputs of shape (2, 60) it "
            "fails with RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x60 and 100x10)",
        ),
    ],
)
def test_a_bad_model_factory_is_one_line(user_models, capsys, model, message):
    from fedforge.cli import main

    code = main(
        [
            "run",
            "-q",
            "--dataset",
            "synthetic",
            "--num-clients",
            "3",
            "--clients-per-round",
            "3",
            "--model",
            model,
            "--out-dir",
            "runs",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err


def test_a_bug_in_the_models_own_code_keeps_its_traceback(user_models):
    from fedforge.cli import main

    with pytest.raises(NameError, match="undefined_name"):
        main(
            [
                "run",
                "-q",
                "--dataset",
                "synthetic",
                "--num-clients",
                "3",
                "--clients-per-round",
                "3",
                "--model",
                "my_models:buggy",
                "--out-dir",
                "runs",
            ]
        )
