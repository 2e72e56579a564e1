"""Built-in models by name; any `nn.Module` works wherever a model is taken."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

import torch
from torch import nn

from . import _seeding
from .errors import ConfigError

ModelFactory = Callable[[tuple[int, ...], int], nn.Module]


def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The tutorial's MLP: 784-128-64-10 with ReLU."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(_numel(input_shape), 128), nn.ReLU(),
        nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, num_classes),
    )


def two_nn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """McMahan et al. 2017's "2NN": two hidden layers of 200 units with ReLU."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(_numel(input_shape), 200), nn.ReLU(),
        nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, num_classes),
    )


def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """McMahan et al. 2017's CNN: conv5x5(32) - pool - conv5x5(64) - pool - fc 512 - softmax."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * (height // 4) * (width // 4), 512), nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def simple_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """NIID-Bench's small CNN (Li et al. 2022, "Federated Learning on Non-IID Data Silos"):
    conv5x5(6) - pool - conv5x5(16) - pool - fc 120 - fc 84 - out, ReLU throughout."""
    channels, height, width = input_shape

    def side(n: int) -> int:  # two rounds of (5x5 conv without padding, 2x2 pool)
        return ((n - 4) // 2 - 4) // 2

    return nn.Sequential(
        nn.Conv2d(channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * side(height) * side(width), 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes),
    )


def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression."""
    return nn.Sequential(nn.Flatten(), nn.Linear(_numel(input_shape), num_classes))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


MODELS: dict[str, ModelFactory] = {"mlp": mlp, "2nn": two_nn, "cnn": cnn, "simple-cnn": simple_cnn, "logreg": logreg}


def model_factory(name: str) -> ModelFactory:
    """The factory of model `name`: a built-in's, or the user's `package.module:factory`, a
    callable (input_shape, num_classes) -> nn.Module imported from the current folder or the
    installed packages."""
    if name in MODELS:
        return MODELS[name]
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"unknown model {name!r} (choose from: {', '.join(MODELS)}, or package.module:factory)")
    if os.getcwd() not in sys.path:  # as `python -m` would: the user's own modules are in the current folder
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - the user's module: any error means it cannot be used
        raise ConfigError(f"cannot import model factory {name!r}: {type(e).__name__}: {e}") from None
    factory = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise ConfigError(f"model factory {name!r}: {module_name} has no callable {attribute!r}")
    return factory


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, *, seed: int = 0) -> nn.Module:
    """Build model `name` (see `model_factory`) with weights initialised from `seed` alone.

    The global torch RNG is left as it was: initialisation draws from a forked stream.
    """
    factory = model_factory(name)
    if name in ("cnn", "simple-cnn") and len(input_shape) != 3:
        raise ConfigError(f"model {name!r} needs image input (channels, height, width), got shape {input_shape}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seeding.derive_seed(seed, _seeding.MODEL_INIT))
        if name in MODELS:
            return factory(tuple(input_shape), num_classes)
        try:
            model = factory(tuple(input_shape), num_classes)
        except Exception as e:  # noqa: BLE001 - the user's factory: say which and why, in one line
            raise ConfigError(f"model factory {name!r} failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
