"""csv:, parquet: and hf: datasets: real files in tmp_path, hand-checked values, one-line errors."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from fedforge.config import Config
from fedforge.data import federate, tables
from fedforge.data import load as load_source
from fedforge.data.tables import parse_source, source_label, split_indices
from fedforge.errors import ConfigError, DataError
from fedforge.experiment import load, run_name
from fedforge.models import build_model

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

# Ten rows: a feature, a constant feature, a string class label and a numeric target.
ROWS = [(float(i), 7.0, "cat" if i % 3 == 0 else "ant" if i % 3 == 1 else "bee", 2.5 * i) for i in range(10)]
HEADER = "size,const,kind,price"


def write_csv(path, rows=ROWS, header=HEADER):
    path.write_text(header + "\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))
    return path


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_parse_source_and_label():
    assert parse_source("csv:data/heart.csv") == ("csv", "data/heart.csv")
    assert parse_source("hf:/tmp/x:y") == ("hf", "/tmp/x:y")
    assert parse_source("mnist") is None and parse_source("cifar:x") is None
    assert source_label("csv:data/heart disease.csv") == "csv-heart_disease"
    assert source_label("jsonl:data/chats.jsonl") == "jsonl-chats"  # any PREFIX:PATH, a run folder's name
    assert source_label("shakespeare-text:examples/data/scenes.txt") == "shakespeare-text-scenes"
    assert source_label("hf:/tmp/digits/") == "hf-digits"
    assert source_label("mnist") == "mnist"


def test_split_is_fixed_and_80_20():
    train, test = split_indices(10)
    assert len(train) == 8 and len(test) == 2
    assert sorted([*train, *test]) == list(range(10))
    np.testing.assert_array_equal(split_indices(10)[0], train)


def test_csv_classification_by_hand(tmp_path):
    dataset = load_source(f"csv:{write_csv(tmp_path / 'animals.csv')}", target="kind", task="classification")
    train, test = split_indices(10)
    assert dataset.name == "csv-animals" and dataset.num_classes == 3 and dataset.input_shape == (3,)
    assert len(dataset.train) == 8 and len(dataset.test) == 2
    # Classes in sorted order: ant 0, bee 1, cat 2; row i is cat when i % 3 == 0.
    expected = torch.tensor([{0: 2, 1: 0, 2: 1}[i % 3] for i in range(10)])
    assert dataset.train.y.dtype == torch.int64
    torch.testing.assert_close(dataset.train.y, expected[train])
    torch.testing.assert_close(dataset.test.y, expected[test])
    # Standardized with the training rows' mean and (population) std; the constant column only centred.
    size = np.arange(10.0)
    mean, std = size[train].mean(), size[train].std()
    assert dataset.train.x.dtype == torch.float32
    torch.testing.assert_close(dataset.train.x[:, 0], torch.tensor((size[train] - mean) / std, dtype=torch.float32))
    torch.testing.assert_close(dataset.test.x[:, 0], torch.tensor((size[test] - mean) / std, dtype=torch.float32))
    assert dataset.train.x[:, 1].abs().max() == 0 and dataset.test.x[:, 1].abs().max() == 0
    torch.testing.assert_close(
        dataset.train.x[:, 2], torch.tensor((2.5 * size[train] - 2.5 * mean) / (2.5 * std), dtype=torch.float32)
    )


def test_a_constant_column_is_not_blown_up_by_rounding(tmp_path):
    # Three training rows of 0.1: their float mean is 0.10000000000000002 and their std 1.4e-17, not 0.
    path = write_csv(tmp_path / "d.csv", [(i, 0.1, i % 2) for i in range(4)], "x,const,y")
    dataset = load_source(f"csv:{path}", target="y", task="classification")
    assert len(dataset.train) == 3 and dataset.train.x[:, 1].abs().max() < 1e-6


def test_integer_labels_become_0_to_k_minus_1_in_order(tmp_path):
    rows = [(i, [9, 3, 5][i % 3]) for i in range(9)]
    dataset = load_source(
        f"csv:{write_csv(tmp_path / 'd.csv', rows, 'x,label')}", target="label", task="classification"
    )
    assert dataset.num_classes == 3
    train, _ = split_indices(9)
    assert dataset.train.y.tolist() == [[2, 0, 1][i % 3] for i in train]  # 3 -> 0, 5 -> 1, 9 -> 2


def test_csv_regression_target_is_float_one_output(tmp_path):
    path = write_csv(tmp_path / "d.csv", [(a, b, d) for a, b, _, d in ROWS], "size,const,price")
    dataset = load_source(f"csv:{path}", target="price", task="regression")
    train, test = split_indices(10)
    assert dataset.num_classes == 1 and dataset.train.y.dtype == torch.float32
    assert dataset.train.y.tolist() == [2.5 * i for i in train] and dataset.test.y.tolist() == [2.5 * i for i in test]


def test_quoted_fields_blank_lines_and_a_bom(tmp_path):
    path = tmp_path / "q.csv"
    path.write_bytes('\ufeff"a","b","y"\n"1.5", 2,x\n\n3,4,y\n5,6,x\n'.encode())
    dataset = load_source(f"csv:{path}", target="y", task="classification")
    assert len(dataset.train) + len(dataset.test) == 3 and dataset.num_classes == 2


def test_the_same_as_the_bundled_diabetes(tmp_path):
    datasets = pytest.importorskip("sklearn.datasets")
    from fedforge.data.bundled import load_bundled

    bunch = datasets.load_diabetes()
    rows = [(*row, t) for row, t in zip(bunch.data.tolist(), bunch.target.tolist(), strict=True)]
    path = write_csv(tmp_path / "diabetes.csv", rows, ",".join([*bunch.feature_names, "progression"]))
    table = pa.table({**{n: bunch.data[:, j] for j, n in enumerate(bunch.feature_names)}, "progression": bunch.target})
    pq.write_table(table, tmp_path / "diabetes.parquet")
    bundled = load_bundled("diabetes")
    for name in (f"csv:{path}", f"parquet:{tmp_path / 'diabetes.parquet'}"):
        dataset = load_source(name, target="progression", task="regression")
        torch.testing.assert_close(dataset.train.x, bundled.train.x)
        torch.testing.assert_close(dataset.test.y, bundled.test.y)


def test_parquet_file_and_folder_equal_the_csv(tmp_path):
    csv_data = load_source(f"csv:{write_csv(tmp_path / 'd.csv')}", target="kind", task="classification")
    columns = list(zip(*ROWS, strict=True))
    table = pa.table({name: list(values) for name, values in zip(HEADER.split(","), columns, strict=True)})
    pq.write_table(table, tmp_path / "d.parquet")
    (tmp_path / "parts").mkdir()
    pq.write_table(table.slice(0, 4), tmp_path / "parts" / "a.parquet")
    pq.write_table(table.slice(4), tmp_path / "parts" / "b.parquet")
    for path in (tmp_path / "d.parquet", tmp_path / "parts"):
        dataset = load_source(f"parquet:{path}", target="kind", task="classification")
        torch.testing.assert_close(dataset.train.x, csv_data.train.x)
        torch.testing.assert_close(dataset.test.y, csv_data.test.y)
        assert dataset.num_classes == 3


@pytest.mark.parametrize(
    "text, target, message",
    [
        ("", "y", "is empty (expected a header row naming the columns)"),
        ("a,b,y\n", "y", "has a header but no rows"),
        ("a,b,label\n1,2,3\n", "y", "has no column 'y' (its columns: a, b, label)"),
        (
            "a,color,city,y\n1,red,paris,0\n2,blue,rome,1\n",
            "y",
            "column(s) 'color', 'city' are not numbers (e.g. 'red' on line 2); encode them as numbers first",
        ),
        ("a,b,y\n1,2,0\n3,4\n", "y", "line 3: 2 fields, but the header has 3"),
        ("a,b,y\n1,2,0\n3,,1\n", "y", "line 3: column 'b' has a missing value (''); fill or drop such rows first"),
        ("a,b,y\n1,2,0\n3,NaN,1\n", "y", "line 3: column 'b' has a missing or infinite value ('NaN')"),
        ("a,b,y\n1,2,0\n3,4,\n", "y", "line 3: the target column 'y' has a missing value ('')"),
        ("a,a,y\n1,2,0\n", "y", "column 'a' appears twice in the header"),
        ("y\n1\n2\n", "y", "has only the target column 'y': no features to learn from"),
        ("a,y\n1,0\n2,1\n", "y", "has 2 row(s): too few for an 80/20 train/test split"),
        ("a,y\n1,0.5\n2,1\n3,0\n", "y", "target column 'y' has value 0.5, not a class label"),
        ("a,y\n1,4\n2,4\n3,4\n", "y", "target column 'y' has a single value (4.0): nothing to classify"),
    ],
)
def test_bad_csv_files(tmp_path, text, target, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError) as error:
        load_source(f"csv:{path}", target=target, task="classification")
    assert message in one_line(error) and str(path) in str(error.value)


def test_regression_needs_numbers(tmp_path):
    with pytest.raises(DataError) as error:
        load_source(f"csv:{write_csv(tmp_path / 'd.csv')}", target="kind", task="regression")
    assert "target column 'kind' is not numbers (e.g. 'cat'); regression needs numbers" in one_line(error)


def test_too_many_classes(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "MAX_CLASSES", 5)
    path = write_csv(tmp_path / "d.csv", [(a, b, d) for a, b, _, d in ROWS], "size,const,price")
    with pytest.raises(DataError) as error:
        load_source(f"csv:{path}", target="size", task="classification")
    assert "target column 'size' has 10 distinct values, more than 5 classes; use --task regression" in one_line(error)


def test_limits(tmp_path, monkeypatch):
    path = write_csv(tmp_path / "d.csv")
    monkeypatch.setattr(tables, "MAX_COLUMNS", 3)
    with pytest.raises(DataError, match=r"has 4 columns, more than fedforge reads \(3\)"):
        load_source(f"csv:{path}", target="kind", task="classification")
    monkeypatch.setattr(tables, "MAX_COLUMNS", 10)
    monkeypatch.setattr(tables, "MAX_CELLS", 20)
    with pytest.raises(DataError, match="more than 20 cells"):
        load_source(f"csv:{path}", target="kind", task="classification")
    pq.write_table(pa.table({"a": list(range(12)), "y": [0, 1] * 6}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"has 12 rows x 2 columns, more than fedforge reads \(20 cells\)"):
        load_source(f"parquet:{tmp_path / 'd.parquet'}", target="y", task="classification")


def test_byte_limits(tmp_path, monkeypatch):
    path = write_csv(tmp_path / "d.csv")
    monkeypatch.setattr(tables, "MAX_BYTES", 100)
    with pytest.raises(DataError, match=rf"d.csv is {path.stat().st_size} bytes, more than fedforge reads \(100\)"):
        load_source(f"csv:{path}", target="kind", task="classification")
    pq.write_table(pa.table({"a": list(range(100)), "y": [0, 1] * 50}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"bytes of data \(uncompressed\), more than fedforge reads \(100\)"):
        load_source(f"parquet:{tmp_path / 'd.parquet'}", target="y", task="classification")
    _hf().Dataset.from_dict({"a": list(range(100)), "y": [0, 1] * 50}).save_to_disk(str(tmp_path / "hf"))
    monkeypatch.setattr(tables, "MAX_BYTES", 1000)
    with pytest.raises(DataError, match=r"holds 1600 bytes of data, more than fedforge reads \(1000\)"):
        load_source(f"hf:{tmp_path / 'hf'}", target="y", task="classification")


def test_paths_that_are_not_datasets(tmp_path):
    csv_path = write_csv(tmp_path / "d.csv")
    pq.write_table(pa.table({"a": [1.0, 2.0, 3.0], "y": [0, 1, 0]}), tmp_path / "d.parquet")
    cases = [
        (f"csv:{tmp_path / 'missing.csv'}", "missing.csv does not exist (expected a CSV file)"),
        (f"csv:{tmp_path}", "is a folder, not a CSV file"),
        (f"csv:{tmp_path / 'd.parquet'}", "d.parquet is not a CSV file (not UTF-8 text)"),
        (f"parquet:{csv_path}", "d.csv is not a Parquet file"),
        (f"parquet:{tmp_path / 'nothing'}", "nothing does not exist (expected a Parquet file or folder)"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append((f"parquet:{tmp_path / 'empty'}", "is a folder without .parquet files"))
    for name, message in cases:
        with pytest.raises(DataError) as error:
            load_source(name, target="y", task="classification")
        assert message in one_line(error), name


@pytest.mark.parametrize(
    "table, message",
    [
        ({"a": [1.0, None, 3.0], "y": [0, 1, 0]}, "column 'a' has 1 missing value(s) (the first in row 2)"),
        ({"a": [1.0, float("nan"), 3.0], "y": [0, 1, 0]}, "column 'a' has a missing or infinite value (nan) in row 2"),
        ({"a": [1, 2, 3], "b": ["x", "y", "z"], "y": [0, 1, 0]}, "column(s) 'b' are not numbers (string)"),
    ],
)
def test_bad_parquet_files(tmp_path, table, message):
    pq.write_table(pa.table(table), tmp_path / "bad.parquet")
    with pytest.raises(DataError) as error:
        load_source(f"parquet:{tmp_path / 'bad.parquet'}", target="y", task="classification")
    assert message in one_line(error)


def test_a_table_serves_classification_and_regression_only(tmp_path):
    with pytest.raises(ConfigError, match="task 'language-model' needs token sequences"):
        load_source(f"csv:{write_csv(tmp_path / 'd.csv')}", target="kind", task="language-model")


def test_config_target_rules():
    assert Config(dataset="csv:x.csv", target="y").target == "y"
    with pytest.raises(ConfigError, match=r"dataset 'csv:x.csv' needs a target, the column to predict \(--target"):
        Config(dataset="csv:x.csv")
    with pytest.raises(ConfigError, match="target 'y' is for csv:, parquet: and hf: datasets only, not 'mnist'"):
        Config(target="y")
    with pytest.raises(ConfigError, match="dataset 'parquet:' names no file: give parquet:PATH"):
        Config(dataset="parquet:", target="y")
    with pytest.raises(
        ConfigError,
        match=r"unknown dataset 'cifar' \(choose from: .*, or csv:PATH, parquet:PATH, "
        r"hf:PATH, jsonl:PATH, shakespeare-text:PATH\)",
    ):
        Config(dataset="cifar")


def test_tabular_mlp_shapes():
    model = build_model("tabular-mlp", (10,), 1)
    assert model(torch.zeros(4, 10)).shape == (4, 1)
    assert [m.out_features for m in model if isinstance(m, torch.nn.Linear)] == [64, 64, 1]
    assert build_model("tabular-mlp", (3,), 5)(torch.zeros(2, 3)).shape == (2, 5)


def test_experiment_load_and_partition(tmp_path):
    path = write_csv(tmp_path / "zoo.csv", [(float(i), 1.0, 4 + i % 2, i) for i in range(40)])
    config = Config(
        dataset=f"csv:{path}",
        target="kind",
        num_clients=4,
        clients_per_round=2,
        partition="shards",
        shards_per_client=2,
    )
    dataset, data = load(config)
    assert dataset.num_classes == 2 and data.num_clients == 4 and sum(map(len, data.partition)) == 32
    assert run_name(config).startswith("csv-zoo-mlp-fedavg-")
    assert run_name(config.replace(model="fedforge.models:tabular_mlp")).startswith(
        "csv-zoo-fedforge.models_tabular_mlp-fedavg-"
    )
    regression = load(config.replace(target="price", task="regression", partition="dirichlet"))[0]
    assert (
        regression.num_classes == 1 and len(federate(regression, config.data_split(), seed=config.seed).partition) == 4
    )


# Hugging Face datasets --------------------------------------------------------------------------------------------


def _hf():
    return pytest.importorskip("datasets")


def digits_like(n=20):
    """n rows: 4 pixels (a fixed-length list), a scalar feature, a ClassLabel of 3 classes."""
    hf = _hf()
    features = hf.Features(
        {
            "pixels": hf.List(hf.Value("float32"), length=4),
            "weight": hf.Value("int32"),
            "label": hf.ClassLabel(names=["a", "b", "c", "d"]),
        }
    )
    return hf.Dataset.from_dict(
        {
            "pixels": [[i, i + 0.5, -i, 1.0] for i in range(n)],
            "weight": list(range(n)),
            "label": [i % 3 for i in range(n)],
        },
        features=features,
    )


def test_hf_dataset_dict_one_input_column(tmp_path):
    hf = _hf()
    rows = digits_like().remove_columns("weight")
    hf.DatasetDict(train=rows.select(range(15)), test=rows.select(range(15, 20))).save_to_disk(str(tmp_path / "d"))
    dataset = load_source(f"hf:{tmp_path / 'd'}", target="label", task="classification")
    assert dataset.name == "hf-d" and dataset.num_classes == 4  # the ClassLabel's, though class 3 never occurs
    assert len(dataset.train) == 15 and len(dataset.test) == 5
    assert dataset.train.x.dtype == torch.float32 and dataset.train.x.shape == (15, 4)
    torch.testing.assert_close(dataset.test.x[0], torch.tensor([15.0, 15.5, -15.0, 1.0]))  # not standardized
    assert dataset.train.y.tolist() == [i % 3 for i in range(15)]


def test_hf_single_dataset_is_split_80_20_and_int_columns_stay_ids(tmp_path):
    rows = digits_like().remove_columns("pixels")
    rows.save_to_disk(str(tmp_path / "d"))
    dataset = load_source(f"hf:{tmp_path / 'd'}", target="label", task="classification")
    train, test = split_indices(20)
    assert dataset.train.x.dtype == torch.int64 and dataset.train.x.tolist() == train.tolist()
    assert dataset.test.y.tolist() == [i % 3 for i in test]


def test_hf_several_inputs_are_a_dict(tmp_path):
    digits_like().save_to_disk(str(tmp_path / "d"))
    dataset = load_source(f"hf:{tmp_path / 'd'}", target="label", task="classification")
    assert isinstance(dataset.train.x, dict) and list(dataset.train.x) == ["pixels", "weight"]
    assert dataset.train.x["pixels"].shape == (16, 4) and dataset.train.x["weight"].shape == (16,)


def test_hf_regression(tmp_path):
    hf = _hf()
    hf.Dataset.from_dict({"x": [[float(i), 1.0] for i in range(10)], "y": [0.5 * i for i in range(10)]}).save_to_disk(
        str(tmp_path / "d")
    )
    dataset = load_source(f"hf:{tmp_path / 'd'}", target="y", task="regression")
    train, _ = split_indices(10)
    assert dataset.num_classes == 1 and dataset.train.y.dtype == torch.float32
    assert dataset.train.y.tolist() == [0.5 * i for i in train] and dataset.train.x.shape == (8, 2)


def test_hf_string_labels_become_class_ids(tmp_path):
    hf = _hf()
    hf.Dataset.from_dict({"x": [[float(i), 1.0] for i in range(10)], "kind": ["bee", "ant"] * 5}).save_to_disk(
        str(tmp_path / "d")
    )
    dataset = load_source(f"hf:{tmp_path / 'd'}", target="kind", task="classification")
    train, _ = split_indices(10)
    assert dataset.num_classes == 2 and dataset.train.y.tolist() == [1 - i % 2 for i in train]


def test_hf_language_model_targets(tmp_path):
    hf = _hf()
    ids = [[(i + t) % 7 for t in range(5)] for i in range(10)]
    hf.DatasetDict(
        train=hf.Dataset.from_dict({"input_ids": ids[:8], "labels": [[*s[1:], 0] for s in ids[:8]]}),
        test=hf.Dataset.from_dict({"input_ids": ids[8:], "labels": [[*s[1:], 0] for s in ids[8:]]}),
    ).save_to_disk(str(tmp_path / "d"))
    dataset = load_source(f"hf:{tmp_path / 'd'}", target="labels", task="language-model")
    assert dataset.num_classes == 7 and dataset.train.x.shape == (8, 5) and dataset.train.y.dtype == torch.int64


def test_hf_parquet(tmp_path):
    rows = digits_like().remove_columns("weight")
    rows.to_parquet(str(tmp_path / "all.parquet"))
    dataset = load_source(f"hf:{tmp_path / 'all.parquet'}", target="label", task="classification")
    assert dataset.num_classes == 4 and len(dataset.train) == 16  # the ClassLabel survives in the file's metadata
    (tmp_path / "splits").mkdir()
    rows.select(range(12)).to_parquet(str(tmp_path / "splits" / "train-00000-of-00001.parquet"))
    rows.select(range(12, 20)).to_parquet(str(tmp_path / "splits" / "test-00000-of-00001.parquet"))
    dataset = load_source(f"hf:{tmp_path / 'splits'}", target="label", task="classification")
    assert len(dataset.train) == 12 and len(dataset.test) == 8


@pytest.mark.parametrize(
    "columns, message",
    [
        (
            {"text": ["a b", "c", "d e f"], "label": [0, 1, 0]},
            "column 'text' holds text; tokenize and pad it first (fixed-length lists of token ids), or drop it",
        ),
        (
            {"input_ids": [[1, 2], [3], [4, 5, 6]], "label": [0, 1, 0]},
            "column 'input_ids' holds lists of different lengths (1 to 3); pad them to one length first",
        ),
        ({"x": [1.0, None, 3.0], "label": [0, 1, 0]}, "column 'x' has 1 missing value(s)"),
        ({"x": [1.0, 2.0, 3.0], "y": [0, 1, 0]}, "has no column 'label' (its columns: x, y)"),
        ({"label": [0, 1, 0]}, "has only the target column 'label': no inputs to learn from"),
        ({"x": [1.0, 2.0, 3.0], "label": [0.5, 1.0, 0.0]}, "target column 'label' has value 0.5, not a class label"),
    ],
)
def test_bad_hf_columns(tmp_path, columns, message):
    _hf().Dataset.from_dict(columns).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError) as error:
        load_source(f"hf:{tmp_path / 'd'}", target="label", task="classification")
    assert message in one_line(error)


def test_hf_paths_that_are_not_datasets(tmp_path):
    _hf()
    hf = sys.modules["datasets"]
    (tmp_path / "folder").mkdir()
    write_csv(tmp_path / "d.csv")
    rows = digits_like()
    hf.DatasetDict(validation=rows, extra=rows).save_to_disk(str(tmp_path / "splits"))
    for name, message in [
        (f"hf:{tmp_path / 'nothing'}", "nothing does not exist (expected a folder written by save_to_disk"),
        (f"hf:{tmp_path / 'folder'}", "folder is not a Hugging Face dataset (no dataset_dict.json or state.json"),
        (f"hf:{tmp_path / 'd.csv'}", "d.csv is not a Parquet file"),
        (f"hf:{tmp_path / 'splits'}", "has the splits validation, extra; fedforge needs 'train' and 'test'"),
    ]:
        with pytest.raises(DataError) as error:
            load_source(name, target="label", task="classification")
        assert message in one_line(error), name


def test_without_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'fedforge\[hf\]'"):
        load_source(f"hf:{tmp_path}", target="label", task="classification")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match=r"reading Parquet needs pyarrow: pip install 'fedforge\[parquet\]'"):
        load_source(f"parquet:{tmp_path}", target="label", task="classification")


def test_hf_end_to_end(tmp_path):
    """A learnable HF dataset through Config, load and a few rounds: accuracy well above chance."""
    from fedforge.experiment import run_experiment

    hf = _hf()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    label = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    hf.Dataset.from_dict({"features": x.tolist(), "label": label.tolist()}).save_to_disk(str(tmp_path / "d"))
    config = Config(
        dataset=f"hf:{tmp_path / 'd'}",
        target="label",
        model="tabular-mlp",
        rounds=4,
        lr=0.1,
        local_epochs=2,
        batch_size=8,
        out_dir=str(tmp_path / "runs"),
        name="hf",
    )
    history = run_experiment(config, progress=False, verbose=False).history
    assert history.final.test_accuracy > 0.85 and not math.isnan(history.final.test_loss)


class BagOfTokens(torch.nn.Module):
    """Mean of the unmasked tokens' embeddings, then a linear layer: called as model(input_ids=, attention_mask=)."""

    def __init__(self, vocabulary: int, classes: int):
        super().__init__()
        self.embed, self.out = torch.nn.Embedding(vocabulary, 8), torch.nn.Linear(8, classes)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).float()
        return self.out((self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1))


def test_hf_tokenized_columns_end_to_end(tmp_path):
    """Padded input_ids and attention_mask reach the model as keywords; it learns which tokens mean 1."""
    import fedforge as ff

    hf = _hf()
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 11, size=300)
    mask = (np.arange(10) < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, 20, size=(300, 10)) * mask  # 0 pads
    label = ((ids >= 10) * mask).sum(1) * 2 > lengths  # most tokens in 10..19
    hf.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "label": label.astype(int).tolist()}
    ).save_to_disk(str(tmp_path / "d"))
    config = Config(dataset=f"hf:{tmp_path / 'd'}", target="label", num_clients=5, clients_per_round=5)
    dataset, data = load(config)
    assert set(dataset.train.x) == {"input_ids", "attention_mask"} and dataset.train.x["input_ids"].dtype == torch.int64
    torch.manual_seed(0)
    result = ff.simulate(
        BagOfTokens(20, dataset.num_classes),
        data,
        rounds=8,
        clients_per_round=5,
        client=ff.ClientConfig(
            local_epochs=2, batch_size=16, lr=0.05, task=ff.make_task("classification", optimizer="adam")
        ),
    )
    accuracy = [r.test_accuracy for r in result.history.records]
    assert accuracy[-1] > 0.8 and accuracy[-1] > accuracy[0] + 0.2
