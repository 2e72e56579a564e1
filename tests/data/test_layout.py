"""Data beyond one input tensor: tuples and dicts of tensors, and torch Datasets, end to end."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedforge as ff
from fedforge.data import FederatedData
from fedforge.data.datasets import TensorData
from fedforge.errors import DataError

N, A, B, CLASSES = 120, 5, 3, 4


def _data():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(N, A, generator=g), torch.randn(N, B, generator=g)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    return a, b, y


class TwoInputs(nn.Module):
    """model(a, b): one Linear over both inputs side by side."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(A + B, CLASSES)

    def forward(self, a, b):
        return self.linear(torch.cat([a, b], dim=1))


class Named(TwoInputs):
    """model(input_ids=..., mask=...): the same computation, keyword inputs."""

    def forward(self, features, extra):
        return super().forward(features, extra)


class OneInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(A + B, CLASSES)

    def forward(self, x):
        return self.linear(x)


def _run(model, train, *, task=ff.CLASSIFICATION, engine=None):
    parts = [np.arange(i, N, 4) for i in range(4)]
    result = ff.simulate(
        model,
        FederatedData(train, parts, train),
        rounds=2,
        clients_per_round=2,
        client=ff.ClientConfig(batch_size=16, lr=0.1, task=task),
        engine=engine,
        seed=3,
    )
    return result.state.params


def _same_init(model):
    torch.manual_seed(0)
    reference = OneInput()
    model.linear.load_state_dict(reference.linear.state_dict())
    return model, reference


def test_tuple_and_dict_inputs_train_as_one_tensor_would():
    a, b, y = _data()
    two, reference = _same_init(TwoInputs())
    expected = _run(reference, TensorData(torch.cat([a, b], 1), y))
    torch.testing.assert_close(_run(two, (a, b, y)), expected)  # a tuple: the last part is the target
    named, _ = _same_init(Named())
    task = dataclasses.replace(ff.CLASSIFICATION, target="label")
    torch.testing.assert_close(_run(named, {"features": a, "extra": b, "label": y}, task=task), expected)


def test_a_dict_target_reaches_the_loss():
    """The loss sees every target part: here a per-example weight that zeroes half the examples."""
    a, b, y = _data()
    keep = (torch.arange(N) % 2 == 0).float()

    def weighted(outputs, target):
        return (F.cross_entropy(outputs, target["label"], reduction="none") * target["weight"]).mean()

    def sums(outputs, target):
        return {"loss": (F.cross_entropy(outputs, target["label"], reduction="none") * target["weight"]).sum()}

    task = ff.Task("weighted", weighted, sums, target=["label", "weight"], inputs=["features", "extra"])
    named, _ = _same_init(Named())
    trained = _run(named, {"features": a, "extra": b, "label": y, "weight": keep}, task=task)
    # The odd examples weigh nothing: changing their labels changes nothing.
    other, _ = _same_init(Named())
    flipped = torch.where(keep > 0, y, (y + 1) % CLASSES)
    torch.testing.assert_close(
        _run(other, {"features": a, "extra": b, "label": flipped, "weight": keep}, task=task), trained
    )
    assert not torch.equal(trained["linear.weight"], Named().linear.weight)


def test_vectorized_engine_gives_the_sequential_result_on_tuple_inputs():
    a, b, y = _data()
    one, _ = _same_init(TwoInputs())
    other, _ = _same_init(TwoInputs())
    torch.testing.assert_close(
        _run(one, (a, b, y), engine=ff.VectorizedEngine()), _run(other, (a, b, y), engine=ff.SequentialEngine())
    )


class Pairs(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_a_torch_dataset_is_read_once_into_tensors():
    a, b, y = _data()
    x = torch.cat([a, b], 1)
    data = ff.CLASSIFICATION.data(Pairs(x, y))
    assert torch.equal(data.x, x) and torch.equal(data.y, y)
    torch.manual_seed(0)
    model = OneInput()
    same = OneInput()
    same.load_state_dict(model.state_dict())
    torch.testing.assert_close(_run(model, Pairs(x, y)), _run(same, TensorData(x, y)))


class Ragged(torch.utils.data.Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return torch.zeros(i + 1), 0


def test_a_hugging_face_dataset_trains_as_its_tensors_would():
    """A datasets.Dataset goes where a torch Dataset does: "label" is the target, the other column the input."""
    hf = pytest.importorskip("datasets")
    a, b, y = _data()
    x = torch.cat([a, b], 1)
    columns = hf.Dataset.from_dict({"label": y.tolist(), "features": x.tolist()})  # the label first
    data = ff.CLASSIFICATION.data(columns)
    assert torch.equal(data.y, y) and torch.allclose(data.x, x)
    model, same = _same_init(OneInput())
    torch.testing.assert_close(_run(model, columns), _run(same, TensorData(x, y)))
    # Other names: the task's target and inputs name the columns; a position counts too.
    renamed = columns.rename_columns({"label": "kind", "features": "pixels"})
    task = dataclasses.replace(ff.CLASSIFICATION, target="kind", inputs=-1)
    assert torch.equal(task.data(renamed).y, y) and torch.allclose(task.data(renamed).x, x)
    # Without a "label" column the last column is the target, as the last part of a tuple is.
    assert torch.equal(ff.CLASSIFICATION.data(renamed.select_columns(["pixels", "kind"])).y, y)


def test_a_hugging_face_image_column_becomes_floats_in_0_1():
    hf = pytest.importorskip("datasets")
    images = np.arange(4 * 2 * 3, dtype=np.uint8).reshape(4, 2, 3) * 10
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(num_classes=2)})
    columns = hf.Dataset.from_dict({"image": list(images), "label": [0, 1, 1, 0]}, features=features)
    data = ff.CLASSIFICATION.data(columns)
    assert data.x.dtype == torch.float32 and data.x.shape == (4, 1, 2, 3)  # datasets' torch format: channels first
    torch.testing.assert_close(data.x, torch.from_numpy(images).float().unsqueeze(1) / 255)
    assert data.y.tolist() == [0, 1, 1, 0]
    text = hf.Dataset.from_dict({"text": ["a", "bb"], "label": [0, 1]})
    with pytest.raises(DataError, match=r"column 'text' of the datasets\.Dataset is not one tensor"):
        ff.CLASSIFICATION.data(text)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"features": torch.zeros(4, 2), "labels": torch.zeros(4)}, "no part 'label' (it has: 'features', 'labels')"),
        ((torch.zeros(4, 2), torch.zeros(5)), "share their first dimension"),
        ((torch.zeros(4, 2), [1, 2]), "must be a tensor"),
        (Ragged(), "fixed shapes"),
        ("not data", "cannot use str as data"),
    ],
)
def test_data_that_does_not_fit_is_refused_in_one_line(data, message):
    task = dataclasses.replace(ff.CLASSIFICATION, target="label") if isinstance(data, dict) else ff.CLASSIFICATION
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        task.data(data)
    assert "\n" not in str(e.value)
