"""Settings by owner: unknown options named with the close one, nested TOML tables, a strategy of one's own."""

from pathlib import Path

import pytest
from own_strategy import notes, write_strategy

from fedforge.cli import main
from fedforge.client import ClientSettings
from fedforge.config import Config
from fedforge.data.settings import DataSettings
from fedforge.errors import ConfigError
from fedforge.strategies import FedProx, make_strategy
from fedforge.strategies.settings import StrategySettings

SMALL = ["--dataset", "digits", "--model", "logreg", "--num-clients", "4", "--clients-per-round", "2", "--rounds", "2"]


def fedforge(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own exit
        code = e.code
    return code, capsys.readouterr().err


def test_an_unknown_strategy_option_names_the_close_one():
    with pytest.raises(ConfigError, match=r"strategy 'fedprox' has no option 'mu'; did you mean 'proximal_mu'\?"):
        make_strategy("fedprox", mu=0.5)
    with pytest.raises(ConfigError, match="strategy 'fedavg' has no option 'proximal_mu'"):
        make_strategy("fedavg", proximal_mu=0.5)
    assert make_strategy("fedprox", proximal_mu=0.5) == FedProx(proximal_mu=0.5)


@pytest.mark.parametrize("command", ["run", "compare", "server"])
def test_an_unknown_flag_names_the_close_one(capsys, command):
    code, err = fedforge(capsys, command, "--strategy", "fedprox", "--mu", "0.5")
    assert code == 2
    assert err.strip().endswith("unrecognized arguments: --mu 0.5; did you mean --proximal-mu?")


def test_a_flag_is_never_read_as_the_start_of_another(capsys):
    code, err = fedforge(capsys, "run", "--multikrum", "3")  # once --multikrum-m
    assert code == 2 and "unrecognized arguments: --multikrum 3; did you mean --multikrum-m?" in err


def test_each_group_checks_its_own_settings():
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        DataSettings(alpha=0)
    with pytest.raises(ConfigError, match="unknown optimizer 'sgdd'"):
        ClientSettings(optimizer="sgdd")
    with pytest.raises(ConfigError, match="unknown strategy 'fedprx'"):
        StrategySettings(strategy="fedprx")
    config = Config(strategy="fedprox", proximal_mu=0.3, lr=0.2)
    assert config.group(StrategySettings).strategy_object() == FedProx(proximal_mu=0.3)
    assert config.group(ClientSettings).lr == 0.2


def test_nested_tables_and_flat_keys_give_the_same_config(tmp_path):
    nested = tmp_path / "nested.toml"
    nested.write_text(
        "rounds = 3\n"
        "[data]\nnum_clients = 20\npartition = 'dirichlet'\n"
        "[client]\nlr = 0.05\n"
        "[strategy]\nname = 'fedprox'\nproximal_mu = 0.5\n"
        "[privacy]\ndp = 'client'\nnoise_multiplier = 1.0\n"
        "[engine]\nengine = 'sequential'\n"
    )
    flat = tmp_path / "flat.toml"
    flat.write_text(
        "rounds = 3\nnum_clients = 20\npartition = 'dirichlet'\nlr = 0.05\nstrategy = 'fedprox'\nproximal_mu = 0.5\n"
        "dp = 'client'\nnoise_multiplier = 1.0\nengine = 'sequential'\n"
    )
    config = Config.load(nested)
    assert config == Config.load(flat)
    assert config.strategy_object() == FedProx(proximal_mu=0.5) and config.privacy().noise_multiplier == 1.0


def test_a_strategy_of_ones_own_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    name = write_strategy(tmp_path, "own_strategy_run")
    code, err = fedforge(capsys, "run", "-q", *SMALL, "--strategy", name, "--server-lr", "0.5", "--out-dir", "runs")
    assert code == 0, err
    assert notes(tmp_path) == ["0.5", "0.5"]  # built with the option it declares, one step a round
    assert [p.name.startswith("digits-logreg-own_strategy_run_Noted-") for p in (tmp_path / "runs").iterdir()] == [True]


def test_a_strategy_of_ones_own_in_a_comparison(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    name = write_strategy(tmp_path, "own_strategy_compare")
    code, err = fedforge(capsys, "compare", *SMALL, "--strategies", "fedavg", name, "--name", "c", "--out-dir", "runs")
    assert code == 0, err
    assert notes(tmp_path) == ["1.0", "1.0"]
    assert (tmp_path / "runs" / "c" / "own_strategy_compare_Noted" / "history.json").exists()
    assert "own_strategy_compare_Noted" in (tmp_path / "runs" / "c" / "comparison.md").read_text()


@pytest.mark.parametrize(
    "option, message",
    [
        ("'no_such_module:Noted'", "cannot import strategy 'no_such_module:Noted'"),
        ("'own_strategy_bad:Nothing'", "own_strategy_bad has no 'Nothing'"),
        ("'own_strategy_bad:Noted'\nserver_l = 1", r"has no option 'server_l'; did you mean 'server_lr'"),
    ],
)
def test_a_strategy_of_ones_own_that_cannot_be_used_is_one_line(tmp_path, monkeypatch, option, message):
    monkeypatch.chdir(tmp_path)
    write_strategy(tmp_path, "own_strategy_bad")
    (tmp_path / "exp.toml").write_text(f"[strategy]\nname = {option}\n")
    with pytest.raises(ConfigError, match=message):
        Config.load(tmp_path / "exp.toml")


@pytest.mark.parametrize(
    "command, text, message",
    [
        ("server", "[server]\ntokens = 't.json'\nsecagg_treshold = 2", "did you mean 'secagg_threshold'"),
        ("server", "[server]\ntokens = 't.json'\ntls_cert = 'c.pem'", "give both --tls-cert and --tls-key"),
        ("server", "[server]\ntokens = 't.json'\ninsecure = 'yes'", "insecure must be bool"),
        ("server", "[sever]\ntokens = 't.json'", "unknown table [sever]; did you mean 'server'"),
        ("server", "[server]\ninsecure = true", "give --tokens FILE"),
        ("server", "adress = '127.0.0.1:0'", "unknown key 'adress'; did you mean 'address'?"),
        ("client", "[node]\nsever = 'x:1'", "unknown key 'sever' in [node]; did you mean 'server'"),
        ("client", "[client]\nsever = 'x:1'", "unknown key 'sever' in [client]; did you mean 'server'"),  # as before
        ("client", "server = 'x:1'\nclient_id = 1\ntoken_file = 't'\ninsecure = true", "give one of --app"),
        ("client", "[node]\nserver = 'x:1'\nclient_id = 1\ntoken_file = 't'", "give --root-cert"),
    ],
)
def test_deployment_config_files_are_checked_key_by_key(tmp_path, monkeypatch, capsys, command, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.toml").write_text(text)
    code, err = fedforge(capsys, command, "--config", "f.toml")
    assert code == 2 and message in err, err


def test_flags_override_the_deployment_config_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.toml").write_text("[server]\ntokens = 'f.json'\n")
    code, err = fedforge(capsys, "server", "--config", "f.toml", "--insecure", "--tokens", "flag.json")
    assert code == 2 and "token file flag.json not found" in err, err  # past the TLS check, the flag's tokens


EXAMPLES = Path(__file__).parent.parent / "examples"


def test_the_example_deployment_files_are_read_whole(tmp_path, monkeypatch, capsys):
    """Each key of examples/server.toml and examples/client.toml is known and valid: the commands
    get as far as reading the files they name."""
    monkeypatch.chdir(tmp_path)
    code, err = fedforge(capsys, "server", "--config", str(EXAMPLES / "server.toml"))
    assert code == 2 and "cannot read certs/server.key" in err, err
    code, err = fedforge(capsys, "client", "--config", str(EXAMPLES / "client.toml"))
    assert code == 2 and "token file client-0.token not found" in err, err


@pytest.mark.parametrize(
    "argv, toml",
    [
        (["--strategy", "fedavg", "--proximal-mu", "0.5"], None),
        ([], "[strategy]\nname = 'fedavg'\nproximal_mu = 0.5\n"),
        (["--strategy", "fedavg"], "proximal_mu = 0.5\n"),
    ],
)
@pytest.mark.parametrize("command", ["run", "server"])
def test_an_option_the_strategy_does_not_take_is_refused(tmp_path, capsys, command, argv, toml):
    if toml is not None:
        (tmp_path / "exp.toml").write_text(toml)
        argv = [*argv, "--config", str(tmp_path / "exp.toml")]
    code, err = fedforge(capsys, command, *argv, "--out-dir", str(tmp_path))
    assert code == 2
    assert "proximal_mu is an option of fedprox, not of fedavg" in err


HALF = """
from dataclasses import dataclass

from fedforge.strategies import FedAvg


@dataclass(frozen=True)
class Half(FedAvg):
    fraction: float = 0.5
"""


def _half(tmp_path, monkeypatch, module: str) -> str:
    import sys

    (tmp_path / f"{module}.py").write_text(HALF)
    sys.modules.pop(module, None)
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{module}:Half"


def test_a_strategy_of_ones_own_takes_its_options_from_the_file_and_the_flags(tmp_path, monkeypatch):
    name = _half(tmp_path, monkeypatch, "own_half_options")
    (tmp_path / "exp.toml").write_text(f"[strategy]\nname = '{name}'\nfraction = 0.25\n")
    assert Config.load(tmp_path / "exp.toml").strategy_object().fraction == 0.25
    (tmp_path / "bare.toml").write_text("[strategy]\nfraction = 0.125\n")  # the strategy named by a flag
    config = Config.load(tmp_path / "bare.toml", {"strategy": name})
    assert config.strategy_object().fraction == 0.125
    assert Config.from_dict({"strategy": name, "strategy_option": ["fraction=0.75"]}).strategy_object().fraction == 0.75
    (tmp_path / "typo.toml").write_text(f"[strategy]\nname = '{name}'\nfractoin = 0.25\n")
    with pytest.raises(ConfigError, match="has no option 'fractoin'; did you mean 'fraction'"):
        Config.load(tmp_path / "typo.toml")


def test_strategy_option_is_a_repeatable_flag(tmp_path, monkeypatch, capsys):
    from fedforge.cli import build_parser

    name = _half(tmp_path, monkeypatch, "own_half_flag")
    for command in ("run", "compare", "server"):
        args = build_parser().parse_args(
            [command, "--strategy", name, "--strategy-option", "fraction=0.25", "--strategy-option", "x='a'"]
        )
        assert args.strategy_option == ["fraction=0.25", "x='a'"]
    monkeypatch.chdir(tmp_path)
    code, err = fedforge(capsys, "run", "-q", *SMALL, "--strategy", name, "--strategy-option", "fraction=0.25")
    assert code == 0, err
    run_dir = next((tmp_path / "runs").iterdir())
    assert Config.load(run_dir / "config.toml").strategy_object().fraction == 0.25
    code, err = fedforge(capsys, "run", "-q", "--resume", str(run_dir), "--rounds", "3")  # the checkpoint holds it
    assert code == 0, err


def test_a_comparison_shares_a_strategy_option_with_the_runs_that_take_it(tmp_path, monkeypatch, capsys):
    name = _half(tmp_path, monkeypatch, "own_half_compare")
    monkeypatch.chdir(tmp_path)
    shared = [*SMALL, "--strategies", "fedavg", name, "--out-dir", "runs", "-q"]
    code, err = fedforge(capsys, "compare", *shared, "--strategy-option", "fractoin=0.25", "--name", "typo")
    assert code == 2 and "strategy_option fractoin: no run's strategy takes it" in err
    code, err = fedforge(capsys, "compare", *shared, "--strategy-option", "fraction=0.25", "--name", "c")
    assert code == 0, err
    saved = Config.load(tmp_path / "runs" / "c" / "own_half_compare_Half" / "config.toml")
    assert saved.strategy_object().fraction == 0.25
    assert Config.load(tmp_path / "runs" / "c" / "fedavg" / "config.toml").strategy_option == ()


def test_the_checkpoint_key_file_and_quiet_are_keys_of_a_config_file(tmp_path, capsys):
    (tmp_path / "key").write_text("k" * 32)
    (tmp_path / "exp.toml").write_text(f"[run]\nquiet = true\ncheckpoint_key_file = '{tmp_path / 'key'}'\n")
    assert Config.load(tmp_path / "exp.toml").quiet
    code, err = fedforge(capsys, "run", *SMALL, "--config", str(tmp_path / "exp.toml"), "--out-dir", str(tmp_path))
    assert code == 0, err
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert (run_dir / "checkpoint.pt").read_bytes().startswith(b"fedforge checkpoint 2 hmac\n")
    saved = (run_dir / "config.toml").read_text()  # one who resumes gives the key again
    assert "\ncheckpoint_key_file =" not in saved and "\nquiet =" not in saved
    code, err = fedforge(capsys, "run", "--resume", str(run_dir), "--rounds", "3")
    assert code == 2 and "is signed with a key: give its --checkpoint-key-file" in err


@pytest.mark.parametrize("command", ["run", "compare", "server"])
def test_the_tracking_flags_come_from_the_tracking_settings(command):
    import dataclasses

    from fedforge.cli import build_parser
    from fedforge.tracking import TrackingSettings

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    actions = {a.dest: a for a in sub._actions}
    for f in dataclasses.fields(TrackingSettings):
        assert actions[f.name].help == f.metadata["help"].replace("%", "%%")
    args = parser.parse_args([command, "--mlflow", "--tensorboard", "tb"])
    assert (args.mlflow, args.tensorboard) == ("default", "tb")
