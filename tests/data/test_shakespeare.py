"""LEAF's Shakespeare: the parse, the examples and split, the download, and the natural partition."""

import dataclasses
import hashlib
import io
import re
import zipfile

import numpy as np
import pytest
import torch
from helpers import Served

from fedforge.config import Config
from fedforge.data import federate
from fedforge.data.partition import natural
from fedforge.data.shakespeare import (
    ALL_LETTERS,
    SHAKESPEARE,
    decode,
    encode,
    kept_roles,
    load_shakespeare,
    parse_roles,
    read_roles,
    role_texts,
    split_counts,
    split_into_plays,
    to_dataset,
)
from fedforge.errors import ConfigError, DataError
from fedforge.experiment import load

WORDS = (
    "my lord,",
    "the king",
    "is",
    "dead;",
    "and",
    "I",
    "would",
    "speak",
    "with",
    "you.",
    "What",
    "say'st",
    "thou?",
    "'Tis",
    "true:",
    "Fie!",
    "O",
    "villain",
    "heaven",
    "--",
    "[Aside]",
    "*",
)  # '*' is no LEAF symbol


def works(plays: dict[str, list[tuple[str, list[str]]]]) -> str:
    """Text in the layout of Gutenberg's 1994 Complete Works: a first line, the sonnets, then each
    play (year, title, "by William Shakespeare", a cast list, speeches "  NAME. line" continued by
    "    line"), plays separated by the World Library notice."""
    out = [
        "The Complete Works of William Shakespeare (a stand-in for the test)",
        "",
        "1609",
        "",
        "THE SONNETS",
        "",
        "by William Shakespeare",
        "",
        "",
        "",
        "                     1",
        "  From fairest creatures we desire increase,",
        "  That thereby beauty's rose might never die,",
        "",
        "",
    ]
    for title, speeches in plays.items():
        out += [
            "1600",
            "",
            title,
            "",
            "by William Shakespeare",
            "",
            "",
            "",
            "Dramatis Personae",
            "",
            "  Someone, a part.",
            "",
            "<<THIS ELECTRONIC VERSION IS A TEST>>",
            "",
            "ACT I. SCENE I.",
            "A room.",
            "",
            "Enter all.",
        ]
        for name, lines in speeches:
            out += [f"  {name}. {lines[0]}", *(f"    {line}" for line in lines[1:])]
        out += ["", "THE END", "", ""]
    return "\n".join(out) + "\n"


def random_play(rng: np.random.Generator, names: list[str], speeches: int) -> list[tuple[str, list[str]]]:
    def line():
        return " ".join(rng.choice(WORDS, size=rng.integers(3, 9)))

    return [(names[rng.integers(len(names))], [line() for _ in range(rng.integers(1, 4))]) for _ in range(speeches)]


@pytest.fixture
def text() -> str:
    rng = np.random.default_rng(0)
    return works(
        {
            "THE TRAGEDY OF KING LEAR": random_play(rng, ["LEAR", "KENT", "FOOL"], 60),
            "THE TEMPEST": random_play(rng, ["PROSPERO", "ARIEL", "MIRANDA", "CALIBAN"], 70),
            "A PLAY OF ONE ROLE": [("CHORUS", ["O for a muse of fire"])] * 5,
        }
    )


def test_plays_and_speeches_are_split_as_leaf_splits_them():
    text = works(
        {
            "THE FIRST PLAY": [
                ("ANNE", ["One two three."]),
                ("BOB", ["Four", "five  six."]),
                ("Anne", ["Seven."]),
                ("SIR TOBY", ["Eight."]),
                ("Sir Toby", ["Nine."]),
            ],
            "A PLAY OF ONE ROLE": [("SOLO", ["Alone."]), ("SOLO", ["Still alone."])],
        }
    )
    text += "\n".join(
        [
            "1592",
            "",
            "THE COMEDY OF ERRORS",
            "",
            "by William Shakespeare",
            "",
            "",
            "",
            "ACT I. SCENE 1.",
            "DUKE. Proceed, Solinus,",
            "to procure my fall,",
            "",
            "<<THIS ELECTRONIC VERSION IS A TEST>>",
            "ignored after the notice",
            "EGEON. Yet this.",
            "ACT II. SCENE 1.",
            "not Egeon's: ACT ends his speech",
            "",
        ]
    )
    plays = split_into_plays(text)
    # Speakers' names are upper-cased (LEAF's fix for SIR Toby / SIR TOBY); continuation lines are
    # their own entries; a play of one role is dropped; the stage direction "Enter all." is not a speech.
    assert [title for title, _ in plays] == ["THE FIRST PLAY", "THE COMEDY OF ERRORS"]
    assert dict(plays[0][1]) == {
        "ANNE": ["One two three.", "Seven."],
        "BOB": ["Four", "five  six."],
        "SIR TOBY": ["Eight.", "Nine."],
    }
    # The Comedy of Errors is unindented: any line continues a speech up to a '<' line or an ACT.
    assert dict(plays[1][1]) == {"DUKE": ["Proceed, Solinus,", "to procure my fall,", ""], "EGEON": ["Yet this."]}


def test_a_play_without_a_title_is_refused_with_its_line():
    text = "first line\n\nTHE SONNETS\n\nby William Shakespeare\n" + "\n" * 9 + "by William Shakespeare\n"
    with pytest.raises(DataError, match=r"^line 15: no play title 2 to 7 lines above 'by William Shakespeare'$"):
        split_into_plays(text)


def test_role_texts_keep_roles_of_three_lines_and_squeeze_spaces():
    plays = [
        ("KING LEAR, A PLAY", {"LEAR": ["Blow, winds,", "and  crack", "your cheeks!"], "FOOL": ["Nuncle", "O"]}),
        ("THE TEMPEST", {"LEAR": ["a", "b", "c"]}),
    ]
    assert role_texts(plays) == {
        "KING_LEAR__A_PLAY_LEAR": "Blow, winds, and crack your cheeks! ",
        "THE_TEMPEST_LEAR": "a b c ",
    }


def test_symbols_are_leafs_and_unknown_characters_the_last():
    assert len(ALL_LETTERS) == 80 and ALL_LETTERS[0] == "\n" and ALL_LETTERS[-1] == "}"
    ids = encode("Ay\n}*é")
    assert ids.tolist() == [ALL_LETTERS.index("A"), ALL_LETTERS.index("y"), 0, 79, 79, 79]
    assert ids.dtype == np.uint8 and decode(encode("To be, or not")) == "To be, or not"


@pytest.mark.parametrize(
    "n, expected", [(0, (0, 0)), (1, (1, 1)), (2, (1, 80)), (3, (2, 81)), (500, (400, 479)), (99, (79, 158))]
)
def test_split_counts_are_leafs(n, expected):
    assert split_counts(n) == expected


def leaf_reference(role_text: str, fraction: float = 0.8):
    """LEAF's shake_utils.__txt_to_data and split_data.py (-t sample, shakespeare), as written there."""
    x = [role_text[i : i + 80] for i in range(len(role_text) - 80)]
    y = [role_text[i + 80] for i in range(len(role_text) - 80)]
    n = len(y)
    if n < 2:
        return None
    num_train = 1 if n == 2 else max(1, int(fraction * n))
    train, test = range(num_train), range(num_train + 80 - 1, n)
    if not train or not test:
        return None
    return [(x[j], y[j]) for j in train], [(x[j], y[j]) for j in test]


def test_examples_and_split_equal_leafs(text):
    texts = role_texts(split_into_plays(text))
    roles = parse_roles(text)
    dataset = to_dataset(roles)
    expected = {name: leaf_reference(t) for name, t in texts.items()}
    expected = {name: v for name, v in expected.items() if v is not None}
    assert kept_roles(roles) == list(expected) and len(expected) >= 5
    assert not any(name.startswith("A_PLAY_OF_ONE_ROLE") for name in roles)
    train = [(decode(x), decode(y[-1:])) for x, y in zip(dataset.train.x, dataset.train.y, strict=True)]
    test = [(decode(x), decode(y[-1:])) for x, y in zip(dataset.test.x, dataset.test.y, strict=True)]

    def symbols(pairs):  # LEAF's symbols: '*' is '}'
        return [(decode(encode(x)), decode(encode(y))) for x, y in pairs]

    assert train == symbols(pair for tr, _ in expected.values() for pair in tr)
    assert test == symbols(pair for _, te in expected.values() for pair in te)
    assert "}" in "".join(x for x, _ in train)
    # y is x moved on by one: every position predicts the next character.
    torch.testing.assert_close(dataset.train.y[:, :-1], dataset.train.x[:, 1:].long())
    assert (dataset.train.x.dtype, dataset.train.y.dtype, dataset.num_classes) == (torch.int32, torch.int64, 80)
    assert dataset.input_shape == (80,)
    sizes = [len(tr) for tr, _ in expected.values()]
    assert dataset.groups.tolist() == np.repeat(np.arange(len(sizes)), sizes).tolist()


def test_natural_partition_gives_each_role_its_examples(text):
    dataset = to_dataset(parse_roles(text))
    num_roles = int(dataset.groups.max()) + 1
    parts = natural(dataset.groups, num_roles)
    assert [len(p) for p in parts] == np.bincount(dataset.groups).tolist()
    for role, part in enumerate(parts):
        assert (dataset.groups[part] == role).all()
        # A role's training windows are consecutive: each starts one character after the one before.
        torch.testing.assert_close(dataset.train.x[part[1:], :-1], dataset.train.x[part[:-1], 1:])


def zipped(text: str, member: str = "100.txt") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, text)
    return buffer.getvalue()


def served_spec(file_server, data: bytes, md5: str | None = None):
    file_server.files["/gutenberg/1994-01-100.zip"] = Served(data)
    return dataclasses.replace(
        SHAKESPEARE,
        md5=md5 or hashlib.md5(data).hexdigest(),
        mirrors=(file_server.url + "/missing/", file_server.url + "/gutenberg/"),
    )


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FEDFORGE_DATA", raising=False)


def test_downloaded_with_its_checksum_parsed_cached_and_partitioned(tmp_path, file_server, home, text):
    spec = served_spec(file_server, zipped(text))
    dataset = load_shakespeare(tmp_path / "data", spec=spec, progress=False)
    assert (tmp_path / "data" / "shakespeare" / "1994-01-100.zip").is_file()
    assert file_server.requests == ["/missing/1994-01-100.zip", "/gutenberg/1994-01-100.zip"]
    expected = to_dataset(parse_roles(text))
    torch.testing.assert_close(dataset.train.x, expected.train.x)
    torch.testing.assert_close(dataset.test.y, expected.test.y)
    # Found on disk the second time, and the roles come from the cache.
    cached = read_roles(tmp_path / "data" / "shakespeare" / "1994-01-100.zip")
    assert list(cached) == list(parse_roles(text))
    again = load_shakespeare(tmp_path / "data", spec=spec, download=False, progress=False)
    torch.testing.assert_close(again.train.y, dataset.train.y)
    assert len(file_server.requests) == 2
    # Through the config: the natural partition, one client per role.
    roles = int(dataset.groups.max()) + 1
    config = Config(
        dataset="shakespeare",
        data_dir=str(tmp_path / "data"),
        download=False,
        task="language-model",
        model="char-lstm",
        partition="natural",
        num_clients=roles,
        clients_per_round=2,
    )
    loaded, data = load(config, progress=False)
    assert data.num_clients == roles and sum(map(len, data.partition)) == len(loaded.train)
    with pytest.raises(ConfigError, match=f"num_clients must be {roles}, the number of groups in the data, got 3"):
        federate(loaded, config.replace(num_clients=3).data_split(), seed=config.seed)
    with pytest.raises(ConfigError, match="partition dirichlet splits by label"):
        federate(loaded, config.replace(partition="dirichlet").data_split(), seed=config.seed)


def test_the_text_found_on_disk_is_used_without_download(tmp_path, file_server, home, text):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "raw_data.txt").write_text(text)  # as LEAF's get_data.sh leaves it
    spec = served_spec(file_server, b"never fetched")
    dataset = load_shakespeare(tmp_path / "data", spec=spec, progress=False)
    assert file_server.requests == [] and len(dataset.train) == len(to_dataset(parse_roles(text)).train)


def test_a_checksum_mismatch_is_refused_and_leaves_no_file(tmp_path, file_server, home, text):
    spec = served_spec(file_server, zipped(text), md5="0" * 32)
    with pytest.raises(DataError, match="checksum mismatch") as error:
        load_shakespeare(tmp_path / "data", spec=spec, progress=False)
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "data" / "shakespeare").iterdir())


@pytest.mark.parametrize(
    "data, message",
    [
        (b"PK\x03\x04 not really a zip", "not a zip archive"),
        (zipped("This is no play.\nNo one speaks here.\n" * 50), "no play with a role of more than 80 characters"),
        (zipped("\0\1\2binary" * 10), "binary data"),
    ],
)
def test_a_file_not_in_the_expected_format_is_refused_in_one_line(tmp_path, file_server, home, data, message):
    spec = served_spec(file_server, data)
    with pytest.raises(DataError, match=message) as error:
        load_shakespeare(tmp_path / "data", spec=spec, progress=False)
    assert "\n" not in str(error.value) and "1994-01-100.zip" in str(error.value)


def test_an_archive_without_one_text_and_non_utf8_text_are_refused(tmp_path, home):
    (tmp_path / "data").mkdir()
    two = io.BytesIO()
    with zipfile.ZipFile(two, "w") as archive:
        archive.writestr("100.txt", "a")
        archive.writestr("101.txt", "b")
    (tmp_path / "data" / "1994-01-100.zip").write_bytes(two.getvalue())
    with pytest.raises(DataError, match=re.escape("expected one .txt file in the archive, found 2")):
        load_shakespeare(tmp_path / "data", download=False)
    (tmp_path / "data" / "1994-01-100.zip").unlink()
    (tmp_path / "data" / "100.txt").write_bytes(b"caf\xe9 in latin-1")
    with pytest.raises(DataError, match="not UTF-8 text"):
        load_shakespeare(tmp_path / "data", download=False)


def test_not_found_and_no_download_names_the_places_and_the_file(tmp_path, home):
    with pytest.raises(
        DataError, match=r"LEAF's Shakespeare .* not found in .*; download https://.*1994-01-100.zip into one of them"
    ) as error:
        load_shakespeare(tmp_path, download=False)
    assert str(tmp_path / "shakespeare") in str(error.value) and "\n" not in str(error.value)


def test_roles_too_short_for_a_test_example_are_refused():
    roles = parse_roles(
        works(
            {
                "THE PLAY": [
                    ("ANNE", ["To be, or not to be: that is the question."]),
                    ("BOB", ["Whether 'tis nobler in the mind to suffer"]),
                ]
                * 3
            }
        )
    )
    with pytest.raises(DataError, match=r"no role keeps a test example .* about 475 characters"):
        to_dataset(roles)
    with pytest.raises(ConfigError, match=r"train_fraction must be in \(0, 1\), got 1.0"):
        to_dataset(roles, train_fraction=1.0)


def test_no_natural_partition_without_groups(text):
    dataset = dataclasses.replace(to_dataset(parse_roles(text)), groups=None)
    config = Config(
        dataset="shakespeare", task="language-model", partition="natural", num_clients=5, clients_per_round=2
    )
    with pytest.raises(ConfigError, match="dataset shakespeare has no natural partition"):
        federate(dataset, config.data_split(), seed=config.seed)


def test_shakespeare_needs_the_language_model_task():
    with pytest.raises(
        ConfigError,
        match="dataset shakespeare is next-character prediction: it needs task language-model, got 'classification'",
    ):
        Config(dataset="shakespeare")
