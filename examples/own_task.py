"""Your own task: a Huber loss, a "within 25" metric and AdamW, on scikit-learn's diabetes data.

The docs' "Your own task" page and the README show this file; tests/test_readme.py runs it.
Run: `python examples/own_task.py` (`pip install 'fedforge[sklearn]'`).
"""

import numpy as np
import torch
import torch.nn.functional as F

import fedforge as ff
from fedforge.data import iid
from fedforge.data.bundled import load_bundled
from fedforge.tasks import Task

diabetes = load_bundled("diabetes")  # 10 features, a continuous target
data = ff.FederatedData(diabetes.train, iid(len(diabetes.train), 5, rng=np.random.default_rng(0)), diabetes.test)
model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
huber = Task(
    "huber",
    loss=lambda out, y: F.huber_loss(out.squeeze(1), y),  # mean over the batch
    metric_sums=lambda out, y: {
        "loss": F.huber_loss(out.squeeze(1), y, reduction="sum"),
        "within_25": ((out.squeeze(1) - y).abs() < 25).sum(),
    },
    primary="within_25",
    higher_is_better=True,  # what plots show
    optimizer=torch.optim.AdamW,
    optimizer_options={"betas": (0.9, 0.99)},  # fresh each round by default
)
result = ff.simulate(
    model,
    data,
    rounds=10,
    clients_per_round=5,
    seed=0,
    client=ff.ClientConfig(local_epochs=5, batch_size=16, lr=0.05, task=huber),
)
print(result.history.column("test_within_25"))  # the task's metrics by name, per round
print(result.history.column("test_loss"))  # its loss
