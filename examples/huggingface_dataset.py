"""A Hugging Face dataset from disk, federated: `--dataset hf:PATH --target COLUMN`.

Builds a `datasets.DatasetDict` in memory from scikit-learn's digits (8x8 images, 10 classes):
a column `pixels` of 64 floats per image (a fixed-length list becomes a 2-D tensor) and a
`ClassLabel` column `label`, split 80/20 by `train_test_split`; writes it with `save_to_disk`,
then runs fedforge on that folder through the Python API (the same as
`fedforge run --dataset hf:FOLDER --target label --model tabular-mlp ...`): 10 clients, 5 per
round, fedforge's `tabular-mlp` (SGD, lr 0.1, 5 local epochs), FedAvg. Prints test accuracy per round:
97.5 % after 10 rounds here.

Needs `pip install 'fedforge[hf]'` (and scikit-learn for the digits).

    python examples/huggingface_dataset.py [--rounds 10]
"""

import argparse
import tempfile
from pathlib import Path

import datasets
import numpy as np
from sklearn.datasets import load_digits

import fedforge as ff


def digits_dataset() -> datasets.DatasetDict:
    """The digits as a Hugging Face DatasetDict (train, test): pixels scaled to [-1, 1], ClassLabel labels."""
    bunch = load_digits()
    features = datasets.Features(
        {
            "pixels": datasets.List(datasets.Value("float32"), length=64),
            "label": datasets.ClassLabel(names=[str(d) for d in range(10)]),
        }
    )
    table = datasets.Dataset.from_dict(
        {"pixels": (bunch.data / 8.0 - 1.0).astype(np.float32).tolist(), "label": bunch.target.tolist()},
        features=features,
    )
    return table.train_test_split(test_size=0.2, seed=0)


def main(rounds: int) -> ff.History:
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "digits"
        digits_dataset().save_to_disk(str(folder))
        config = ff.Config(
            dataset=f"hf:{folder}",
            target="label",
            model="tabular-mlp",
            num_clients=10,
            clients_per_round=5,
            rounds=rounds,
            local_epochs=5,
            batch_size=16,
            lr=0.1,
            out_dir=str(Path(tmp) / "runs"),
            name="hf-digits",
        )
        return ff.run_experiment(config, progress=False).history  # prints a line per round


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    main(parser.parse_args().rounds)
