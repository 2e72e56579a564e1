"""Pretrained transformers as fedforge models: `--model hf:PATH`, with LoRA adapters through peft.

`build_hf_model` loads a folder written by `save_pretrained` (or a hub name) as a causal language
model for a task whose targets are tokens, or as a sequence classifier with the data's number of
classes for one whose targets are classes, adds LoRA adapters (`LlmSettings`) and wraps it in
`HFModel`, whose forward returns the logits, as fedforge's tasks expect. The base's weights have
`requires_grad=False`, so their role is frozen: only the adapters (and a classifier's head) are
trained, sent and aggregated. `load_tokenizer` gives the data side the model's tokenizer;
`save_adapters` writes the global adapters in peft's format.

A model folder is the user's own file, but it is read as data: its config.json is checked before
transformers sees it, and no code it ships runs unless `trust_remote_code` is set.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _seeding
from ..errors import ConfigError
from . import require
from .settings import HF_PREFIX, LlmSettings
from .tokenizer import char_tokenizer

CAUSAL_LM, SEQUENCE_CLASSIFICATION = "causal-lm", "sequence-classification"
# How each kind of model is trained: by a task whose targets are these (Task.targets).
KINDS = {"tokens": CAUSAL_LM, "classes": SEQUENCE_CLASSIFICATION}

MAX_CONFIG_BYTES = 1 << 20
# Bounds on a config.json's sizes: beyond every published model, below what would exhaust memory
# on allocation before any weight is read.
CONFIG_LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 1 << 10,
    "num_attention_heads": 1 << 10,
    "num_key_value_heads": 1 << 10,
    "max_position_embeddings": 1 << 24,
    "num_labels": 1 << 16,
}
MAX_CLASSES = CONFIG_LIMITS["num_labels"]
_HUB_NAME = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")
# A folder with none of these has no tokenizer to load (tokenizer.save_pretrained writes the first).
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model")


class HFModel(nn.Module):
    """A transformers model (its LoRA layers injected by peft, if any) whose forward returns the
    logits: model(input_ids) or model(input_ids=..., attention_mask=...) -> (batch, time, vocabulary)
    for a causal LM, (batch, classes) for a classifier.

    Its state entries are the transformers model's under `model.`: `model.lm_head.weight`, and with
    adapters peft's names, `model.model.layers.0.self_attn.q_proj.lora_A.default.weight` (the base
    weight beside it `...q_proj.base_layer.weight`), a classifier's trained head
    `model.score.modules_to_save.default.weight`.
    """

    peft_model: Any  # peft.PeftModel | None
    # For AutoEngine: the vectorized engine trains many clients over the one frozen base at least
    # as fast as one client at a time (benchmarks/fine_tuning.py: 1.2-2x on a tiny Llama on the
    # CPU, even on a 5.4M-parameter one), though its layers (RMSNorm, rotary embeddings) are not
    # the dense ones auto otherwise batches on the CPU.
    batches_well = True

    def __init__(self, model: nn.Module, *, kind: str, source: str, peft_model: Any = None, precision: str = "float32"):
        super().__init__()
        self.model = model
        self.kind, self.source, self.precision = kind, source, precision
        # The peft wrapper, for saving the adapters; not a submodule, its modules are `model`'s.
        self.__dict__["peft_model"] = peft_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        # bf16: the matrix products in bfloat16 (the base's weights are), the float32 adapters cast
        # to it on the way in; the backward pass follows the forward's casts. Inside the model so
        # that every engine's forward (a module call, torch.func.functional_call) gets it.
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits

    def adapter_names(self) -> list[str]:
        """The state entries saved as the adapters: those trained (the adapters, a classifier's head)."""
        return [n for n, p in self.named_parameters() if p.requires_grad]


def model_path(name: str) -> str:
    """The folder or hub name of the model `name` ("hf:PATH")."""
    path = name[len(HF_PREFIX) :] if name.startswith(HF_PREFIX) else name
    if not path:
        raise ConfigError("model hf: needs a folder written by save_pretrained or a hub name: hf:PATH")
    return path


def check_model_folder(path: str | os.PathLike) -> dict[str, Any]:
    """The config.json of the model folder at `path`, read and checked: a JSON object of bounded
    size that names its model_type, its sizes positive and below `CONFIG_LIMITS`."""
    config_file = Path(path) / "config.json"
    try:
        size = config_file.stat().st_size
    except FileNotFoundError:
        raise ConfigError(f"model folder {path} has no config.json: it is not a transformers model") from None
    except OSError as e:
        raise ConfigError(f"model folder {path}: cannot read config.json: {e.strerror}") from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"model folder {path}: config.json is {size} bytes, more than a model's config ({MAX_CONFIG_BYTES})"
        )
    try:
        config = json.loads(config_file.read_bytes())
    except (ValueError, OSError) as e:
        raise ConfigError(f"model folder {path}: config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ConfigError(f"model folder {path}: config.json names no model_type: it is not a transformers model")
    check_sizes(config, f"model folder {path}: config.json's")
    return config


def check_sizes(config: Mapping[str, Any], where: str) -> None:
    """A ConfigError unless each size of `CONFIG_LIMITS` that a model's `config` gives is an integer
    in [1, its limit]; `where` starts the message ("model folder F: config.json's")."""
    for key, limit in CONFIG_LIMITS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
            raise ConfigError(f"{where} {key} must be an integer in [1, {limit}], got {value!r}")


def _source(name: str) -> str:
    """The folder (checked) or hub name that `name` loads from."""
    path = model_path(name)
    if Path(path).exists():
        if not Path(path).is_dir():
            raise ConfigError(f"model hf:{path} is a file: give the folder save_pretrained wrote")
        check_model_folder(path)
        return path
    if path.startswith((".", "/", "~")) or not _HUB_NAME.fullmatch(path):
        raise ConfigError(f"model hf:{path}: no such folder (nor a hub name such as org/model)")
    return path


def _loading_error(source: str, e: Exception) -> ConfigError:
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    if not Path(source).exists():
        return ConfigError(
            f"model hf:{source}: no such folder, and the Hugging Face Hub could not provide it "
            f"(offline, or no such repository?): {first}"
        )
    return ConfigError(f"model hf:{source} cannot be loaded: {first}")


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    """The tokenizer saved with the model `name` ("hf:PATH" or PATH), by AutoTokenizer; one without
    a padding token pads with its end-of-sequence token."""
    transformers, _ = require()
    source = _source(name)
    no_tokenizer = f"model hf:{source} has no tokenizer (save one beside it with tokenizer.save_pretrained)"
    try:
        with _quiet(transformers):
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        if Path(source).is_dir() and not any((Path(source) / f).exists() for f in _TOKENIZER_FILES):
            raise ConfigError(no_tokenizer) from None
        raise _loading_error(source, e) from None
    if tokenizer is None:
        raise ConfigError(no_tokenizer)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def context_length(name: str, *, trust_remote_code: bool = False) -> int | None:
    """The most tokens the model `name` ("hf:PATH") reads in one sequence (its config's
    max_position_embeddings; None when it names none): what text longer than it must be truncated to."""
    transformers, _ = require()
    source = _source(name)
    try:
        with _quiet(transformers):
            config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _loading_error(source, e) from None
    check_sizes(config.to_dict(), f"model hf:{source}: its config's")
    context = getattr(config, "max_position_embeddings", None)
    return context if isinstance(context, int) else None


def model_kind(targets: str | None) -> str:
    """The kind of model a task whose targets are `targets` trains (`KINDS`)."""
    if targets not in KINDS:
        raise ConfigError(
            f"an hf: model is trained by a task whose targets are tokens (causal-lm, language-model) or "
            f"classes (sequence-classification, classification), not {targets!r}"
        )
    return KINDS[targets]


def build_hf_model(
    name: str,
    *,
    targets: str | None,
    num_classes: int,
    seed: int = 0,
    settings: LlmSettings | None = None,
    length: int | None = None,
) -> HFModel:
    """The model `name` ("hf:PATH") for a task with targets `targets`, with `settings`' LoRA adapters.

    A causal LM for tokens (its vocabulary at least the data's `num_classes` tokens); for classes a
    sequence classifier with `num_classes` labels, its head new if the folder holds another's (a
    causal LM's, or another number of labels). Weights that the folder does not hold (a new head)
    and the adapters are initialised from `seed` alone: every client and the server build the same
    model. `settings` default to `LlmSettings()`; with lora_rank 0 no adapters: every weight is trained.
    `length`: the data's sequence length, refused when longer than the model's context.
    `settings.precision` "bf16": the base's weights in bfloat16 and the forward under bfloat16
    autocast (for CUDA; the adapters, a classifier's new head and their optimizer state float32).

    Raises:
        ConfigError: transformers or peft missing, a folder that is not a transformers model or
            whose config is out of bounds, a hub name that cannot be fetched, sequences longer
            than its context, a LoRA target that names no module.
    """
    transformers, _ = require()
    settings = settings or LlmSettings()
    kind = model_kind(targets)
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ConfigError(f"model {name}: the data has {num_classes} classes, expected 1 to {MAX_CLASSES}")
    source = _source(name)
    # bf16: the frozen base in bfloat16 (half the memory); peft makes the adapters float32.
    dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float32
    # Eager attention: SDPA's mask check is data-dependent control flow, which `vmap` refuses, so
    # only eager attention lets the vectorized engine batch clients over the one base.
    options: dict[str, Any] = {
        "trust_remote_code": settings.trust_remote_code,
        "dtype": dtype,
        "attn_implementation": "eager",
    }
    try:
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _loading_error(source, e) from None
    check_sizes(config.to_dict(), f"model hf:{source}: its config's")  # a hub model's too
    context = getattr(config, "max_position_embeddings", None)
    if length is not None and isinstance(context, int) and length > context:
        raise ConfigError(
            f"model {name} reads at most {context} tokens (max_position_embeddings), but the data's "
            f"sequences are {length} long: truncate them to {context}"
        )
    if kind == SEQUENCE_CLASSIFICATION:
        if config.num_labels != num_classes:  # a new head: the folder's labels are not the data's
            config.num_labels = num_classes
            config.id2label = {i: f"LABEL_{i}" for i in range(num_classes)}
            config.label2id = {v: k for k, v in config.id2label.items()}
        if getattr(config, "pad_token_id", None) is None:  # a decoder's classifier finds each row's last token by it
            with contextlib.suppress(ConfigError):
                config.pad_token_id = load_tokenizer(source, trust_remote_code=settings.trust_remote_code).pad_token_id
    auto = transformers.AutoModelForCausalLM if kind == CAUSAL_LM else transformers.AutoModelForSequenceClassification
    with torch.random.fork_rng(devices=[]), _quiet(transformers):
        torch.manual_seed(_seeding.derive_seed(seed, _seeding.MODEL_INIT))
        try:
            model = auto.from_pretrained(source, config=config, **options)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise _loading_error(source, e) from None
        if kind == CAUSAL_LM and model.get_output_embeddings() is not None:
            vocab = model.get_output_embeddings().weight.shape[0]
            if vocab < num_classes:
                raise ConfigError(f"model {name} predicts {vocab} tokens, but the data's tokens go up to {num_classes}")
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False  # training: no key/value cache to build
        peft_model = _with_adapters(model, kind, settings, name) if settings.lora_rank else None
    for parameter in model.parameters():  # what is trained and sent in float32 (a bf16 head's copy too)
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    model.train()
    return HFModel(model, kind=kind, source=source, peft_model=peft_model, precision=settings.precision)


@contextlib.contextmanager
def _quiet(transformers) -> Iterator[None]:
    """No progress bar of the weights' loading, nor its report (a new head's weights are missing
    from the folder by design), nor peft's deprecation warnings: a run's console (and an error's
    one line) is fedforge's."""
    logging = transformers.utils.logging
    shown, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logging.set_verbosity(verbosity)
        if shown:
            logging.enable_progress_bar()


def default_targets(model: nn.Module) -> list[str]:
    """peft's LoRA target modules for the model's architecture (the attention's query and value
    projections, e.g. q_proj,v_proj for Llama)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = str(getattr(getattr(model, "config", None), "model_type", None))
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        raise ConfigError(
            f"no default LoRA targets for a {model_type} model: name its modules with --lora-targets "
            f"(e.g. {', '.join(_linear_names(model)[:4])})"
        )
    return list(targets)


def _linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what --lora-targets can name)."""
    return list(dict.fromkeys(n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)))


def head_name(model: nn.Module) -> str:
    """The module path of a classifier's head: the last module that holds parameters itself."""
    last = ""
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = name
    return last


def _with_adapters(model: nn.Module, kind: str, settings: LlmSettings, name: str):
    """`model` with LoRA layers injected in place (peft); the PeftModel that saves them."""
    _, peft = require()
    targets = list(settings.lora_target_names() or default_targets(model))
    modules = {n.rpartition(".")[2] for n, _ in model.named_modules()} | {n for n, _ in model.named_modules()}
    for target in targets:
        if target not in modules and not any(n.endswith(f".{target}") for n in modules):
            raise ConfigError(
                f"lora target {target!r} names no module of model {name} (its linear layers: "
                f"{', '.join(_linear_names(model)) or 'none'})"
            )
    config = peft.LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM" if kind == CAUSAL_LM else "SEQ_CLS",
        # A classifier's head is new: trained and shared beside the adapters, saved with them.
        modules_to_save=[head_name(model)] if kind == SEQUENCE_CLASSIFICATION else None,
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:  # a target that is no layer peft can adapt (an embedding's container, a norm)
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise ConfigError(f"lora targets {','.join(targets)} of model {name}: {first}") from None


def save_adapters(model: nn.Module, params: Mapping[str, torch.Tensor], folder: str | os.PathLike) -> Path:
    """Write the adapters of `model` with the values in `params` (its entries by name, e.g. the
    server's shared ones; the others as `model` has them) to `folder` in peft's format:
    adapter_model.safetensors and adapter_config.json, which `PeftModel.from_pretrained(base,
    folder)` loads onto the base model. Each file is replaced whole."""
    if not isinstance(model, HFModel) or model.peft_model is None:
        raise ConfigError("save_adapters: the model has no adapters to save (an hf: model with lora_rank > 0 has)")
    _, peft = require()
    from safetensors.torch import save_file

    peft_model = model.peft_model
    inner = {
        f"base_model.{n}": t for n, t in model.state_dict().items()
    }  # HFModel's model. is PeftModel's base_model.model.
    inner.update({f"base_model.{n}": t for n, t in params.items() if f"base_model.{n}" in inner})
    adapters = peft.get_peft_model_state_dict(peft_model, state_dict=inner)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".adapters-") as scratch:
        config = peft_model.peft_config["default"]
        inference_mode = config.inference_mode
        config.inference_mode = True  # as peft saves it: loaded for inference unless asked otherwise
        try:
            config.save_pretrained(scratch)
        finally:
            config.inference_mode = inference_mode
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapters.items()}
        save_file(tensors, os.path.join(scratch, "adapter_model.safetensors"), metadata={"format": "pt"})
        for file in ("adapter_model.safetensors", "adapter_config.json"):
            os.replace(os.path.join(scratch, file), folder / file)
    return folder


def tiny_llama_config(vocab_size: int, *, context: int = 256, hidden: int = 64, layers: int = 2, **changes: Any):
    """The config of a small Llama (`transformers.LlamaConfig`): `hidden` wide (4 heads, an MLP
    twice as wide), `layers` deep, reading `context` tokens, pad id 0 unless `changes` say
    otherwise (with any other field of the config)."""
    transformers, _ = require()
    options: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": context,
        "pad_token_id": 0,
    }
    return transformers.LlamaConfig(**{**options, **changes})


def save_tiny_llama(
    folder: str | os.PathLike,
    texts: Iterable[str],
    *,
    classes: int | None = None,
    context: int = 256,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """A small Llama with random weights, built from a config, and a character tokenizer over the
    characters of `texts` (`fedforge.llm.tokenizer.char_tokenizer`), both saved with `save_pretrained`
    into `folder`: a model folder for `--model hf:FOLDER` with no download, for examples and tests.
    A causal LM, or with `classes` a sequence classifier with that many labels. `hidden` wide
    (4 heads, an MLP twice as wide), `layers` deep, reading `context` tokens."""
    transformers, _ = require()
    tokenizer = char_tokenizer(texts)
    config = tiny_llama_config(
        len(tokenizer),
        context=context,
        hidden=hidden,
        layers=layers,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=classes or 2,
    )
    kind = transformers.LlamaForSequenceClassification if classes else transformers.LlamaForCausalLM
    with torch.random.fork_rng(devices=[]), _quiet(transformers):
        torch.manual_seed(seed)
        kind(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


__all__ = [
    "CAUSAL_LM",
    "SEQUENCE_CLASSIFICATION",
    "HFModel",
    "build_hf_model",
    "check_model_folder",
    "check_sizes",
    "context_length",
    "default_targets",
    "load_tokenizer",
    "model_kind",
    "save_adapters",
    "save_tiny_llama",
    "tiny_llama_config",
]
