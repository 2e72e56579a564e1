"""What a client computes: the loss of a batch, metrics as sums, and the optimizer it trains with.

A Task is the one object that says it; training (every engine), evaluation and the deployment's
clients all use it. Built in:

- `classification` (the tutorial's): cross-entropy over class logits; metric accuracy.
- `regression`: mean squared error of the outputs against float targets of the same shape;
  metrics mse, mae and r2 (1 - SSE / total sum of squares, from sums over every target value).
- `language-model`: next-token cross-entropy over (batch, time, vocabulary) logits and
  (batch, time) targets; metrics perplexity (exp of the mean token loss) and token accuracy.
- `causal-lm`: fine-tuning a causal language model (a transformers `...ForCausalLM`) on token
  rows: the target is the labels, the input ids with IGNORE (-100) where no token is to be
  predicted (padding, an instruction's prompt), and the loss is the next-token cross-entropy,
  the shift done inside it, averaged over the predicted tokens (transformers' own loss); metrics
  perplexity and token accuracy over those tokens. `fedforge.llm.text` prepares such rows.
- `sequence-classification`: cross-entropy over (batch, labels) logits and class ids; metric
  accuracy.

The last two take a transformers model's output as it is (its `logits`) or a tensor of logits.
They are the tasks of text data (`--dataset jsonl:PATH` and friends with `--model hf:PATH`,
tokenized by `fedforge.llm.text`); a file dataset with `--target` is read as already tokenized,
its target column tokens (causal-lm: the labels, -100 where none is predicted) or classes.
`language-model` with an hf: model trains the same causal LM on token rows whose targets are
already each position's next token (every position scored, nothing ignored).

Metrics are sums over units (examples, or tokens for a language model), so that batches and
clients combine exactly; `summarize` turns the sums into the values shown.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ._imports import is_reference, load_instance
from .data.datasets import TensorData, Tree, leaves
from .data.huggingface import hf_tensors, is_hf_dataset
from .errors import ConfigError, DataError

Sums = dict[str, torch.Tensor]
OPTIMIZERS: dict[str, type[torch.optim.Optimizer] | None] = {
    "sgd": None,  # fedforge's own SGD rule: exact across engines, and the fast kernels' (optim.sgd_step)
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


# How a file dataset's target column can be prepared (Task.targets), and the built-in task that does it.
TARGETS = {"classes": "classification", "numbers": "regression", "tokens": "language-model"}


def _rows(target) -> int:
    """The examples in a batch: the rows of its target (of its first tensor, when several)."""
    return len(leaves(target)[0])


def _plain_means(sums: Mapping[str, float], units: float) -> dict[str, float]:
    return {name: value / units for name, value in sums.items()}


@dataclass(frozen=True)
class Task:
    """What a client computes.

    A batch is a TensorData's rows: inputs, which the model gets (a tensor as model(x), a tuple
    as model(*x), a dict as model(**x)), and the target part, which the loss and metrics get
    (a tensor, or a tuple or dict of tensors, e.g. labels and an attention mask). `target` and
    `inputs` say which parts of the user's data are which (`Task.data`).

    Attributes:
        name: shown in outputs.
        loss: (outputs, target) -> the mean loss over the batch's units, a scalar tensor.
        metric_sums: (outputs, target) -> {name: a sum over the batch's units} (no gradient).
        units: target -> how many units the sums of a batch are over (default: its examples;
            tokens for a language model).
        summarize: (sums over all batches, units) -> {metric: value}; default: each sum / units.
        primary: the metric plots and comparisons show; `higher_is_better` for it.
        optimizer: None for fedforge's SGD (momentum and weight decay from ClientConfig), or a
            `torch.optim.Optimizer` class, with lr (and weight_decay) from ClientConfig and
            `optimizer_options`. Adam and AdamW (without amsgrad or maximize) run as fedforge's
            functional rules (`fedforge.optim`) on every engine; others as torch.optim itself,
            on the sequential engine.
        keep_optimizer_state: keep each client's optimizer state (SGD's momentum buffer, Adam's
            moments and step count) from one of its rounds to its next, instead of starting
            fresh every round.
        train: the escape hatch, a training loop of your own (gradient accumulation, mixed
            precision, a library's trainer): `train(module, batches, config)` trains `module` in
            place on `batches`, an iterable of (inputs, targets) in the client's batch order
            (the steps it may take: a straggler gets fewer), and returns the task's training
            metrics ({"loss": ...}) or None to have them measured on the client's data after.
            `loss` and `metric_sums` still serve evaluation. Runs on the sequential engine
            (the vectorized one falls back to it); strategies that change the client's
            objective (FedProx, SCAFFOLD) cannot reach inside it and are refused.
        target: the part of a tuple (an index) or dict (a key) of data that is the target, or
            several parts (a list); default the tuple's last.
        inputs: the parts fed to the model (default: all the others; several go as a tuple or
            dict, one alone).
        targets: how a table's (csv:, parquet:) or a Hugging Face dataset's (hf:) target column
            is prepared for this task: "classes" (class ids 0..k-1, k outputs), "numbers"
            (float32 values, one output) or "tokens" (token sequences); the built-in tasks say
            theirs, a task of your own must to train on such a dataset.
    """

    name: str
    # (outputs, target): the model's outputs and a batch's target part, a tensor or a tuple or dict of them
    loss: Callable[[Any, Any], torch.Tensor]
    metric_sums: Callable[[Any, Any], Sums]
    units: Callable[[Any], int] = _rows
    summarize: Callable[[Mapping[str, float], float], dict[str, float]] = _plain_means
    primary: str = "loss"
    higher_is_better: bool = False
    optimizer: type[torch.optim.Optimizer] | None = None
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)
    train: Callable[..., Mapping[str, float] | None] | None = None
    target: int | str | Sequence[int | str] = -1
    inputs: int | str | Sequence[int | str] | None = None
    keep_optimizer_state: bool = False
    targets: str | None = None

    def __post_init__(self):
        if self.targets is not None and self.targets not in TARGETS:
            raise ConfigError(f"task {self.name}: targets must be one of {', '.join(TARGETS)}, got {self.targets!r}")
        if self.optimizer is not None and not (
            isinstance(self.optimizer, type) and issubclass(self.optimizer, torch.optim.Optimizer)
        ):
            raise ConfigError(
                f"task {self.name}: optimizer must be a torch.optim.Optimizer class, got {self.optimizer!r}"
            )
        if self.keep_optimizer_state and self.train is not None:
            raise ConfigError(
                f"task {self.name}: keep_optimizer_state is for the built-in training; a loop of one's "
                "own keeps (or not) its optimizer itself"
            )

    def checked_loss(self, outputs: Any, target: Tree) -> torch.Tensor:
        loss = self.loss(outputs, target)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ConfigError(f"task {self.name}: the loss must be a scalar tensor (the batch's mean), got {shape}")
        return loss

    def data(self, data) -> TensorData:
        """`data` as fedforge holds it: a TensorData as is; a tuple or dict of tensors (or arrays)
        split into inputs and target by this task's `inputs` and `target`; a
        `torch.utils.data.Dataset` of fixed-shape items read once and stacked, then split; a
        Hugging Face `datasets.Dataset` read once, its columns split the same way (the target by
        default its "label" column, else its last: `data.huggingface.hf_tensors`)."""
        if isinstance(data, TensorData):
            return data
        if isinstance(data, (tuple, list, Mapping)):
            return TensorData.from_batch(data, target=self.target, inputs=self.inputs)
        if isinstance(data, torch.utils.data.Dataset):
            return TensorData.from_dataset(data, target=self.target, inputs=self.inputs)
        if is_hf_dataset(data):
            return hf_tensors(data, target=self.target, inputs=self.inputs)
        kind = type(data).__qualname__
        if type(data).__module__ != "builtins":  # a Dataset of another library says whose it is
            kind = f"{type(data).__module__}.{kind}"
        raise DataError(
            f"task {self.name}: cannot use {kind} as data (give a tuple or dict of tensors, a "
            f"torch.utils.data.Dataset, a Hugging Face datasets.Dataset or a TensorData)"
        )

    def with_optimizer(self, name: str, **options) -> Task:
        """This task training with the optimizer called `name` (see OPTIMIZERS)."""
        if name not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {name!r} (choose from: {', '.join(OPTIMIZERS)})")
        return dataclasses.replace(self, optimizer=OPTIMIZERS[name], optimizer_options=options)

    @property
    def is_tutorial_classification(self) -> bool:
        """Cross-entropy classification with fedforge's SGD: what the fast kernels compute."""
        return self.classifies_by_cross_entropy and self.optimizer is None

    @property
    def classifies_by_cross_entropy(self) -> bool:
        """The built-in classification's loss and metrics, with fedforge's training loop."""
        return self.loss is _cross_entropy and self.metric_sums is _classification_sums and self.train is None


def _cross_entropy(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, target)


def _classification_sums(outputs: torch.Tensor, target: torch.Tensor) -> Sums:
    return {"loss": F.cross_entropy(outputs, target, reduction="sum"), "accuracy": (outputs.argmax(1) == target).sum()}


def _mse(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(outputs.reshape(target.shape), target)


def _regression_sums(outputs: torch.Tensor, target: torch.Tensor) -> Sums:
    error = outputs.reshape(target.shape).double() - target.double()
    t = target.double()
    return {"loss": error.pow(2).sum(), "mae": error.abs().sum(), "target": t.sum(), "target2": t.pow(2).sum()}


def _numel(target: torch.Tensor) -> int:
    return target.numel()


def _regression_summary(sums: Mapping[str, float], units: float) -> dict[str, float]:
    total = sums["target2"] - sums["target"] ** 2 / units
    return {
        "loss": sums["loss"] / units,
        "mse": sums["loss"] / units,
        "mae": sums["mae"] / units,
        "r2": 1 - sums["loss"] / total if total > 0 else float("nan"),
    }


def _next_token(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), target.reshape(-1))


def _language_sums(outputs: torch.Tensor, target: torch.Tensor) -> Sums:
    logits, flat = outputs.reshape(-1, outputs.shape[-1]), target.reshape(-1)
    return {"loss": F.cross_entropy(logits, flat, reduction="sum"), "token_accuracy": (logits.argmax(1) == flat).sum()}


IGNORE = -100  # a label that is not predicted (transformers' and torch's ignore_index)


def _logits(outputs) -> torch.Tensor:
    """A model's logits: the tensor itself, a transformers ModelOutput's `logits`, or a tuple's first."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if isinstance(outputs, tuple) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise ConfigError(f"the model's output must be logits, or hold them (.logits), got {type(outputs).__name__}")


def _shifted(outputs, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits at each position but the last, as float32 (batch * (time - 1), vocabulary), and
    the labels they predict, each position's next."""
    logits = _logits(outputs)
    return logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)


def _causal_lm_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    logits, target = _shifted(outputs, labels)
    total = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")
    # A batch with nothing to predict (all padding or prompt) adds 0, not 0/0.
    return total / (target != IGNORE).sum().clamp(min=1)


def _causal_lm_sums(outputs, labels: torch.Tensor) -> Sums:
    logits, target = _shifted(outputs, labels)
    right = (logits.argmax(1) == target) & (target != IGNORE)
    return {
        "loss": F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum"),
        "token_accuracy": right.sum(),
    }


def _predicted_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


def _sequence_cross_entropy(outputs, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_logits(outputs).float(), target)


def _sequence_classification_sums(outputs, target: torch.Tensor) -> Sums:
    logits = _logits(outputs).float()
    return {"loss": F.cross_entropy(logits, target, reduction="sum"), "accuracy": (logits.argmax(1) == target).sum()}


def _language_summary(sums: Mapping[str, float], units: float) -> dict[str, float]:
    loss = sums["loss"] / units
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "token_accuracy": sums["token_accuracy"] / units}


CLASSIFICATION = Task(
    "classification", _cross_entropy, _classification_sums, primary="accuracy", higher_is_better=True, targets="classes"
)
REGRESSION = Task(
    "regression",
    _mse,
    _regression_sums,
    units=_numel,
    summarize=_regression_summary,
    primary="r2",
    higher_is_better=True,
    targets="numbers",
)
LANGUAGE_MODEL = Task(
    "language-model",
    _next_token,
    _language_sums,
    units=_numel,
    summarize=_language_summary,
    primary="perplexity",
    targets="tokens",
)
CAUSAL_LM = Task(
    "causal-lm",
    _causal_lm_loss,
    _causal_lm_sums,
    units=_predicted_tokens,
    summarize=_language_summary,
    primary="perplexity",
    targets="tokens",
)
SEQUENCE_CLASSIFICATION = Task(
    "sequence-classification",
    _sequence_cross_entropy,
    _sequence_classification_sums,
    primary="accuracy",
    higher_is_better=True,
    targets="classes",
)
TASKS = {task.name: task for task in (CLASSIFICATION, REGRESSION, LANGUAGE_MODEL, CAUSAL_LM, SEQUENCE_CLASSIFICATION)}


def make_task(name: str, *, optimizer: str = "sgd") -> Task:
    """The built-in task called `name`, or the user's `package.module:object` (a Task, or a
    function of no arguments returning one), training with `optimizer` ("sgd" leaves a user's
    task with the optimizer it names itself)."""
    if name in TASKS:
        task = TASKS[name]
    elif is_reference(name):
        task = load_instance(name, "task", Task)
    else:
        raise ConfigError(f"unknown task {name!r} (choose from: {', '.join(TASKS)}, or package.module:object)")
    return task if optimizer == "sgd" else task.with_optimizer(optimizer)


__all__ = [
    "CAUSAL_LM",
    "CLASSIFICATION",
    "IGNORE",
    "LANGUAGE_MODEL",
    "OPTIMIZERS",
    "REGRESSION",
    "SEQUENCE_CLASSIFICATION",
    "TARGETS",
    "TASKS",
    "Task",
    "make_task",
]
