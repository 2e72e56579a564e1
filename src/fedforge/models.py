"""Built-in models by name; any `nn.Module` works wherever a model is taken."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import _seeding
from ._imports import is_reference, load_object
from .errors import ConfigError
from .llm.settings import LlmSettings, is_hf_model

if TYPE_CHECKING:
    from .tasks import Task

ModelFactory = Callable[[tuple[int, ...], int], nn.Module]


def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The tutorial's MLP: 784-128-64-10 with ReLU."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(_numel(input_shape), 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def two_nn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """McMahan et al. 2017's "2NN": two hidden layers of 200 units with ReLU."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(_numel(input_shape), 200),
        nn.ReLU(),
        nn.Linear(200, 200),
        nn.ReLU(),
        nn.Linear(200, num_classes),
    )


def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """McMahan et al. 2017's CNN: conv5x5(32) - pool - conv5x5(64) - pool - fc 512 - softmax."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (height // 4) * (width // 4), 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def simple_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """NIID-Bench's small CNN (Li et al. 2022, "Federated Learning on Non-IID Data Silos"):
    conv5x5(6) - pool - conv5x5(16) - pool - fc 120 - fc 84 - out, ReLU throughout."""
    channels, height, width = input_shape

    def side(n: int) -> int:  # two rounds of (5x5 conv without padding, 2x2 pool)
        return ((n - 4) // 2 - 4) // 2

    return nn.Sequential(
        nn.Conv2d(channels, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * side(height) * side(width), 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


class BasicBlock(nn.Module):
    """He et al. 2016's residual block: conv3x3-BN-ReLU-conv3x3-BN, plus the input (through a 1x1
    convolution and BN where the stride or the width changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet8(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A small ResNet with BatchNorm (He et al. 2016's CIFAR family, one block per stage):
    conv3x3(16)-BN-ReLU, blocks of 16, 32 and 64 channels (strides 1, 2, 2), global average
    pooling, a linear layer; 78k parameters and BatchNorm running statistics (buffers)."""
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        BasicBlock(16, 16),
        BasicBlock(16, 32, stride=2),
        BasicBlock(32, 64, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression."""
    return nn.Sequential(nn.Flatten(), nn.Linear(_numel(input_shape), num_classes))


def tabular_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """For rows of standardized features (csv:, parquet: datasets): two hidden layers of 64 with
    ReLU; `num_classes` outputs (one for regression)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(_numel(input_shape), 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


class CharLSTM(nn.Module):
    """LEAF's Shakespeare model (Caldas et al. 2018, models/shakespeare/stacked_lstm.py): an
    embedding of 8, two LSTM layers of 256 and a linear layer to the vocabulary, applied at every
    position: (batch, time) symbol ids -> (batch, time, vocabulary) next-symbol logits. (LEAF's
    scores the last position only; the language-model task scores all.)"""

    def __init__(self, vocab_size: int, embedding_dim: int = 8, hidden_size: int = 256, num_layers: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embedding(x))[0])


def char_lstm(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """LEAF's Shakespeare char-LSTM (`CharLSTM`) over sequences of `input_shape` = (length,)
    symbol ids (int32 or int64); `num_classes` is the vocabulary size."""
    return CharLSTM(num_classes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


MODELS: dict[str, ModelFactory] = {
    "mlp": mlp,
    "2nn": two_nn,
    "cnn": cnn,
    "simple-cnn": simple_cnn,
    "resnet8": resnet8,
    "logreg": logreg,
    "tabular-mlp": tabular_mlp,
    "char-lstm": char_lstm,
}


def check_model_name(name: str) -> None:
    """A ConfigError unless `name` is a model `build_model` can build: a built-in, a factory of the
    user's that can be imported, or hf:PATH (whose folder is read when the model is built)."""
    if is_hf_model(name):
        from .llm.models import model_path

        model_path(name)
        return
    model_factory(name)


def model_factory(name: str) -> ModelFactory:
    """The factory of model `name`: a built-in's, or the user's `package.module:factory`, a
    callable (input_shape, num_classes) -> nn.Module imported from the current folder or the
    installed packages. (An hf: model has none: `build_model` builds it for its task.)"""
    if is_hf_model(name):
        raise ConfigError(f"model {name} is built for its task by build_model, not by a factory")
    if name in MODELS:
        return MODELS[name]
    if not is_reference(name):
        raise ConfigError(
            f"unknown model {name!r} (choose from: {', '.join(MODELS)}, or package.module:factory, hf:PATH)"
        )
    factory = load_object(name, "model factory")
    if not callable(factory):
        raise ConfigError(f"model factory {name!r} is a {type(factory).__name__}, not a callable")
    return factory


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    seed: int = 0,
    task: Task | None = None,
    llm: LlmSettings | None = None,
) -> nn.Module:
    """Build model `name` (see `model_factory`) with weights initialised from `seed` alone.

    The global torch RNG is left as it was: initialisation draws from a forked stream. An hf:PATH
    model (`fedforge.llm.models.build_hf_model`) is a causal LM or a sequence classifier by the
    targets of `task` (default: classification's), with the LoRA adapters of `llm`.
    """
    if is_hf_model(name):
        from .llm.models import build_hf_model

        targets = task.targets if task is not None else "classes"
        length = input_shape[0] if len(input_shape) == 1 else None  # (length,): token ids
        settings = llm or LlmSettings()
        return build_hf_model(
            name, targets=targets, num_classes=num_classes, seed=seed, settings=settings, length=length
        )
    factory = model_factory(name)
    if name in ("cnn", "simple-cnn", "resnet8") and len(input_shape) != 3:
        raise ConfigError(f"model {name!r} needs image input (channels, height, width), got shape {input_shape}")
    if name == "char-lstm" and len(input_shape) != 1:
        raise ConfigError(f"model {name!r} needs sequences of symbol ids (length,), got shape {input_shape}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seeding.derive_seed(seed, _seeding.MODEL_INIT))
        if name in MODELS:
            return factory(tuple(input_shape), num_classes)
        try:
            model = factory(tuple(input_shape), num_classes)
        except Exception as e:
            raise ConfigError(f"model factory {name!r} failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def check_fits(model: nn.Module, x, name: str) -> None:
    """Feed `model` the first two rows of inputs `x` as training and evaluation do (model(x),
    model(*x), model(**x)); one that cannot take them is a ConfigError naming the model, the
    batch's shape and the error's first line, not a traceback from inside the round loop. Its
    state is left as it was (eval mode, no gradient). Errors that are not about the data
    (a NameError in the model's code) are raised as they are."""
    from .data.datasets import call_model, tree_map

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch = tree_map(lambda t: t[:2].to(device), x)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            call_model(model, batch)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        raise ConfigError(
            f"model {name} does not fit the data: on a batch of inputs of shape {_shapes(batch)} "
            f"it fails with {type(e).__name__}: {first}"
        ) from None
    finally:
        model.train(training)


def _shapes(batch) -> str:
    if isinstance(batch, torch.Tensor):
        return str(tuple(batch.shape))
    if isinstance(batch, tuple):
        return "(" + ", ".join(str(tuple(t.shape)) for t in batch) + ")"
    return "{" + ", ".join(f"{k}: {tuple(t.shape)}" for k, t in batch.items()) + "}"


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
