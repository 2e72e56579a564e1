"""Client algorithms (fedforge.algorithms): roles, client state, phases, loss terms, and the
built-ins' semantics, each against a plain PyTorch loop or a hand computation (sequential engine)."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import blobs
from test_simulation import make_model, small_problem
from torch import nn

from fedforge import ClientConfig, simulate
from fedforge.algorithms import (
    HEAD,
    ClientAlgorithm,
    ClientState,
    Ditto,
    FedBN,
    FedPer,
    FedRep,
    Proximal,
    Roles,
    phase_seed,
)
from fedforge.cli import main
from fedforge.client import ClientPlan, epoch_orders, train_client
from fedforge.errors import ConfigError, DivergenceError
from fedforge.privacy import DifferentialPrivacy
from fedforge.strategies import FedAvg, FedDyn, Krum, Scaffold

CONFIG = ClientConfig(batch_size=16, lr=0.1)


def mlp():
    return make_model()


def test_roles_by_pattern_head_predicate_and_requires_grad():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    model[0].bias.requires_grad_(False)
    roles = Roles(personal=HEAD).assign(model)
    assert roles.personal == ["3.weight", "3.bias"]
    assert roles.roles["0.bias"] == "frozen"  # requires_grad=False: frozen unless said otherwise
    assert Roles(shared=["0.bias"]).assign(model).roles["0.bias"] == "shared"
    bn = FedBN().roles.assign(model)
    assert bn.personal == ["1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert Roles(frozen=["0.*"]).assign(model).trained(["shared", "personal"]) == [
        "1.weight",
        "1.bias",
        "3.weight",
        "3.bias",
    ]


def test_a_role_pattern_that_matches_nothing_or_twice_is_refused():
    with pytest.raises(ConfigError, match=r"^personal pattern 'fc3\.\*' matches no entry of the model"):
        Roles(personal=["fc3.*"]).assign(mlp())
    with pytest.raises(ConfigError, match=r"entry '2\.weight' is picked as both personal and frozen"):
        Roles(personal=["2.*"], frozen=["2.weight"]).assign(mlp())


def personal_run(algorithm, rounds=3, **kwargs):
    seen = []
    result = simulate(
        mlp(),
        small_problem(partition="dirichlet", test_fraction=0.25),
        rounds=rounds,
        clients_per_round=3,
        client=dataclasses.replace(CONFIG, algorithm=algorithm),
        seed=5,
        on_client=seen.append,
        **kwargs,
    )
    return result, seen


def test_fedper_keeps_the_head_on_each_client_and_sends_the_body_only():
    result, updates = personal_run(FedPer())
    assert set(result.state.params) == {"0.weight", "0.bias"}  # the server holds the shared entries only
    for update in updates:
        assert set(update.delta) == {"0.weight", "0.bias"}
        assert set(update.client_state.personal) == {"2.weight", "2.bias"}
    # A client's second round starts from the head it kept, not from the initial one.
    by_client: dict[int, list] = {}
    for update in updates:
        by_client.setdefault(update.client_id, []).append(update)
    twice = next(c for c, u in by_client.items() if len(u) > 1)
    first = by_client[twice][0].client_state.personal
    initial = mlp().state_dict()
    assert not torch.equal(first["2.weight"], initial["2.weight"])
    # Personalized evaluation ran (the algorithm keeps a model of its own, the clients hold examples out).
    final = result.history.final.metrics
    assert 0 <= final["personalized_accuracy_p10"] <= final["personalized_accuracy_p90"] <= 1
    assert "personalized_loss" in final


def test_a_personal_head_trains_exactly_as_a_plain_loop_from_the_clients_own_head():
    data = blobs(70)
    model = mlp()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    head = {"2.weight": torch.randn(4, 16) * 0.1, "2.bias": torch.zeros(4)}
    update = train_client(
        copy.deepcopy(model),
        start,
        data,
        dataclasses.replace(CONFIG, algorithm=FedPer()),
        client_id=0,
        generator=torch.Generator().manual_seed(4),
        client_state=ClientState(personal=head),
    )
    reference = copy.deepcopy(model)
    reference.load_state_dict({**start, **head})
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for order in epoch_orders(70, 1, torch.Generator().manual_seed(4)):
        for s in range(0, 70, 16):
            opt.zero_grad()
            F.cross_entropy(reference(data.x[order[s : s + 16]]), data.y[order[s : s + 16]]).backward()
            opt.step()
    after = reference.state_dict()
    for name in ("0.weight", "0.bias"):
        torch.testing.assert_close(start[name] + update.delta[name], after[name])
    for name in ("2.weight", "2.bias"):
        torch.testing.assert_close(update.client_state.personal[name], after[name])


def sgd_phase(model, params, data, epochs, seed, lr=0.1, penalty=None):
    """Plain SGD of the named `params` of `model` (the others fixed) over `epochs` epochs of batches from `seed`."""
    named = dict(model.named_parameters())
    opt = torch.optim.SGD([named[n] for n in params], lr=lr)
    for order in epoch_orders(len(data), epochs, torch.Generator().manual_seed(seed)):
        for s in range(0, len(data), 16):
            opt.zero_grad()
            loss = F.cross_entropy(model(data.x[order[s : s + 16]]), data.y[order[s : s + 16]])
            if penalty is not None:
                loss = loss + penalty(named)
            loss.backward()
            opt.step()


def test_fedrep_trains_the_head_alone_then_the_body_alone():
    data = blobs(70)
    model = mlp()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    update = train_client(
        copy.deepcopy(model),
        start,
        data,
        dataclasses.replace(CONFIG, algorithm=FedRep(head_epochs=2)),
        client_id=0,
        generator=torch.Generator().manual_seed(4),
    )
    reference = copy.deepcopy(model)
    sgd_phase(reference, ["2.weight", "2.bias"], data, 2, 4)  # phase 0: the head, from the batch seed
    sgd_phase(reference, ["0.weight", "0.bias"], data, 1, phase_seed(4, 1))  # phase 1: the body
    after = reference.state_dict()
    assert update.num_steps == 2 * 5 + 5
    for name in ("0.weight", "0.bias"):
        torch.testing.assert_close(start[name] + update.delta[name], after[name])
    for name in ("2.weight", "2.bias"):
        torch.testing.assert_close(update.client_state.personal[name], after[name])


def test_ditto_sends_fedavgs_update_and_keeps_a_proximal_personal_copy():
    data = blobs(70)
    model = mlp()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    config = dataclasses.replace(CONFIG, algorithm=Ditto(lam=0.5, epochs=2))
    update = train_client(
        copy.deepcopy(model), start, data, config, client_id=0, generator=torch.Generator().manual_seed(4)
    )
    plain = train_client(
        copy.deepcopy(model), start, data, CONFIG, client_id=0, generator=torch.Generator().manual_seed(4)
    )
    for name, value in plain.delta.items():
        assert torch.equal(update.delta[name], value)  # the shared model trains as FedAvg's clients do
    reference = copy.deepcopy(model)

    def proximal(named):
        return 0.5 / 2 * sum(((p - start[n]) ** 2).sum() for n, p in named.items())

    sgd_phase(reference, list(start), data, 2, phase_seed(4, 1), penalty=proximal)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(update.client_state.copy[name], value)


@dataclasses.dataclass(frozen=True)
class ProximalByLoss(ClientAlgorithm):
    """FedProx written as a loss term of one's own: mu/2 ||w - w_received||^2."""

    mu: float = 0.3
    name = "proximal-by-loss"

    def loss_term(self, phase, params, received, state, inputs):
        return self.mu / 2 * sum(((p - received[n]) ** 2).sum() for n, p in params.items())


def test_a_loss_term_of_ones_own_equals_the_same_term_given_as_local_terms():
    data = blobs(70)
    model = mlp()
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def trained(algorithm):
        return train_client(
            copy.deepcopy(model),
            start,
            data,
            dataclasses.replace(CONFIG, algorithm=algorithm),
            client_id=0,
            generator=torch.Generator().manual_seed(4),
        )

    by_loss, by_terms, plain = trained(ProximalByLoss()), trained(Proximal(0.3)), trained(ClientAlgorithm())
    for name, value in by_terms.delta.items():
        torch.testing.assert_close(by_loss.delta[name], value)
        assert not torch.allclose(plain.delta[name], value)


@dataclasses.dataclass(frozen=True)
class VectorTerm(ClientAlgorithm):
    name = "vector-term"

    def loss_term(self, phase, params, received, state, inputs):
        return torch.stack([p.sum() for p in params.values()])


def test_a_loss_term_that_is_not_a_scalar_is_refused_in_one_line():
    with pytest.raises(
        ConfigError, match=r"^algorithm vector-term: loss_term must return a scalar tensor, got \(4,\)$"
    ):
        personal_run(VectorTerm(), rounds=1)


def test_frozen_entries_are_neither_trained_nor_sent():
    result, updates = personal_run(ClientAlgorithm(roles=Roles(frozen=["0.*"])), rounds=2)
    assert set(result.state.params) == {"2.weight", "2.bias"}
    assert all(set(u.delta) == {"2.weight", "2.bias"} and u.client_state is None for u in updates)


def test_a_robust_strategy_refuses_entries_kept_on_the_clients():
    with pytest.raises(
        ConfigError, match=r"^strategy krum cannot run with personal or frozen entries \(2.weight, ...\)"
    ):
        personal_run(FedPer(), rounds=1, strategy=Krum())


def test_a_strategy_with_its_own_client_algorithm_refuses_another():
    with pytest.raises(ConfigError, match="strategy scaffold brings its own client algorithm"):
        personal_run(FedPer(), rounds=1, strategy=Scaffold())


def test_feddyn_learns_and_keeps_each_clients_linear_term():
    result, updates = personal_run(ClientAlgorithm(), rounds=4, strategy=FedDyn(feddyn_alpha=0.01))
    assert result.history.final.test_accuracy > 0.5
    assert all(set(u.client_state.algorithm) == {"0.weight", "0.bias", "2.weight", "2.bias"} for u in updates)
    assert "personalized_accuracy" not in result.history.final.metrics  # FedDyn keeps no model of its own


def test_scaffold_clients_keep_their_control_and_send_its_change():
    _, updates = personal_run(ClientAlgorithm(), rounds=2, strategy=Scaffold())
    for update in updates:
        change = update.extras
        assert set(change) == set(update.client_state.algorithm) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    # A client's first round: its control was zero, so what it sends is its new control.
    first = updates[0]
    for name, value in first.extras.items():
        assert torch.equal(value, first.client_state.algorithm[name])


def test_personalized_evaluation_needs_held_out_examples():
    with pytest.raises(ConfigError, match="personalized evaluation needs held-out examples"):
        simulate(
            mlp(),
            small_problem(),
            rounds=1,
            clients_per_round=2,
            client=CONFIG,
            personalized_eval=True,
        )


def test_fedavgs_personalized_evaluation_is_each_clients_locally_trained_model():
    result, updates = personal_run(ClientAlgorithm(), rounds=1, personalized_eval=True, strategy=FedAvg())
    assert "personalized_accuracy" in result.history.final.metrics
    assert all(u.client_state is None for u in updates)
    plan = ClientPlan()
    assert plan.inputs is None


def test_an_evaluation_of_ones_own_runs_every_round_on_the_global_model():
    seen = []
    test = blobs(200, seed=2)

    def mine(module, r):
        seen.append((r, module.training))
        with torch.no_grad():
            hits = (module(test.x).argmax(1) == test.y).float().mean().item()
        return {"hits": hits, "round_seen": r}

    result = simulate(mlp(), small_problem(), rounds=2, clients_per_round=2, client=CONFIG, evaluate_fn=mine)
    assert seen == [(0, False), (1, False), (2, False)]
    for record in result.history.records:
        assert record.metrics["eval_round_seen"] == record.round
        assert record.metrics["eval_hits"] == pytest.approx(record.test_accuracy)  # the same model, the same data
    with pytest.raises(ConfigError, match="evaluate_fn must return numbers by name"):
        simulate(mlp(), small_problem(), rounds=1, clients_per_round=2, evaluate_fn=lambda m, r: 0.5)


USER_ALGORITHMS = """
import torch
from dataclasses import dataclass
from fedforge.algorithms import ClientAlgorithm


@dataclass(frozen=True)
class VectorTerm(ClientAlgorithm):
    name = "vector-term"

    def loss_term(self, phase, params, received, state, inputs):
        return torch.stack([p.sum() for p in params.values()])
"""


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--algorithm", "fedper", "--personal", "head.*"], "personal pattern 'head.*' matches no entry of the model"),
        (["--algorithm", "fedper", "--strategy", "krum"], "strategy krum cannot run with personal or frozen entries"),
        (["--algorithm", "fedbn", "--strategy", "scaffold"], "strategy scaffold brings its own client algorithm"),
        (["--algorithm", "user_algorithms:VectorTerm"], "loss_term must return a scalar tensor, got (6,)"),
        (["--algorithm", "moon"], "unknown algorithm 'moon' (choose from: fedavg, ditto, fedper, fedrep, fedbn, or"),
        (["--personalized-eval", "on"], "personalized evaluation needs held-out examples on each client"),
        (["--evaluate-fn", "user_algorithms:nothing"], "evaluate_fn 'user_algorithms:nothing': user_algorithms has no"),
    ],
)
def test_bad_algorithm_settings_are_one_line_and_exit_2(capsys, tmp_path, monkeypatch, flags, message):
    (tmp_path / "user_algorithms.py").write_text(USER_ALGORITHMS)
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--dataset", "synthetic", "--num-clients", "4", "--clients-per-round", "2", "--rounds", "1", *flags]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_a_rounds_payload_counts_the_shared_entries_and_the_algorithms_tensors_only():
    model_bytes = sum(v.numel() * v.element_size() for v in mlp().state_dict().values())
    head_bytes = (16 * 4 + 4) * 4
    plain, _ = personal_run(ClientAlgorithm(), rounds=1)
    fedper, _ = personal_run(FedPer(), rounds=1)
    scaffold, _ = personal_run(ClientAlgorithm(), rounds=1, strategy=Scaffold())
    clients = len(plain.history.final.clients)
    assert plain.history.final.metrics["payload_up"] == plain.history.final.metrics["payload_down"]
    assert plain.history.final.metrics["payload_up"] == clients * model_bytes
    for way in ("payload_up", "payload_down"):
        assert fedper.history.final.metrics[way] == clients * (model_bytes - head_bytes)
        assert scaffold.history.final.metrics[way] == 2 * clients * model_bytes  # c down, c_i+ - c_i up


def test_differential_privacy_clips_the_shared_entries_only():
    """Each client's update (its shared entries) is clipped to C; the heads it keeps are not touched."""
    clip = 1e-3
    result, updates = personal_run(
        FedPer(), rounds=1, privacy=DifferentialPrivacy(mode="central", clip=clip, noise_multiplier=1e-9)
    )
    start = {k: v for k, v in mlp().state_dict().items() if k in result.state.params}
    change = torch.cat([(result.state.params[k] - v).flatten() for k, v in start.items()])
    assert 0 < change.norm() <= clip * (1 + 1e-5)  # the mean of updates each clipped to C
    initial_head = mlp().state_dict()["2.weight"]
    moved = [(u.client_state.personal["2.weight"] - initial_head).norm() for u in updates]
    assert min(moved) > 10 * clip  # the personal head trains freely


@dataclasses.dataclass(frozen=True)
class KeepsTrained(ClientAlgorithm):
    """A hook that hands back the tensors it was given: the engines must copy them."""

    name = "keeps-trained"

    def init_state(self, shared):
        return {k: torch.zeros_like(v) for k, v in shared.items()}

    def finish(self, received, trained, state, inputs, steps, lr):
        return dict(trained), dict(trained)


@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
def test_what_a_hook_returns_is_the_clients_own_not_a_view_the_next_client_overwrites(engine):
    from fedforge.engines import make_engine

    _, updates = personal_run(KeepsTrained(), rounds=1, engine=make_engine(engine))
    for update in updates:
        for name, value in update.delta.items():
            trained = update.extras[name]
            assert torch.equal(update.client_state.algorithm[name], trained)
            # trained = received + delta, each client's own
            assert torch.allclose(trained - value, mlp().state_dict()[name], atol=1e-6)


def test_a_personal_copy_that_diverges_stops_the_run_in_one_line():
    with pytest.raises(DivergenceError, match="personal copy diverged in phase 1 of ditto"):
        personal_run(Ditto(lam=1e4, epochs=3), rounds=2)
    with pytest.raises(ConfigError, match="ditto epochs must be >= 1, got 0"):
        Ditto(epochs=0)
