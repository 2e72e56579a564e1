"""LEAF's Shakespeare: next-character prediction, one client per speaking role of a play.

The data and every preprocessing rule are LEAF's (Caldas et al. 2018, "LEAF: A Benchmark for
Federated Settings"; github.com/TalwalkarLab/leaf, data/shakespeare/ and data/utils/), which
follow McMahan et al. 2017:

- Source: Project Gutenberg's 1994 plain-text Complete Works (eBook #100), `1994-01-100.zip`
  holding `100.txt` (LEAF's `get_data.sh` renames it `raw_data.txt`). Its MD5,
  b8d60664a90939fa7b5d9f4dd064a1d5, is the one pinned by vaseline555/Federated-Learning-in-PyTorch
  (src/datasets/leaf/leaf_utils.py) and orion-orion/FedCom (custom_ds/shakespeare.py).
- Plays (`preprocess_shakespeare.py`): the first line is dropped; parsing starts 5 lines above
  the second "by William Shakespeare" (skipping the sonnets) and stops after line 124195 (the
  end of the plays in the real file); each later "by William Shakespeare" starts a play whose
  title is the first non-blank line 2 to 7 lines above. A speech is a line `  NAME. text` (two
  spaces; the name letters and spaces, upper-cased), continued by lines indented four spaces;
  in THE COMEDY OF ERRORS, whose indentation is off, `NAME. text` unindented, continued by any
  line up to one starting with "<", and "ACT ..." is no speaker. Plays with one role are dropped.
- Roles (`_get_train_test_by_character`, `shake_utils.py`): a role of two lines or fewer (a
  speech's first line and each continuation line count one) is dropped; a role is named
  `PLAY_NAME` with every run of non-word characters made "_" (roles whose names coincide are one
  client, as in LEAF). Its text is its lines joined by newlines, then each newline made a space
  and each run of spaces one space. Every 80 consecutive characters are an example and the
  character after them its label (a role shorter than 81 characters has none).
- Train/test (`split_data.py`, `-t sample --tf 0.8`): a role's first int(0.8 n) of its n
  examples (at least one) train; its test examples start 79 after the last training one, so
  that no test window overlaps a training window (the first starts at the last training
  label). A role left with no test example is dropped.
- Symbols: LEAF's 80 (`ALL_LETTERS`, models/utils/language_utils.py). Any other character is
  symbol 79, '}': LEAF's `ALL_LETTERS.find` gives -1 for it, which its one-hot labels
  (`letter_to_vec`) make the last symbol.

For fedforge's `language-model` task an example is x, its 80 symbol ids (int32: `nn.Embedding`
takes int32 indices), and y, the next symbol at each of the 80 positions (x[1:] then the label;
int64, as cross-entropy wants), so every position is scored where LEAF's model scores the last.
`Dataset.groups` gives each training example's role, the clients of the `natural` partition.

Memory: 80 * (4 + 8) = 960 bytes per example. LEAF reports 4,226,158 examples in all for the
full text (its paper, table 1), so train and test together hold at most 4.06 GB (5.41 GB were x
int64); a run also gathers the clients' training examples into one copy of about 0.8 of that.
The parsed roles (a few MB) are cached beside MNIST's decoded arrays, so a second load skips
the parse.
"""

from __future__ import annotations

import collections
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write
from ..errors import ConfigError, DataError
from .datasets import Dataset, TensorData, _cache_path, search_dirs
from .download import download

ALL_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
VOCAB_SIZE = len(ALL_LETTERS)  # 80
UNKNOWN = VOCAB_SIZE - 1  # where LEAF's -1 lands: '}'
SEQ_LEN = 80
TRAIN_FRACTION = 0.8
MAX_TEXT_BYTES = 64 << 20  # the real text is about 5.5 MB: anything far larger is not it

_AUTHOR = "by William Shakespeare"
_END_OF_PLAYS = 124195  # LEAF's: the last line of the plays in the real file (counted without its first line)
_SPEECH = re.compile(r"^  ([a-zA-Z][a-zA-Z ]*)\. (.*)")
_CONTINUED = re.compile(r"^    (.*)")
_COE_SPEECH = re.compile(r"^([a-zA-Z][a-zA-Z ]*)\. (.*)")
_COE_CONTINUED = re.compile(r"^(.*)")
_SYMBOL = np.full(128, UNKNOWN, dtype=np.uint8)
_SYMBOL[[ord(c) for c in ALL_LETTERS]] = np.arange(VOCAB_SIZE, dtype=np.uint8)
_CACHE_VERSION = 1  # bump when the parse changes: old caches are then ignored


@dataclass(frozen=True)
class TextSpec:
    """Where the raw text comes from: one archive with a published MD5, its mirrors, and the
    names under which its text may already be on disk."""

    name: str
    title: str
    filename: str
    md5: str
    mirrors: tuple[str, ...]
    text_names: tuple[str, ...] = ()


SHAKESPEARE = TextSpec(
    name="shakespeare",
    title="LEAF's Shakespeare (Project Gutenberg's 1994 Complete Works)",
    filename="1994-01-100.zip",
    md5="b8d60664a90939fa7b5d9f4dd064a1d5",
    mirrors=(
        "https://www.gutenberg.org/files/100/old/old/",  # where the file moved (LEAF issue 67)
        "https://www.gutenberg.org/files/100/old/",  # LEAF's get_data.sh
        "https://readingroo.ms/1/0/100/old/old/",
        "https://mirror.ossplanet.net/mirror/gutenberg/1/0/100/old/",
    ),
    text_names=("100.txt", "raw_data.txt"),  # unzipped, and as LEAF renames it
)


def split_into_plays(text: str) -> list[tuple[str, dict[str, list[str]]]]:
    """The plays of the Complete Works as (title, {ROLE: [speech lines]}), by LEAF's rules (see the
    module docstring); a role's lines in the order spoken.

    Raises:
        DataError: a play whose title is not 2 to 7 lines above "by William Shakespeare".
    """
    lines = text.splitlines(True)[1:]
    start, seen = 0, 0
    for i, line in enumerate(lines):
        if _AUTHOR in line:
            seen += 1
            if seen == 2:
                start = max(i - 5, 0)
                break
    lines = lines[start:]
    plays: list[tuple[str, dict[str, list[str]]]] = []
    roles: dict[str, list[str]] | None = None
    current, comedy_of_errors = None, False
    for i, line in enumerate(lines):
        if i > _END_OF_PLAYS - start:
            break
        if _AUTHOR in line:
            title = next((lines[j].strip() for j in range(i - 2, i - 8, -1) if j >= 0 and lines[j].strip()), "")
            if not title:
                raise DataError(f"line {start + i + 2}: no play title 2 to 7 lines above {_AUTHOR!r}")
            roles, current = collections.defaultdict(list), None
            comedy_of_errors = title == "THE COMEDY OF ERRORS"
            plays.append((title, roles))
            continue
        if roles is None:
            continue
        match = (_COE_SPEECH if comedy_of_errors else _SPEECH).match(line)
        if match:
            role = match.group(1).upper()  # LEAF's fix for names spelt in two casings (SIR Toby, SIR TOBY)
            if comedy_of_errors and role.startswith("ACT "):
                current = None
            else:
                roles[role].append(match.group(2))
                current = role
            continue
        if current:
            match = (_COE_CONTINUED if comedy_of_errors else _CONTINUED).match(line)
            if match:
                if comedy_of_errors and match.group(1).startswith("<"):
                    current = None
                else:
                    roles[current].append(match.group(1))
    return [play for play in plays if len(play[1]) > 1]


def role_name(play: str, role: str) -> str:
    """LEAF's client name of `role` in `play`: THE_TRAGEDY_OF_HAMLET__PRINCE_OF_DENMARK_HAMLET (the
    comma after HAMLET made "_" too)."""
    return re.sub(r"\W+", "_", (play + "_" + role).replace(" ", "_"))


def role_texts(plays: list[tuple[str, dict[str, list[str]]]]) -> dict[str, str]:
    """Each role's text as LEAF's examples are cut from it, in order of the roles' first speech;
    roles of two lines or fewer are left out."""
    speeches: dict[str, list[str]] = collections.defaultdict(list)
    for play, roles in plays:
        for role, lines in roles.items():
            if len(lines) > 2:
                speeches[role_name(play, role)].extend(lines)
    # LEAF writes a role's lines to a file, reads it back and makes its newlines spaces.
    return {
        name: re.sub(" {2,}", " ", ("\n".join(lines) + "\n").replace("\n", " ")) for name, lines in speeches.items()
    }


def encode(text: str) -> np.ndarray:
    """The symbol ids (uint8, < 80) of `text`'s characters; a character outside LEAF's 80 is 79."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    return np.where(codes < 128, _SYMBOL[np.minimum(codes, 127)], UNKNOWN).astype(np.uint8)


def decode(ids) -> str:
    """The text of symbol ids (the inverse of `encode` on LEAF's 80 characters)."""
    return "".join(ALL_LETTERS[int(i)] for i in np.asarray(ids).reshape(-1))


def parse_roles(text: str) -> dict[str, np.ndarray]:
    """The Complete Works' text -> each role's symbol ids (uint8), for the roles with at least one
    example (more than 80 characters), in order of first speech.

    Raises:
        DataError: the text holds no play with a role of more than 80 characters (it is not the
            Gutenberg file's layout).
    """
    roles = {name: encode(t) for name, t in role_texts(split_into_plays(text)).items() if len(t) > SEQ_LEN}
    if not roles:
        raise DataError(
            f"no play with a role of more than {SEQ_LEN} characters (a play starts at a line "
            f"{_AUTHOR!r}, a speech is a line '  NAME. text')"
        )
    return roles


def split_counts(num_examples: int, train_fraction: float = TRAIN_FRACTION) -> tuple[int, int]:
    """LEAF's split of a role's `num_examples` windows: (number that train, first that tests).

    The role has test examples when the second is below `num_examples`.
    """
    if num_examples < 2:
        return num_examples, num_examples
    train = 1 if num_examples == 2 else max(1, int(train_fraction * num_examples))
    return train, train + SEQ_LEN - 1


def kept_roles(roles: Mapping[str, np.ndarray], train_fraction: float = TRAIN_FRACTION) -> list[str]:
    """The roles that keep both training and test examples: client g of `to_dataset` is the g-th."""
    return [
        name for name, ids in roles.items() if split_counts(len(ids) - SEQ_LEN, train_fraction)[1] < len(ids) - SEQ_LEN
    ]


def to_dataset(
    roles: Mapping[str, np.ndarray], *, train_fraction: float = TRAIN_FRACTION, name: str = "shakespeare"
) -> Dataset:
    """LEAF's examples and train/test split of each role's symbol ids, as a language-model Dataset.

    x: (N, 80) int32 symbol ids; y: (N, 80) int64, the symbol after each of x's; `groups`: each
    training example's role, an index into `kept_roles(roles, train_fraction)`.
    """
    if not 0 < train_fraction < 1:
        raise ConfigError(f"train_fraction must be in (0, 1), got {train_fraction}")
    kept = kept_roles(roles, train_fraction)
    if not kept:
        need = int((SEQ_LEN - 1) / (1 - train_fraction)) + SEQ_LEN
        raise DataError(
            f"{name}: no role keeps a test example (with train_fraction {train_fraction} a role needs "
            f"about {need} characters)"
        )
    counts = [split_counts(len(roles[r]) - SEQ_LEN, train_fraction) for r in kept]
    num_train = sum(train for train, _ in counts)
    num_test = sum(len(roles[r]) - SEQ_LEN - first for r, (_, first) in zip(kept, counts, strict=True))
    x_train, y_train = np.empty((num_train, SEQ_LEN), np.int32), np.empty((num_train, SEQ_LEN), np.int64)
    x_test, y_test = np.empty((num_test, SEQ_LEN), np.int32), np.empty((num_test, SEQ_LEN), np.int64)
    a = b = 0
    for r, (train, first) in zip(kept, counts, strict=True):
        # Row j of the windows is characters j..j+79: x is window j, y window j + 1.
        windows = np.lib.stride_tricks.sliding_window_view(roles[r], SEQ_LEN)
        n = len(windows) - 1
        x_train[a : a + train], y_train[a : a + train] = windows[:train], windows[1 : train + 1]
        x_test[b : b + n - first], y_test[b : b + n - first] = windows[first:n], windows[first + 1 : n + 1]
        a, b = a + train, b + n - first
    groups = np.repeat(np.arange(len(kept), dtype=np.int64), [train for train, _ in counts])
    return Dataset(
        name=name,
        train=TensorData(torch.from_numpy(x_train), torch.from_numpy(y_train)),
        test=TensorData(torch.from_numpy(x_test), torch.from_numpy(y_test)),
        num_classes=VOCAB_SIZE,
        groups=groups,
    )


def read_text(path: str | os.PathLike) -> str:
    """The text of `path`: the Complete Works' .txt, or the .zip holding it (its one .txt member).

    Raises:
        DataError: unreadable, not a zip holding one .txt, larger than MAX_TEXT_BYTES, binary or
            not UTF-8.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".zip":
            with zipfile.ZipFile(path) as archive:
                members = [m for m in archive.infolist() if m.filename.lower().endswith(".txt")]
                if len(members) != 1:
                    raise DataError(f"{path}: expected one .txt file in the archive, found {len(members)}")
                if members[0].file_size > MAX_TEXT_BYTES:
                    raise DataError(
                        f"{path}: {members[0].filename} is {members[0].file_size} bytes, more than "
                        f"the {MAX_TEXT_BYTES} a Complete Works text has"
                    )
                data = archive.read(members[0])
        else:
            size = path.stat().st_size
            if size > MAX_TEXT_BYTES:
                raise DataError(f"{path}: {size} bytes, more than the {MAX_TEXT_BYTES} a Complete Works text has")
            data = path.read_bytes()
    except zipfile.BadZipFile as e:
        raise DataError(f"{path}: not a zip archive ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: {e.strerror or e}") from None
    if b"\0" in data:
        raise DataError(f"{path}: binary data, not the Complete Works' text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as Python's text mode reads it for LEAF


def read_roles(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """`parse_roles` of the text at `path`, cached as .npz (keyed by the path, size and mtime)
    so that later loads skip the parse. A cache that cannot be read or written is ignored."""
    path = Path(path)
    cache = _cache_path(path).with_suffix(f".roles{_CACHE_VERSION}.npz")
    try:
        with np.load(cache, allow_pickle=False) as saved:
            names, lengths, ids = saved["names"], saved["lengths"], saved["ids"]
        if ids.dtype == np.uint8 and lengths.sum() == len(ids) and len(names) == len(lengths):
            return dict(zip(names.tolist(), np.split(ids, np.cumsum(lengths)[:-1]), strict=True))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass
    text = read_text(path)
    try:
        roles = parse_roles(text)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    try:
        with atomic_write(cache, "wb") as f:
            np.savez(
                f,
                names=np.array(list(roles)),
                lengths=np.array([len(v) for v in roles.values()]),
                ids=np.concatenate(list(roles.values())),
            )
    except OSError:
        pass
    return roles


def locate_text(
    spec: TextSpec = SHAKESPEARE,
    data_dir: str | os.PathLike | None = None,
    *,
    download_missing: bool = True,
    progress: bool = True,
) -> Path:
    """The first of `spec`'s archive or text files in `search_dirs(spec.name, data_dir)`, or the
    archive downloaded from its mirrors and checked against its MD5 when none is there."""
    searched = search_dirs(spec.name, data_dir)
    for directory in searched:
        for filename in (spec.filename, *spec.text_names):
            if (directory / filename).is_file():
                return directory / filename
    how = f"download {spec.mirrors[0]}{spec.filename}" if spec.mirrors else f"put {spec.filename}"
    places = ", ".join(map(str, dict.fromkeys(searched)))
    if not download_missing:
        raise DataError(f"{spec.title} not found in {places}; {how} into one of them")
    root = data_dir or os.environ.get("FEDFORGE_DATA")
    target = Path(root) / spec.name if root else Path.home() / ".cache" / "fedforge" / spec.name
    try:
        return download(spec.filename, spec.md5, spec.mirrors, target, progress=progress)
    except DataError as e:
        raise DataError(f"{spec.title} not found in {places} and the download failed ({e}); {how}") from e


def load_shakespeare(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    progress: bool = True,
    train_fraction: float = TRAIN_FRACTION,
    spec: TextSpec = SHAKESPEARE,
) -> Dataset:
    """LEAF's Shakespeare as a language-model Dataset (see the module docstring), from the text
    found on disk or downloaded.

    Raises:
        DataError: not found and not downloadable, or the file is not the Complete Works' text.
    """
    path = locate_text(spec, data_dir, download_missing=download, progress=progress)
    return to_dataset(read_roles(path), train_fraction=train_fraction, name=spec.name)


__all__ = [
    "ALL_LETTERS",
    "SEQ_LEN",
    "SHAKESPEARE",
    "VOCAB_SIZE",
    "TextSpec",
    "decode",
    "encode",
    "kept_roles",
    "load_shakespeare",
    "locate_text",
    "parse_roles",
    "read_roles",
    "read_text",
    "role_name",
    "role_texts",
    "split_counts",
    "split_into_plays",
    "to_dataset",
]
