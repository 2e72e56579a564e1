import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import blobs
from torch import nn

from fedforge import fastmlp
from fedforge.algorithms import ClientAlgorithm, proximal
from fedforge.client import ClientConfig, ClientPlan, epoch_orders, sgd, train_client
from fedforge.errors import ConfigError, DivergenceError
from fedforge.optim import LocalTerms


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.5, 1e-2)])
def test_sgd_matches_torch_optim(momentum, weight_decay):
    torch.manual_seed(0)
    ours = [torch.randn(4, 3), torch.randn(3)]
    theirs = [p.clone().requires_grad_() for p in ours]
    opt = torch.optim.SGD(theirs, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    buffers = None
    for _ in range(4):
        grads = [torch.randn_like(p) for p in ours]
        buffers = sgd(ours, grads, buffers, lr=0.1, momentum=momentum, weight_decay=weight_decay)
        for p, g in zip(theirs, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b.detach())


def reference_training(model, data, config, generator):
    """A plain torch.optim loop over the same batches: what train_client must equal."""
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    for order in epoch_orders(len(data), config.local_epochs, generator):
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            opt.zero_grad()
            F.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
            opt.step()
    return model.state_dict()


MODELS = {
    "mlp (fast kernel)": lambda: nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
    "tanh (autograd)": lambda: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)),
}


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize(
    "epochs, momentum, weight_decay", [(1, 0.0, 0.0), (3, 0.9, 0.0), (2, 0.0, 0.01), (2, 0.5, 0.01)]
)
def test_train_client_equals_a_plain_torch_loop(model_name, epochs, momentum, weight_decay):
    data = blobs(70)  # 70 = 2 full batches of 32 and one of 6
    config = ClientConfig(local_epochs=epochs, batch_size=32, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    torch.manual_seed(0)
    model = MODELS[model_name]()
    assert (fastmlp.mlp_layout(model) is not None) == ("fast" in model_name)
    start = copy.deepcopy(model.state_dict())
    update = train_client(
        copy.deepcopy(model), start, data, config, client_id=3, generator=torch.Generator().manual_seed(9)
    )
    expected = reference_training(model, data, config, torch.Generator().manual_seed(9))
    assert update.client_id == 3 and update.num_examples == 70 and update.num_steps == 3 * epochs
    for name in expected:
        torch.testing.assert_close(start[name] + update.delta[name], expected[name])
    assert 0 < update.train_loss < 10 and 0 <= update.train_accuracy <= 1


def test_fast_kernel_and_autograd_agree_on_metrics():
    data = blobs(100)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    runs = [
        train_client(
            copy.deepcopy(model),
            state,
            data,
            ClientConfig(batch_size=10),
            client_id=0,
            generator=torch.Generator().manual_seed(1),
            fast_mlp=fast,
        )
        for fast in (True, False)
    ]
    assert runs[0].train_accuracy == runs[1].train_accuracy
    assert runs[0].train_loss == pytest.approx(runs[1].train_loss, rel=1e-5)
    for name in state:
        torch.testing.assert_close(runs[0].delta[name], runs[1].delta[name])


@pytest.mark.parametrize(
    "model, fast",
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), True),
        (nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2)), True),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.ReLU(), nn.Linear(4, 2)), False),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU()), False),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), False),
        (nn.Sequential(nn.Flatten(0), nn.Linear(4, 2)), False),
        (nn.Linear(4, 2), False),
    ],
)
def test_mlp_layout_recognises_only_linear_relu_stacks(model, fast):
    assert (fastmlp.mlp_layout(model) is not None) == fast


def test_batchnorm_buffers_are_in_the_delta():
    data = blobs(64)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    update = train_client(
        model, state, data, ClientConfig(batch_size=16), client_id=0, generator=torch.Generator().manual_seed(0)
    )
    assert update.delta["1.num_batches_tracked"].dtype == torch.long
    assert update.delta["1.num_batches_tracked"].item() == 4
    assert update.delta["1.running_mean"].abs().sum() > 0


def test_divergence_is_reported():
    data = blobs(64)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    with pytest.raises(DivergenceError, match=r"client 7 diverged.*lower the learning rate"):
        train_client(
            model,
            model.state_dict(),
            data,
            ClientConfig(lr=1e30, batch_size=4),
            client_id=7,
            generator=torch.Generator().manual_seed(0),
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": 0.0}, "lr must be > 0, got 0.0"),
        ({"lr": -1}, "lr must be > 0"),
        ({"local_epochs": 0}, "local_epochs must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"momentum": 1.0}, "momentum must be in"),
    ],
)
def test_client_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ClientConfig(**kwargs)


@dataclasses.dataclass(frozen=True)
class ProximalAndCorrected(ClientAlgorithm):
    """FedProx's term (mu 0.3) and a correction the server sends (`inputs`), as SCAFFOLD's."""

    def terms(self, phase, received, state, inputs):
        prox = proximal(received, 0.3)
        return LocalTerms(prox.decay, prox.offset, {n: inputs[n] for n in received})


@pytest.mark.parametrize("model_name", MODELS)
def test_plan_terms_equal_a_plain_torch_loop(model_name):
    """FedProx's mu (w - w_global) added to every gradient, SCAFFOLD's correction applied
    outside the momentum buffer (p -= lr * correction after each step), and a step cap."""
    data = blobs(70)
    config = ClientConfig(local_epochs=2, batch_size=16, lr=0.05, momentum=0.5, weight_decay=0.01)
    torch.manual_seed(0)
    model = MODELS[model_name]()
    start = copy.deepcopy(model.state_dict())
    correction = {name: torch.randn_like(p) * 0.1 for name, p in model.named_parameters()}
    plan = ClientPlan(inputs=correction, max_steps=7)
    config = dataclasses.replace(config, algorithm=ProximalAndCorrected())
    update = train_client(
        copy.deepcopy(model), start, data, config, client_id=0, generator=torch.Generator().manual_seed(4), plan=plan
    )
    assert update.num_steps == 7

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5, weight_decay=0.01)
    steps = 0
    for order in epoch_orders(70, 2, torch.Generator().manual_seed(4)):
        for s in range(0, 70, 16):
            if steps == 7:
                break
            idx = order[s : s + 16]
            opt.zero_grad()
            F.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
            for name, p in model.named_parameters():
                p.grad += 0.3 * (p.detach() - start[name])
            opt.step()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p -= 0.05 * correction[name]
            steps += 1
    for name, value in model.state_dict().items():
        torch.testing.assert_close(start[name] + update.delta[name], value)


def test_initial_loss_is_the_global_models_loss_on_the_clients_data():
    data = blobs(50)
    model = nn.Sequential(nn.Linear(8, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    update = train_client(
        model,
        state,
        data,
        ClientConfig(),
        client_id=0,
        generator=torch.Generator().manual_seed(0),
        plan=ClientPlan(measure_initial_loss=True),
    )
    with torch.no_grad():
        expected = F.cross_entropy(torch.func.functional_call(model, state, (data.x,)), data.y).item()
    assert update.initial_loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "optimizer, options",
    [
        (torch.optim.Adam, {}),  # fedforge's functional rule
        (torch.optim.AdamW, {"weight_decay": 0.1}),
        (torch.optim.RMSprop, {"momentum": 0.5}),  # torch.optim itself, its state carried as tensors
    ],
)
def test_a_kept_optimizer_state_continues_where_the_last_round_left_off(optimizer, options):
    """Two rounds of one client with its optimizer kept equal one torch.optim optimizer over both
    rounds' batches; starting fresh in the second round does not."""
    import dataclasses

    from fedforge.tasks import CLASSIFICATION

    data = blobs(70)
    task = dataclasses.replace(
        CLASSIFICATION, optimizer=optimizer, optimizer_options=options, keep_optimizer_state=True
    )
    config = ClientConfig(batch_size=16, lr=0.01, task=task)
    torch.manual_seed(0)
    model = MODELS["tanh (autograd)"]()
    reference = copy.deepcopy(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer_state = fresh = None
    for round_ in range(2):
        update = train_client(
            copy.deepcopy(model),
            state,
            data,
            config,
            client_id=0,
            generator=torch.Generator().manual_seed(round_),
            optimizer_state=optimizer_state,
        )
        if round_ == 1:  # the same round with a fresh optimizer
            fresh = train_client(
                copy.deepcopy(model), state, data, config, client_id=0, generator=torch.Generator().manual_seed(round_)
            )
        state = {k: state[k] + update.delta[k] for k in state}
        optimizer_state = update.optimizer_state
    assert optimizer_state is not None and optimizer_state.step.item() == 10

    opt = optimizer(reference.parameters(), **{"lr": 0.01, "weight_decay": 0.0, **options})
    for round_ in range(2):
        for order in epoch_orders(70, 1, torch.Generator().manual_seed(round_)):
            for s in range(0, 70, 16):
                idx = order[s : s + 16]
                opt.zero_grad()
                F.cross_entropy(reference(data.x[idx]), data.y[idx]).backward()
                opt.step()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(state[name], value)
    assert not torch.allclose(fresh.delta["0.weight"], update.delta["0.weight"])


def test_the_optimizer_state_is_only_returned_when_kept():
    update = train_client(
        nn.Linear(8, 4),
        nn.Linear(8, 4).state_dict(),
        blobs(20),
        ClientConfig(momentum=0.9),
        client_id=0,
        generator=torch.Generator(),
    )
    assert update.optimizer_state is None


@pytest.mark.parametrize(
    "options, message",
    [
        ({"betas": (0.9, 1.5)}, "task classification: Adam: Invalid beta parameter at index 1: 1.5"),
        ({"nesterov": True}, "task classification: Adam: "),
    ],
)
def test_bad_optimizer_options_are_one_line(options, message):
    from fedforge.tasks import CLASSIFICATION

    task = CLASSIFICATION.with_optimizer("adam", **options)
    with pytest.raises(ConfigError, match=message):
        ClientConfig(task=task)


def test_the_shared_types_are_still_importable_from_client():
    from fedforge import client, contract, optim

    assert client.ClientConfig is contract.ClientConfig and client.ClientUpdate is contract.ClientUpdate
    assert client.LocalTerms is optim.LocalTerms and client.sgd is optim.sgd and client.State is optim.State


def test_keeping_the_optimizer_state_is_a_task_setting_and_a_flag():
    import dataclasses

    from fedforge.config import Config
    from fedforge.tasks import CLASSIFICATION

    assert Config(keep_optimizer_state=True, optimizer="adam").client_config().task.keep_optimizer_state
    assert not Config().client_config().task.keep_optimizer_state
    with pytest.raises(ConfigError, match="task mine: keep_optimizer_state is for the built-in training"):
        dataclasses.replace(CLASSIFICATION, name="mine", train=lambda *a: None, keep_optimizer_state=True)
