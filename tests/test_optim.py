"""The optimizer rules against torch.optim, and stacked clients against one client at a time."""

import pytest
import torch

from fedforge.optim import LocalTerms, OptimizerState, Rule, rule_for


def torch_steps(optimizer_class, params, grads_per_step, **options):
    theirs = [p.clone().requires_grad_() for p in params]
    optimizer = optimizer_class(theirs, **options)
    for grads in grads_per_step:
        for p, g in zip(theirs, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    return [p.detach() for p in theirs]


def rule_steps(rule, params, grads_per_step, terms=LocalTerms(0.0)):
    ours = {str(i): p.clone() for i, p in enumerate(params)}
    state = rule.init(ours)
    for grads in grads_per_step:
        rule.step(ours, {str(i): g for i, g in enumerate(grads)}, state, terms)
    return list(ours.values()), state


def random_steps(params, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g) for p in params] for _ in range(steps)]


PARAMS = [torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), torch.randn(3)]


@pytest.mark.parametrize(
    "optimizer, options",
    [
        (torch.optim.Adam, {"lr": 0.01}),
        (torch.optim.Adam, {"lr": 0.1, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05}),
        (torch.optim.AdamW, {"lr": 0.01}),
        (torch.optim.AdamW, {"lr": 0.1, "betas": (0.5, 0.9), "eps": 1e-3, "weight_decay": 0.3}),
    ],
)
def test_functional_adam_and_adamw_equal_torch_optim(optimizer, options):
    grads = random_steps(PARAMS, 6)
    rule = rule_for(
        optimizer,
        {k: v for k, v in options.items() if k not in ("lr", "weight_decay")},
        lr=options["lr"],
        weight_decay=options.get("weight_decay", 0.0),
    )
    assert rule is not None and rule.name == optimizer.__name__.lower()
    ours, state = rule_steps(rule, PARAMS, grads)
    theirs = torch_steps(optimizer, PARAMS, grads, **{"weight_decay": 0.0, **options})
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert state.step.item() == 6 and set(state.slots) == {"exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.5, 1e-2)])
def test_functional_sgd_equals_torch_optim(momentum, weight_decay):
    grads = random_steps(PARAMS, 4)
    ours, _ = rule_steps(Rule("sgd", lr=0.1, momentum=momentum, weight_decay=weight_decay), PARAMS, grads)
    theirs = torch_steps(torch.optim.SGD, PARAMS, grads, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "rule",
    [
        Rule("sgd", lr=0.1, momentum=0.9, weight_decay=0.01),
        Rule("adam", lr=0.05),
        Rule("adamw", lr=0.05, weight_decay=0.1),
    ],
    ids=lambda r: r.name,
)
def test_stacked_clients_step_as_each_would_alone(rule):
    """Three clients with their own terms and step counts (kept states) in one stacked step."""
    g = torch.Generator().manual_seed(2)
    clients = 3
    params = [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)} for _ in range(clients)]
    states = []
    for c in range(clients):  # c earlier steps: different bias corrections per client
        state = rule.init(params[c])
        for _ in range(c):
            rule.step(
                params[c], {k: torch.randn(v.shape, generator=g) for k, v in params[c].items()}, state, LocalTerms(0.0)
            )
        states.append(state)
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in p.items()} for p in params]
    offsets = [{k: torch.randn(v.shape, generator=g) for k, v in p.items()} for p in params]
    corrections = [{k: torch.randn(v.shape, generator=g) for k, v in p.items()} for p in params]

    def stack(dicts):
        return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}

    stacked_params, stacked_state = stack(params), rule.stacked(states, params[0])
    rule.step(stacked_params, stack(grads), stacked_state, LocalTerms(0.3, stack(offsets), stack(corrections)))
    for c in range(clients):
        rule.step(params[c], grads[c], states[c], LocalTerms(0.3, offsets[c], corrections[c]))
        for k in params[c]:
            torch.testing.assert_close(stacked_params[k][c], params[c][k])
        assert stacked_state.client(c).step.item() == states[c].step.item() == c + 1
        for slot in rule.slots:
            for k in params[c]:
                torch.testing.assert_close(stacked_state.slots[slot][k][c], states[c].slots[slot][k])


def test_a_fresh_state_is_zeros_and_a_stack_of_fresh_states_too():
    rule = Rule("adam", lr=0.1)
    params = {"w": torch.ones(2, 2)}
    stacked = rule.stacked([None, None], params)
    assert stacked.step.shape == (2,) and stacked.slots["exp_avg"]["w"].shape == (2, 2, 2)
    assert isinstance(stacked, OptimizerState) and not stacked.step.any()


@pytest.mark.parametrize(
    "optimizer, options",
    [
        (torch.optim.Adam, {"amsgrad": True}),
        (torch.optim.Adam, {"maximize": True}),
        (torch.optim.AdamW, {"foreach": True}),
        (torch.optim.RMSprop, {}),
        (torch.optim.SGD, {}),
        (torch.optim.Adam, {"lr": torch.tensor(0.01)}),
    ],
)
def test_what_no_rule_computes_is_left_to_torch_optim(optimizer, options):
    assert rule_for(optimizer, options, lr=0.1) is None


def test_rules_take_the_optimizers_own_defaults():
    assert rule_for(torch.optim.Adam, {}, lr=0.1) == Rule("adam", lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    assert rule_for(None, {}, lr=0.1, momentum=0.5) == Rule("sgd", lr=0.1, momentum=0.5)
    assert rule_for(torch.optim.AdamW, {"amsgrad": False, "betas": [0.8, 0.9]}, lr=0.1).betas == (0.8, 0.9)


def test_the_client_optimizer_by_name_in_python():
    """ClientConfig(optimizer=...) as --optimizer: the task then trains with it, and the run equals one
    whose task names the optimizer itself."""
    import dataclasses

    import numpy as np

    from fedforge import ClientConfig, FederatedData, TensorData, simulate
    from fedforge.errors import ConfigError
    from fedforge.tasks import CLASSIFICATION, REGRESSION

    adam = ClientConfig(lr=0.01, optimizer="adam")
    assert adam.task.optimizer is torch.optim.Adam and adam.rule is not None and adam.rule.name == "adam"
    assert ClientConfig(optimizer="sgd").task is CLASSIFICATION
    assert dataclasses.replace(adam, lr=0.05).task == adam.task  # replace() comes by __post_init__ again
    own = dataclasses.replace(REGRESSION, optimizer=torch.optim.AdamW, optimizer_options={"betas": (0.8, 0.9)})
    assert ClientConfig(task=own, optimizer="adamw").task.optimizer_options == {"betas": (0.8, 0.9)}  # kept
    assert ClientConfig(task=own, optimizer="sgd").task.optimizer is None
    with pytest.raises(ConfigError, match="unknown optimizer 'adamm' \\(choose from: sgd, adam, adamw\\)"):
        ClientConfig(optimizer="adamm")
    with pytest.raises(ConfigError, match="momentum is SGD's; Adam takes its own options"):
        ClientConfig(momentum=0.9, optimizer="adam")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=g)
    data = FederatedData(TensorData(x, (x[:, 0] > 0).long()), np.array_split(np.arange(60), 3))
    model = torch.nn.Linear(4, 2)
    by_name = simulate(model, data, rounds=2, clients_per_round=2, client=ClientConfig(batch_size=8, optimizer="adam"))
    by_task = simulate(
        model,
        data,
        rounds=2,
        clients_per_round=2,
        client=ClientConfig(batch_size=8, task=CLASSIFICATION.with_optimizer("adam")),
    )
    assert by_name.history.column("train_loss") == by_task.history.column("train_loss")
    sgd = simulate(model, data, rounds=2, clients_per_round=2, client=ClientConfig(batch_size=8))
    assert by_name.history.column("train_loss") != sgd.history.column("train_loss")
