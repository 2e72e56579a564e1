"""The vectorized engine's convolution kernel (`fastconv`) against the sequential engine.

In float64 the two agree to 1e-10, so a mistake (a client's channels mixed with another's, a
running statistic updated twice, a pooling gradient sent to another element) cannot hide in
float32 round-off; float32 runs agree up to round-off.
"""

import dataclasses

import numpy as np
import pytest
import torch
from helpers import assert_same_run
from torch import nn

from fedforge import ClientConfig, FederatedData, fastconv, simulate
from fedforge.data import TensorData
from fedforge.engines import AutoEngine, ClientTask, EngineChoice, SequentialEngine, VectorizedEngine
from fedforge.evaluation import evaluate
from fedforge.models import build_model
from fedforge.strategies import FedProx, Scaffold
from fedforge.tasks import make_task

EQUAL = [np.arange(i * 24, (i + 1) * 24) for i in range(5)]
UNEQUAL = [np.arange(0, 5), np.arange(5, 30), np.arange(30, 70), np.arange(70, 71), np.arange(71, 120)]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n, seed=0, dtype=torch.float64, size=28):
    """Images whose class is visible, with a band of zeros: windows of equal values, where max
    pooling must pick the same element as nn.MaxPool2d (the first)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 1, size, size, generator=g) * 0.5
    x[torch.arange(n), 0, y, y] += 3.0
    x[:, :, :6] = 0.0
    return TensorData(x.to(dtype), y)


def run(engine, model, data, partition, *, rounds=2, per_round=3, strategy=None, **client):
    config = ClientConfig(**{"batch_size": 8, "lr": 0.02, **client})
    return simulate(
        model,
        FederatedData(data, partition, None),
        rounds=rounds,
        clients_per_round=per_round,
        client=config,
        engine=engine,
        seed=1,
        strategy=strategy,
    )


def built(name, dtype=torch.float64, channels=1, size=28):
    model = build_model(name, (channels, size, size), 10, seed=0).to(dtype)
    with torch.no_grad():  # positive biases: the zero band makes ties among positive values
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and module.bias is not None:
                module.bias.abs_()
    return model


def assert_agree(a, b, rtol=1e-10, atol=1e-10):
    assert a.history.column("clients") == b.history.column("clients")
    assert a.state.params.keys() == b.state.params.keys()
    for name, value in a.state.params.items():
        torch.testing.assert_close(b.state.params[name], value, rtol=rtol, atol=atol, msg=name)
    for x, y in zip(a.history.records[1:], b.history.records[1:], strict=True):
        assert x.train_accuracy == y.train_accuracy
        assert x.train_loss == pytest.approx(y.train_loss, rel=1e-9)


@pytest.mark.parametrize("name", ["cnn", "simple-cnn", "resnet8"])
@pytest.mark.parametrize("partition", [EQUAL, UNEQUAL], ids=["equal", "unequal"])
@pytest.mark.parametrize(
    "optimizer", [{"momentum": 0.9}, {"optimizer": "adam"}, {"optimizer": "adamw"}], ids=["momentum", "adam", "adamw"]
)
def test_built_in_cnns_equal_the_sequential_engine(name, partition, optimizer):
    data = images(120)
    options = dict(optimizer)
    task = make_task("classification", optimizer=options.pop("optimizer", "sgd"))
    if task.optimizer is not None:
        options["lr"] = 0.001
    engine = VectorizedEngine()
    results = [
        run(e, built(name), data, partition, task=task, local_epochs=2, **options) for e in (SequentialEngine(), engine)
    ]
    assert engine.choice is not None and engine.choice.reason == "fastconv kernel"
    assert_agree(*results)


def test_float32_agrees_up_to_round_off():
    data = images(120, dtype=torch.float32)
    results = [
        run(e, built("simple-cnn", torch.float32), data, UNEQUAL) for e in (SequentialEngine(), VectorizedEngine())
    ]
    assert_same_run(*results)


def test_batch_norm_running_statistics_are_each_clients_own():
    """After one round of one client each, the vectorized engine's updates carry each client's
    running statistics and step count, as the sequential engine's do."""
    model = built("resnet8")
    data = images(120)
    tasks = [ClientTask(c, data.subset(p), seed=c) for c, p in enumerate(UNEQUAL)]
    config = ClientConfig(batch_size=8, lr=0.02)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sequential = list(SequentialEngine().run(model, state, tasks, config))
    vectorized = list(VectorizedEngine().run(model, state, tasks, config))
    for a, b in zip(sequential, vectorized, strict=True):
        assert a.client_id == b.client_id and a.num_steps == b.num_steps
        for name in (
            "0.weight",
            "1.running_mean",
            "1.running_var",
            "1.num_batches_tracked",
            "5.shortcut.1.running_var",
        ):
            torch.testing.assert_close(b.delta[name], a.delta[name], rtol=1e-10, atol=1e-12)
    counts = [u.delta["1.num_batches_tracked"].item() for u in vectorized]
    assert counts == [u.num_steps for u in vectorized] and len(set(counts)) > 1
    means = [u.delta["1.running_mean"] for u in vectorized]
    assert not torch.allclose(means[1], means[2])


def custom_bn(**options):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=2, padding=1),
            nn.BatchNorm2d(4, **options),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, groups=2, bias=False),
            nn.BatchNorm2d(6, **options),
            nn.LeakyReLU(),
            nn.AvgPool2d(2),
            nn.AdaptiveMaxPool2d(3),
            nn.Flatten(),
            nn.Linear(54, 10),
        ).double()

    return build


@pytest.mark.parametrize(
    "options",
    [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}],
    ids=["default", "cumulative", "not-affine", "untracked"],
)
def test_batch_norm_options_grouped_convolutions_and_other_layers(options):
    data = images(120, size=16)
    engine = VectorizedEngine()
    results = [run(e, custom_bn(**options)(), data, UNEQUAL, momentum=0.5) for e in (SequentialEngine(), engine)]
    assert engine.choice is not None and engine.choice.reason == "fastconv kernel"
    assert_agree(*results)


@pytest.mark.parametrize("strategy", [FedProx(proximal_mu=0.5), Scaffold()], ids=["fedprox", "scaffold"])
def test_strategies_terms_reach_the_parameters_and_not_the_buffers(strategy):
    data = images(120)
    results = [
        run(e, built("resnet8"), data, UNEQUAL, rounds=3, strategy=strategy)
        for e in (SequentialEngine(), VectorizedEngine())
    ]
    assert_agree(*results)


def test_kept_optimizer_state_carries_across_rounds():
    data = images(120)
    task = dataclasses.replace(make_task("classification", optimizer="adam"), keep_optimizer_state=True)
    results = [
        run(e, built("simple-cnn"), data, EQUAL, rounds=3, per_round=5, task=task, lr=0.001)
        for e in (SequentialEngine(), VectorizedEngine())
    ]
    assert_agree(*results)


@pytest.mark.parametrize("name", ["cnn", "simple-cnn", "resnet8"])
def test_evaluation_of_stacked_copies_equals_the_module(name):
    model = built(name, torch.float32)
    model.train()
    with torch.no_grad():  # running statistics that are not the initial ones
        for _ in range(3):
            model(images(64, seed=3, dtype=torch.float32).x * 2 + 1)
    data = images(2 * fastconv.EVAL_BATCH + 13, seed=2, dtype=torch.float32)  # a last batch of 13: one copy
    assert fastconv.stacked_net(model) is not None
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = evaluate(model, state, data)
    model.eval()
    with torch.no_grad():
        outputs = model(data.x)
    assert result.accuracy == (outputs.argmax(1) == data.y).double().mean().item()
    assert result.loss == pytest.approx(nn.functional.cross_entropy(outputs, data.y).item(), rel=1e-5)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), "evaluation changed the state"


class Doubled(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    "layers",
    [
        [nn.Conv2d(1, 2, 3), nn.Dropout(0.1), nn.Flatten(), nn.Linear(2 * 26 * 26, 10)],
        [Doubled(1, 2, 3), nn.Flatten(), nn.Linear(2 * 26 * 26, 10)],
        [nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(2 * 28 * 28, 10)],
        [nn.Conv2d(1, 10, 28)],
        [nn.ReLU(), nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 26 * 26, 10)],
    ],
    ids=["dropout", "subclass", "reflect-padding", "ends-in-images", "ambiguous-input"],
)
def test_what_fastconv_cannot_stack_goes_elsewhere(layers):
    model = nn.Sequential(*layers)
    assert fastconv.stacked_net(model) is None


def test_relu_then_max_pooling_is_computed_in_the_other_order_with_the_same_gradients():
    """The kernel pools first (a quarter of the elements), then applies the ReLU: the same
    values, and the gradient reaches the same element of each window, ties included."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 13 * 13, 3))
    model = model.double()
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([0.5, -0.5]))  # over the zero band: ties, positive and negative
    x = images(6).x
    net = fastconv.stacked_net(model)
    assert net is not None and net.ops[2] is fastconv._relu
    params = {k: v.detach().unsqueeze(0).requires_grad_() for k, v in model.named_parameters()}
    ours = torch.autograd.grad(net(params, x.unsqueeze(0)).square().sum(), list(params.values()))
    theirs = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a[0], b, rtol=1e-12, atol=1e-12)
    pre = model[0](x)
    windows = pre.unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)
    ties = (windows == windows.amax(-1, keepdim=True)).sum(-1) > 1
    assert ties.any(), "the data has no tied windows: the test tests nothing"


def test_auto_stacks_cnns_when_a_chunk_holds_more_than_one_client():
    engine = AutoEngine()
    data = images(8, dtype=torch.float32)
    tasks = [ClientTask(c, data.subset(np.arange(2 * c, 2 * c + 2)), seed=c) for c in range(4)]
    assert engine.choose(build_model("simple-cnn", (1, 28, 28), 10), tasks) is engine.vectorized
    assert engine.choice == EngineChoice("vectorized")
    for name in ("cnn", "resnet8"):  # a client's activations and weights fill a 64 MiB chunk
        assert engine.choose(build_model(name, (1, 28, 28), 10), tasks) is engine.sequential
        assert engine.choice.reason == "auto: one client per chunk of the vectorized engine's memory budget"
    roomy = AutoEngine(max_memory=1 << 30)
    assert roomy.choose(build_model("resnet8", (1, 28, 28), 10), tasks) is roomy.vectorized
    lstm = build_model("char-lstm", (8,), 20)
    tokens = TensorData(torch.zeros(4, 8, dtype=torch.int64), torch.zeros(4, 8, dtype=torch.int64))
    assert engine.choose(lstm, [ClientTask(0, tokens, seed=0)]) is engine.sequential


def agree_on_fastconv(build, data=None, **client):
    """Sequential and vectorized agree, and the vectorized engine ran the fastconv kernel."""
    data = data or images(120, size=16)
    engine = VectorizedEngine()
    results = [run(e, build(), data, UNEQUAL, **client) for e in (SequentialEngine(), engine)]
    assert engine.choice is not None and engine.choice.reason == "fastconv kernel"
    assert_agree(*results)


def assert_evaluates_as_the_module(model, data):
    """evaluate() gives the loss of the module itself in eval mode on the whole of `data`."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model.eval()(data.x), data.y).item()
    assert evaluate(model, state, data).loss == pytest.approx(expected, rel=1e-6)


def test_a_module_used_twice_runs_twice():
    def build():
        torch.manual_seed(0)
        act = nn.Tanh()
        return nn.Sequential(nn.Conv2d(1, 4, 3), act, nn.Conv2d(4, 4, 3), act, nn.Flatten(), nn.Linear(4 * 12 * 12, 10))

    agree_on_fastconv(lambda: build().double())
    assert_evaluates_as_the_module(build(), images(64, size=16, dtype=torch.float32))


def test_shared_weights_and_hooks_are_not_stacked():
    conv = nn.Conv2d(2, 2, 3, padding=1)
    tied = nn.Sequential(nn.Conv2d(1, 2, 3), conv, nn.ReLU(), conv, nn.Flatten(), nn.Linear(2 * 14 * 14, 10))
    assert fastconv.stacked_net(tied) is None
    hooked = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 10))
    assert fastconv.stacked_net(hooked) is not None
    hooked[0].register_forward_hook(lambda module, inputs, output: output * 0.5)
    assert fastconv.stacked_net(hooked) is None
    assert_evaluates_as_the_module(hooked, images(40, size=16, dtype=torch.float32))


def test_evaluation_keeps_the_batch_whole_for_batch_statistics():
    """BatchNorm without running statistics normalizes by the batch's own, in evaluation too."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 14 * 14, 10),
    )
    data = images(512, size=16, dtype=torch.float32)
    assert_evaluates_as_the_module(model, TensorData(data.x * 3 + 1, data.y))


def test_in_place_activations_after_the_swapped_pooling():
    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.ReLU(inplace=True)),
            nn.Flatten(),
            nn.Linear(4 * 7 * 7, 10),
        ).double()

    agree_on_fastconv(build)  # a nested Sequential first, in-place activations


def test_auto_with_one_client_a_round_asks_what_a_chunk_would_hold():
    engine = AutoEngine()
    tasks = [ClientTask(0, images(4, dtype=torch.float32), seed=0)]
    assert engine.choose(build_model("resnet8", (1, 28, 28), 10), tasks) is engine.sequential
    assert engine.choose(build_model("simple-cnn", (1, 28, 28), 10), tasks) is engine.vectorized
