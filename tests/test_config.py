import pytest

from fedforge.config import Config
from fedforge.errors import ConfigError


def test_defaults_are_the_tutorial():
    c = Config()
    assert (c.dataset, c.num_clients, c.partition, c.model, c.rounds, c.clients_per_round) == (
        "mnist",
        10,
        "iid",
        "mlp",
        5,
        5,
    )
    assert (c.local_epochs, c.batch_size, c.lr, c.momentum, c.strategy) == (1, 32, 0.01, 0.0, "fedavg")


def test_file_then_overrides(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('dataset = "fashion-mnist"\nrounds = 30\nlr = 1\n')
    c = Config.load(path, {"rounds": 3})
    assert (c.dataset, c.rounds, c.lr) == ("fashion-mnist", 3, 1.0)
    assert isinstance(c.lr, float)


def test_resolved_config_round_trips(tmp_path):
    c = Config(dataset="fashion-mnist", clients_per_round=0.5, name="x")
    (tmp_path / "c.toml").write_text(c.to_toml())
    assert Config.load(tmp_path / "c.toml") == c


@pytest.mark.parametrize(
    "text, message",
    [
        ("rounds = ", "malformed TOML"),
        ("lerning_rate = 0.1", "unknown key 'lerning_rate'"),
        ("lrr = 0.1", "did you mean 'lr'"),
        ('rounds = "five"', "rounds must be int, got 'five'"),
        ("download = 1", "download must be bool"),
        ("lr = true", "lr must be float or int"),
        ("[data]\nrounds = 3", r"unknown key 'rounds' in \[data\]"),
        ("[dat]\nnum_clients = 3", r"unknown table \[dat\]; did you mean 'data'"),
        ("[strategy]\nname = 'fedprox'\nmu = 0.5", r"unknown key 'mu' in \[strategy\]; did you mean 'proximal_mu'"),
        ("rounds = 3\n[run]\nrounds = 4", "rounds is given twice"),
    ],
)
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "exp.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        Config.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Config.load(tmp_path / "nope.toml")


def test_cross_field_check_sees_the_merged_values(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text("num_clients = 3\n")
    assert Config.load(path, {"clients_per_round": 2}).clients_per_round == 2
    with pytest.raises(ConfigError, match="between 1 and num_clients=3, got 5"):
        Config.load(path)


@pytest.mark.parametrize(
    "text, size",
    [("1GiB", 2**30), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1.5 KiB", 1536), ("4096", 4096), ("auto", None)],
)
def test_sizes(text, size):
    assert Config(max_memory=text).max_memory_bytes() == size
