"""--model hf:PATH with LoRA: tiny transformers built from configs with random weights, saved with
save_pretrained into tmp folders (never a download); only the adapters travel; peft loads what
--save-adapters writes; bad input is one line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PROCESS_S, bound

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from peft import PeftModel  # noqa: E402

import fedforge as ff  # noqa: E402
from fedforge.algorithms import FROZEN, SHARED, Roles, nbytes  # noqa: E402
from fedforge.cli import main  # noqa: E402
from fedforge.errors import ConfigError  # noqa: E402
from fedforge.llm.models import (  # noqa: E402
    HFModel,
    build_hf_model,
    check_model_folder,
    context_length,
    load_tokenizer,
    save_adapters,
    tiny_llama_config,
)
from fedforge.llm.settings import LlmSettings  # noqa: E402
from fedforge.llm.text import char_tokenizer  # noqa: E402
from fedforge.tasks import CLASSIFICATION, LANGUAGE_MODEL  # noqa: E402

# peft's PeftModel.from_pretrained (the tests' loading of the saved adapters) asks transformers a deprecated question.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TEXT = "abcdefghijklmnopqrstuvwxyz .,;!?\n"
LENGTH = 24


def _config(vocab_size: int, **changes) -> transformers.LlamaConfig:
    return tiny_llama_config(vocab_size, context=64, **changes)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama causal LM and a tiny Llama classifier (3 labels), each with a char tokenizer."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = char_tokenizer([TEXT])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(_config(len(tokenizer))).save_pretrained(root / "llama")
        classifier = transformers.LlamaForSequenceClassification(_config(len(tokenizer), num_labels=3))
        classifier.save_pretrained(root / "classifier")
    for name in ("llama", "classifier"):
        tokenizer.save_pretrained(root / name)
    return root


def _tokens(n: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of a repeating 6-token motif at random phases: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(4, vocab, (6,), generator=g)
    phases = torch.randint(0, 6, (n,), generator=g)
    rows = torch.stack([motif.roll(-int(p)).repeat(LENGTH // 6 + 1)[: LENGTH + 1] for p in phases])
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def _lm_data(vocab: int) -> ff.FederatedData:
    x, y = _tokens(240, vocab, seed=0)
    inputs = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    train = ff.TensorData({k: v[:200] for k, v in inputs.items()}, y[:200])
    test = ff.TensorData({k: v[200:] for k, v in inputs.items()}, y[200:])
    return ff.FederatedData(train, np.array_split(np.arange(200), 4), test)


def test_the_same_seed_builds_the_same_adapters_and_only_they_are_shared(folders):
    torch.set_num_threads(1)
    vocab = len(load_tokenizer(f"hf:{folders / 'llama'}"))
    one, two = (build_hf_model(f"hf:{folders / 'llama'}", targets="tokens", num_classes=vocab, seed=3) for _ in "12")
    other = build_hf_model(f"hf:{folders / 'llama'}", targets="tokens", num_classes=vocab, seed=4)
    assert isinstance(one, HFModel) and one.kind == "causal-lm"
    a, b, c = one.state_dict(), two.state_dict(), other.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lora_a = "model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert not torch.equal(a[lora_a], c[lora_a])  # the seed draws the adapters
    base = "model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert torch.equal(a[base], c[base])  # the base is the folder's
    roles = Roles().assign(one)
    assert roles.shared == [n for n in a if ".lora_" in n] and len(roles.shared) == 8  # 2 layers x (q, v) x (A, B)
    assert all(roles.roles[n] == FROZEN for n in a if ".lora_" not in n)
    x = torch.randint(0, vocab, (2, 5))
    assert one(x).shape == (2, 5, vocab) == one(input_ids=x, attention_mask=torch.ones_like(x)).shape


def test_only_the_adapters_travel_and_the_loss_falls(folders, tmp_path):
    torch.set_num_threads(1)
    vocab = len(load_tokenizer(f"hf:{folders / 'llama'}"))
    settings = LlmSettings(lora_rank=4, lora_alpha=8, lora_targets="q_proj,k_proj,v_proj,o_proj")
    model = build_hf_model(f"hf:{folders / 'llama'}", targets="tokens", num_classes=vocab, seed=0, settings=settings)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = {n: initial[n] for n in Roles().assign(model).shared}
    assert len(adapters) == 2 * 4 * 2 and nbytes(adapters) == 2 * 4 * 2 * 4 * 64 * 4  # r=4, float32
    client = ff.ClientConfig(batch_size=16, lr=0.02, task=LANGUAGE_MODEL.with_optimizer("adamw"))
    result = ff.simulate(model, _lm_data(vocab), rounds=3, clients_per_round=2, client=client, seed=0)
    records = result.history.records
    assert [r.metrics["payload_up"] for r in records[1:]] == [2 * nbytes(adapters)] * 3
    assert [r.metrics["payload_down"] for r in records[1:]] == [2 * nbytes(adapters)] * 3
    losses = [r.test_loss for r in records]
    assert losses[-1] < losses[0] - 0.3 and losses == sorted(losses, reverse=True)
    assert result.state.params.keys() == adapters.keys()
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())  # simulate leaves the model as it was

    # peft's format: PeftModel.from_pretrained puts the run's adapters onto the base.
    save_adapters(model, result.state.params, tmp_path / "adapters")
    assert sorted(os.listdir(tmp_path / "adapters")) == ["adapter_config.json", "adapter_model.safetensors"]
    base = transformers.AutoModelForCausalLM.from_pretrained(folders / "llama")
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapters").state_dict()
    for name, value in result.state.params.items():
        torch.testing.assert_close(loaded[f"base_model.{name}"], value, rtol=0, atol=0)


def test_a_classifier_trains_its_head_beside_the_adapters(folders, tmp_path):
    torch.set_num_threads(1)
    model = build_hf_model(f"hf:{folders / 'classifier'}", targets="classes", num_classes=3, seed=0)
    assert model.kind == "sequence-classification"
    shared = Roles().assign(model).shared
    assert [n for n in shared if ".lora_" not in n] == ["model.score.modules_to_save.default.weight"]
    # A causal LM's folder gives a classifier too: a new head, drawn from the seed.
    new = [build_hf_model(f"hf:{folders / 'llama'}", targets="classes", num_classes=5, seed=0) for _ in "12"]
    head = "model.score.modules_to_save.default.weight"
    assert new[0].state_dict()[head].shape == (5, 64) and torch.equal(
        new[0].state_dict()[head], new[1].state_dict()[head]
    )

    g = torch.Generator().manual_seed(0)
    x = torch.randint(4, 30, (120, 12), generator=g)
    y = (x[:, 0] % 3).long()
    x[:, 10:] = 0  # padding at the right, masked
    mask = (x != 0).long()
    data = ff.FederatedData(
        ff.TensorData({"input_ids": x, "attention_mask": mask}, y), np.array_split(np.arange(120), 3)
    )
    client = ff.ClientConfig(batch_size=20, lr=0.01, task=CLASSIFICATION.with_optimizer("adamw"))
    result = ff.simulate(model, data, rounds=2, clients_per_round=3, client=client, seed=0, eval_train=True)
    assert result.history.records[-1].metrics["payload_up"] == 3 * nbytes({n: model.state_dict()[n] for n in shared})
    save_adapters(model, result.state.params, tmp_path / "adapters")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(folders / "classifier")
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapters").state_dict()
    for name, value in result.state.params.items():
        torch.testing.assert_close(loaded[f"base_model.{name}"], value, rtol=0, atol=0)


def _save_hf_dataset(path: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    columns = {"input_ids": x.tolist(), "attention_mask": torch.ones_like(x).tolist(), "labels": y.tolist()}
    datasets.Dataset.from_dict(columns).save_to_disk(str(path))


def fedforge(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own exit
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_command_line_runs_lora_and_saves_the_adapters(folders, tmp_path, capsys):
    torch.set_num_threads(1)
    vocab = len(load_tokenizer(f"hf:{folders / 'llama'}"))
    _save_hf_dataset(tmp_path / "tokens", *_tokens(160, vocab, seed=1))
    (tmp_path / "run.toml").write_text(
        "[llm]\nlora_rank = 4\nlora_alpha = 8.0\nlora_targets = 'q_proj,v_proj'\n"
        f"save_adapters = '{tmp_path / 'adapters'}'\n"
    )
    code, out, err = fedforge(
        capsys,
        "run",
        "--config",
        str(tmp_path / "run.toml"),
        "--dataset",
        f"hf:{tmp_path / 'tokens'}",
        "--target",
        "labels",
        "--task",
        "language-model",
        "--model",
        f"hf:{folders / 'llama'}",
        "--optimizer",
        "adamw",
        "--lr",
        "0.02",
        "--batch-size",
        "16",
        "--rounds",
        "2",
        "--num-clients",
        "4",
        "--clients-per-round",
        "2",
        "--out-dir",
        str(tmp_path / "runs"),
        "--name",
        "lora",
        "--quiet",
    )
    assert code == 0 and "after 2 rounds" in out, err
    run = tmp_path / "runs" / "lora"
    history = json.loads((run / "history.json").read_text())
    params = torch.load(run / "model.pt")
    assert all(".lora_" in n for n in params) and len(params) == 8
    assert [r["metrics"]["payload_up"] for r in history["rounds"][1:]] == [2 * nbytes(params)] * 2
    assert "lora_rank = 4" in (run / "config.toml").read_text()
    base = transformers.AutoModelForCausalLM.from_pretrained(folders / "llama")
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapters").state_dict()
    assert all(torch.equal(loaded[f"base_model.{n}"], v) for n, v in params.items())


@pytest.fixture(scope="module")
def token_data(tmp_path_factory, folders):
    path = tmp_path_factory.mktemp("data") / "tokens"
    _save_hf_dataset(path, *_tokens(40, 30, seed=2))
    return path


def _bad_folder(root: Path, name: str, config: str | None) -> Path:
    folder = root / name
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config)
    return folder


@pytest.mark.parametrize(
    "config, message",
    [
        (None, "has no config.json: it is not a transformers model"),
        ("{not json", "config.json is not valid JSON"),
        ('{"hidden_size": 64}', "config.json names no model_type: it is not a transformers model"),
        ('{"model_type": "llama", "vocab_size": 1e12}', "config.json's vocab_size must be an integer in [1, 4194304]"),
        ('{"model_type": "llama", "num_hidden_layers": -1}', "num_hidden_layers must be an integer in [1, 1024]"),
        ('{"model_type": "nobody-knows", "auto_map": {"AutoConfig": "x.Y"}}', "cannot be loaded"),
    ],
)
def test_a_folder_that_is_no_transformers_model_is_one_line(tmp_path, capsys, token_data, config, message):
    folder = _bad_folder(tmp_path, "model", config)
    code, _, err = fedforge(capsys, *_run_args(token_data, tmp_path, f"hf:{folder}"))
    assert code == 2 and err.count("\n") == 1 and message in err, err


def _run_args(data: Path, tmp_path: Path, model: str, *extra: str) -> list[str]:
    return [
        "run",
        "--dataset",
        f"hf:{data}",
        "--target",
        "labels",
        "--task",
        "language-model",
        "--model",
        model,
        "--num-clients",
        "2",
        "--clients-per-round",
        "2",
        "--rounds",
        "1",
        "--out-dir",
        str(tmp_path / "runs"),
        "--quiet",
        *extra,
    ]


def test_a_lora_target_that_names_no_module_is_one_line(folders, tmp_path, capsys, token_data):
    code, _, err = fedforge(
        capsys, *_run_args(token_data, tmp_path, f"hf:{folders / 'llama'}", "--lora-targets", "qkv")
    )
    assert code == 2 and err.count("\n") == 1
    assert "lora target 'qkv' names no module of model hf:" in err and "q_proj, k_proj, v_proj, o_proj" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lora-rank", "4"], "lora_rank is a setting of hf: models (--model hf:PATH), not of 'mlp'"),
        (["--model", "hf:x/y", "--lora-rank", "-1"], "lora_rank must be between 0 and 4096, got -1"),
        (["--model", "hf:x/y", "--lora-dropout", "1"], "lora_dropout must be in [0, 1), got 1.0"),
        (["--model", "hf:x/y", "--lora-targets", "q_proj;v_proj"], "lora_targets are module names separated by commas"),
        (["--model", "hf:x/y", "--lora-rank", "0", "--save-adapters", "a"], "save_adapters needs adapters"),
        (["--model", "hf:"], "model hf: needs a folder written by save_pretrained or a hub name"),
    ],
)
def test_bad_lora_settings_are_one_line(capsys, tmp_path, argv, message):
    code, _, err = fedforge(capsys, "run", "--out-dir", str(tmp_path), *argv)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_a_hub_name_offline_is_one_line(tmp_path, token_data):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = _run_args(token_data, tmp_path, "hf:nobody-here/no-such-model")
    done = subprocess.run(
        [sys.executable, "-m", "fedforge", *argv], capture_output=True, text=True, env=env, timeout=bound(PROCESS_S)
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "model hf:nobody-here/no-such-model: no such folder, and the Hugging Face Hub could not provide it" in (
        done.stderr
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ("frobnicator", "model type `frobnicator` but Transformers does not recognize this architecture"),
        ("no tokenizer", "has no tokenizer (save one beside it with tokenizer.save_pretrained)"),
    ],
)
def test_a_folder_transformers_cannot_load_is_one_line_on_stderr(folders, tmp_path, change, message):
    """In a process of its own: transformers' warnings go to the stderr its logger was made with,
    which capsys does not see. Text data, so that the tokenizer is needed."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": TEXT[i : i + 8]}) + "\n" for i in range(10)))
    folder = tmp_path / "model"
    folder.mkdir()
    config = json.loads((folders / "llama" / "config.json").read_text())
    for name in (folders / "llama").iterdir():
        if change != "no tokenizer" or not name.name.startswith("tokenizer"):
            (folder / name.name).write_bytes(name.read_bytes())
    if change == "frobnicator":
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "frobnicator"}))
    argv = ["run", "--model", f"hf:{folder}", "--task", "causal-lm", "--dataset", f"jsonl:{rows}", "--rounds", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "fedforge", *argv, "--out-dir", str(tmp_path / "runs"), "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=bound(PROCESS_S),
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def test_without_peft_the_run_says_how_to_install_it(folders, tmp_path, token_data):
    argv = _run_args(token_data, tmp_path, f"hf:{folders / 'llama'}")
    script = (
        "import sys; sys.modules['peft'] = None\n"  # an import of peft now raises ImportError, as when missing
        "from fedforge.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=bound(PROCESS_S),
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--model hf: needs peft, which is not installed: pip install 'fedforge[llm]'" in done.stderr


def test_check_model_folder_returns_the_config(folders):
    assert check_model_folder(folders / "llama")["model_type"] == "llama"
    with pytest.raises(ConfigError, match="is a file"):
        build_hf_model(f"hf:{folders / 'llama' / 'config.json'}", targets="tokens", num_classes=10)
    with pytest.raises(ConfigError, match="targets are tokens"):
        build_hf_model(f"hf:{folders / 'llama'}", targets="numbers", num_classes=1)
    with pytest.raises(ConfigError, match="predicts 37 tokens, but the data's tokens go up to 1000"):
        build_hf_model(f"hf:{folders / 'llama'}", targets="tokens", num_classes=1000)


def test_roles_of_full_fine_tuning(folders):
    model = build_hf_model(
        f"hf:{folders / 'llama'}", targets="tokens", num_classes=10, settings=LlmSettings(lora_rank=0)
    )
    assert set(Roles().assign(model).roles.values()) == {SHARED}
    with pytest.raises(ConfigError, match="no adapters to save"):
        save_adapters(model, {}, "unused")


def test_a_deployment_client_loads_its_own_copy_and_trains_the_servers_adapters():
    from fedforge.config import Config
    from fedforge.network.welcome import References, Unacceptable, check_welcome, welcome_header

    header = welcome_header(Config(model="hf:/srv/secret/llama", lora_rank=4, lora_targets="q_proj,k_proj"))
    assert header["config"]["model"] == "hf:llama" and "/srv" not in json.dumps(header)  # no path of the server's
    assert header["config"]["lora_rank"] == 4 and header["config"]["lora_targets"] == "q_proj,k_proj"
    with pytest.raises(Unacceptable, match="give --model hf:PATH, this client's copy of the same model"):
        check_welcome(header, References())
    welcome = check_welcome(header, References(model="hf:/home/me/llama"))
    assert welcome.config.model == "hf:/home/me/llama" and welcome.server_model == "hf:llama"
    assert (welcome.config.lora_rank, welcome.config.lora_targets) == (4, "q_proj,k_proj")


def test_sequences_longer_than_the_context_are_refused(folders):
    assert context_length(f"hf:{folders / 'llama'}") == 64
    with pytest.raises(ConfigError, match=r"reads at most 64 tokens .* the data's sequences are 65 long: truncate"):
        ff.build_model(f"hf:{folders / 'llama'}", (65,), 30, task=LANGUAGE_MODEL)
    assert ff.build_model(f"hf:{folders / 'llama'}", (64,), 30, task=LANGUAGE_MODEL).kind == "causal-lm"


def test_a_copy_keeps_its_adapters_to_itself(folders, tmp_path):
    """The engines copy the model (deepcopy; Ray pickles it): the copy's peft wrapper is the copy's."""
    import copy
    import pickle

    model = build_hf_model(f"hf:{folders / 'llama'}", targets="tokens", num_classes=30, seed=0)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.peft_model.base_model.model is clone.model
        name = "model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
        with torch.no_grad():
            clone.get_parameter(name).fill_(1.0)
        assert not torch.equal(model.state_dict()[name], clone.state_dict()[name])
        save_adapters(clone, {}, tmp_path / "copy")
        loaded = PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(folders / "llama"), tmp_path / "copy"
        ).state_dict()
        assert torch.equal(loaded[f"base_model.{name}"], torch.ones_like(loaded[f"base_model.{name}"]))


def test_leave_to_run_a_models_code_is_never_saved_with_the_run():
    from fedforge.checkpoint import EXECUTION_KEYS
    from fedforge.config import Config

    config = Config(model="hf:x/y", trust_remote_code=True, save_adapters="adapters")
    assert "trust_remote_code" not in config.to_toml() and "save_adapters" in config.to_toml()
    assert {"trust_remote_code", "save_adapters"} <= EXECUTION_KEYS  # a resume may change them
