"""The network engine's checks of an update against the task it answers (no sockets needed)."""

import pytest
import torch

from fedforge.client import ClientConfig, ClientPlan
from fedforge.engines import ClientTask
from fedforge.engines.network import update_from
from fedforge.network.wire import Kind, Message

GLOBAL = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
CONFIG = ClientConfig(local_epochs=2, batch_size=10)


def message(**header):
    fields = {"task": 1, "num_examples": 25, "num_steps": 6, "train_loss": 0.5, "train_accuracy": 0.8, **header}
    return Message(Kind.UPDATE, fields, {f"delta/{k}": torch.ones_like(v) for k, v in GLOBAL.items()})


def task(**plan):
    return ClientTask(4, None, 0, plan=ClientPlan(**plan))


def test_a_consistent_update_is_accepted():
    update = update_from(message(), task(), CONFIG, GLOBAL)
    assert (update.client_id, update.num_examples, update.num_steps) == (4, 25, 6)  # 2 epochs of 3 batches


@pytest.mark.parametrize(
    "header, plan, reason",
    [
        (
            {"num_examples": 10**18, "num_steps": 2 * 10**17},
            {},
            "num_examples 1000000000000000000 is not between 1 and",
        ),
        ({"num_examples": 0, "num_steps": 0}, {}, "num_examples 0 is not between"),
        ({"num_examples": 25.0}, {}, "num_examples 25.0 is not between"),
        ({"num_examples": True}, {}, "num_examples True is not between"),
        ({"num_steps": 7}, {}, "num_steps 7 is not the 6 steps its task asks of 25 examples"),
        ({"num_steps": 6}, {"max_steps": 4}, "num_steps 6 is not the 4 steps"),  # a straggler's partial work
        ({"num_steps": 6}, {"epochs": 1}, "num_steps 6 is not the 3 steps"),
        ({"train_loss": 1e308}, {}, "train_loss 1e+308 is not a number in"),
        ({"train_loss": "0.5"}, {}, "train_loss '0.5' is not a number in"),
        ({"train_accuracy": 1.5}, {}, "train_accuracy 1.5 is not a number in [0, 1]"),
        ({"initial_loss": -1e20}, {}, "initial_loss -1e+20 is not a number in"),
        ({"inputs_differ": "yes"}, {}, "inputs_differ 'yes' is not true or false"),
        ({"inputs_differ": 1}, {}, "inputs_differ 1 is not true or false"),
        ({"personalized": {"metrics": {"accuracy": 0.9}}}, {}, "personalized must be {metrics, num_examples}"),
        ({"personalized": {"metrics": {}, "num_examples": 0}}, {}, "personalized num_examples 0 is not between"),
        ({"personalized": {"metrics": {"a": 1e300}, "num_examples": 5}}, {}, "a 1e+300 is not a number in"),
        ({"personalized": {"metrics": {"x" * 65: 1}, "num_examples": 5}}, {}, "personalized metrics must be at most"),
        ({"personalized": {"metrics": [0.5], "num_examples": 5}}, {}, "personalized metrics must be at most 32"),
    ],
)
def test_counts_and_metrics_must_fit_the_task(header, plan, reason):
    with pytest.raises(ValueError, match=reason.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        update_from(message(**header), task(**plan), CONFIG, GLOBAL)


def test_a_clients_personalized_evaluation_is_kept():
    update = update_from(
        message(personalized={"metrics": {"accuracy": 0.75}, "num_examples": 8}), task(), CONFIG, GLOBAL
    )
    assert update.personalized == ({"accuracy": 0.75}, 8)


def test_the_example_bound_is_the_server_s_setting():
    with pytest.raises(ValueError, match="not between 1 and 20"):
        update_from(message(), task(), CONFIG, GLOBAL, max_examples=20)


def test_a_task_carries_the_rounds_config():
    from dataclasses import replace

    from fedforge.engines.network import task_message

    config = replace(CONFIG, lr=0.025, local_epochs=3, momentum=0.5, weight_decay=1e-4, round=2, rounds=7)
    header = task_message(9, task(), GLOBAL, config).header
    assert {k: header[k] for k in ("round", "rounds", "lr", "local_epochs", "momentum", "weight_decay")} == {
        "round": 2,
        "rounds": 7,
        "lr": 0.025,
        "local_epochs": 3,
        "momentum": 0.5,
        "weight_decay": 1e-4,
    }


def test_only_the_fields_a_task_carries_may_change_by_round():
    # A task carries the round's lr, local_epochs, momentum and weight_decay; the batch size (and the
    # task, the optimizer) the clients learn once, from the welcome: a change would not reach them.
    from dataclasses import replace

    from fedforge.engines.base import RoundFailed
    from fedforge.engines.network import NetworkEngine
    from fedforge.errors import ConfigError

    class NoClients:
        def wait_for_clients(self, count, timeout):
            return False

    engine = NetworkEngine(NoClients(), round_timeout=1, min_fit_clients=1)
    for r, lr, epochs in ((1, 0.01, 2), (2, 0.005, 3)):  # a schedule's change: the round goes on (here: no clients)
        with pytest.raises(RoundFailed):
            engine.run(None, GLOBAL, [task()], replace(CONFIG, lr=lr, local_epochs=epochs, round=r, rounds=3))
    with pytest.raises(ConfigError, match="learn batch_size once, when they join"):
        engine.run(None, GLOBAL, [task()], replace(CONFIG, batch_size=5, round=3, rounds=3))


def test_an_algorithms_role_patterns_travel_and_only_shared_entries_go():
    from dataclasses import replace

    from fedforge.algorithms import HEAD, FedBN, FedPer, Roles, describe, from_description
    from fedforge.engines.network import NetworkEngine

    fedper = FedPer(roles=Roles(personal=("b",), frozen=("w",)))
    assert describe(FedPer()) == {"name": "fedper", "options": {}}  # its own roles: its name says them
    assert describe(fedper) == {"name": "fedper", "options": {}, "personal": ["b"], "frozen": ["w"]}
    assert from_description(describe(fedper)) == fedper and from_description(describe(FedPer())).roles.personal == HEAD
    frozen_bn = FedBN().with_roles(Roles(personal=FedBN().roles.personal, frozen=("w",)))
    assert describe(frozen_bn) == {"name": "fedbn", "options": {}, "frozen": ["w"]}  # its test stays its class's
    assert from_description(describe(frozen_bn)) == frozen_bn
    with pytest.raises(Exception, match="cannot travel"):
        describe(FedBN(roles=Roles(personal=lambda name, module: True)))

    class Hub:  # one connected client; what is sent is kept
        max_message_bytes = 1 << 20

        def __init__(self):
            self.sent = []

        def wait_for_clients(self, count, timeout):
            return True

        def current(self, client_id):
            return object()

        def send(self, session, data):
            self.sent.append(data)
            return False  # then the round waits for nothing

    from fedforge.engines.base import RoundFailed
    from fedforge.network.wire import decode

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)  # frozen by its owner
    hub = Hub()
    config = replace(CONFIG, algorithm=FedPer(roles=Roles(personal=("1.*",))))
    with pytest.raises(RoundFailed):
        list(NetworkEngine(hub, round_timeout=0.01, min_fit_clients=1).run(model, model.state_dict(), [task()], config))
    sent = decode(hub.sent[0])
    assert sent.tensors.keys() == {"global/0.bias"} and sent.header["algorithm"]["personal"] == ["1.*"]


def test_an_update_covers_the_shared_entries_exactly():
    shared = {"w": GLOBAL["w"]}  # "b" personal: the engine checks against the shared entries it sent
    with pytest.raises(ValueError, match="differ from the global model's shared ones"):
        update_from(message(), task(), CONFIG, shared)
    update = update_from(Message(Kind.UPDATE, message().header, {"delta/w": torch.ones(2, 3)}), task(), CONFIG, shared)
    assert update.delta.keys() == {"w"}
