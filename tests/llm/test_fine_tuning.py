"""Fine-tuning from the command line: `--model hf:PATH --task causal-lm|sequence-classification`
with text data (jsonl:, csv:, shakespeare-text), the tokenizer and context taken from the model
folder; the strategies, differential privacy and precision on adapters; bad input is one line and
exit status 2. A tiny Llama with random weights saved into a tmp folder, never a download."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

import fedforge as ff
from fedforge.algorithms import Roles, nbytes
from fedforge.cli import main
from fedforge.llm.models import build_hf_model, save_tiny_llama
from fedforge.llm.settings import LlmSettings
from fedforge.llm.text import TextOptions, sentiment_rows, text_dataset
from fedforge.privacy import DifferentialPrivacy

SCENES = Path(__file__).parents[2] / "examples" / "data" / "shakespeare_scenes.txt"
ROWS = sentiment_rows(120, num_users=4)
ADAPTERS = 2 * 2 * 2 * 8 * 64  # 2 layers x (q, v) x (A, B) x rank 8 x hidden 64


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama causal LM (context 64) whose tokenizer knows the scenes' and the reviews'
    characters, a classifier of 2 labels, and the reviews as JSON Lines and CSV."""
    root = tmp_path_factory.mktemp("fine-tuning")
    texts = [SCENES.read_text(), *ROWS["text"], "Below is an instruction ###:"]
    save_tiny_llama(root / "llama", texts, context=64)
    save_tiny_llama(root / "classifier", texts, classes=2, context=64)
    with open(root / "reviews.jsonl", "w") as f:
        for i in range(len(ROWS["text"])):
            f.write(json.dumps({k: ROWS[k][i] for k in ROWS}) + "\n")
    with open(root / "reviews.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "user"])
        writer.writerows(zip(ROWS["text"], ROWS["label"], ROWS["user"], strict=True))
    return root


def fedforge(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own exit
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run(capsys, tmp_path: Path, files: Path, *argv: str, model: str = "llama") -> tuple[int, str, str]:
    return fedforge(
        capsys,
        "run",
        *("--model", f"hf:{files / model}", "--lora-rank", "8", "--lora-targets", "q_proj,v_proj"),
        *("--optimizer", "adamw", "--lr", "0.01", "--batch-size", "8"),
        *("--out-dir", str(tmp_path), "--name", "run", "--quiet"),
        *argv,
    )


def history(tmp_path: Path) -> list[dict]:
    return json.loads((tmp_path / "run" / "history.json").read_text())["rounds"]


def test_causal_lm_on_json_lines_one_client_per_user_sends_only_the_adapters(capsys, tmp_path, files):
    code, _out, err = run(
        capsys,
        tmp_path,
        files,
        *("--task", "causal-lm", "--dataset", f"jsonl:{files / 'reviews.jsonl'}", "--group-column", "user"),
        *("--partition", "natural", "--num-clients", "4", "--clients-per-round", "2", "--rounds", "2"),
    )
    assert code == 0, err
    rounds = history(tmp_path)
    perplexity = [r["metrics"]["test_perplexity"] for r in rounds]
    assert perplexity[-1] < perplexity[0]
    params = torch.load(tmp_path / "run" / "model.pt")
    assert all(".lora_" in n for n in params) and nbytes(params) == ADAPTERS * 4
    assert [r["metrics"]["payload_up"] for r in rounds[1:]] == [2 * nbytes(params)] * 2
    saved = (tmp_path / "run" / "config.toml").read_text()
    assert 'group_column = "user"' in saved and 'task = "causal-lm"' in saved


def test_sequence_classification_on_csv_by_label_from_a_toml_file(capsys, tmp_path, files):
    (tmp_path / "run.toml").write_text(
        f'dataset = "csv:{files / "reviews.csv"}"\ntask = "sequence-classification"\n'
        'partition = "dirichlet"\nnum_clients = 3\nclients_per_round = 3\nrounds = 1\n'
        '[text]\nlabel_column = "label"\nmax_length = 48\npadding = "max_length"\n'
    )
    code, _, err = run(capsys, tmp_path, files, "--config", str(tmp_path / "run.toml"), model="classifier")
    assert code == 0, err
    params = torch.load(tmp_path / "run" / "model.pt")
    assert [n for n in params if ".lora_" not in n] == ["model.score.modules_to_save.default.weight"]
    assert 0 <= history(tmp_path)[-1]["test_accuracy"] <= 1


def test_instruction_tuning_from_csv_columns(capsys, tmp_path, files):
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "answer"])
        writer.writerows([(f"is {t} good", lab) for t, lab in zip(ROWS["text"][:20], ROWS["label"], strict=False)])
    code, _, err = run(
        capsys,
        tmp_path,
        files,
        *("--task", "causal-lm", "--dataset", f"csv:{tmp_path / 'pairs.csv'}"),
        *("--instruction-column", "question", "--response-column", "answer", "--prompt-template", "{question}:"),
        *("--num-clients", "2", "--clients-per-round", "2", "--rounds", "1"),
    )
    assert code == 0, err


def test_shakespeare_text_gives_one_client_per_role(capsys, tmp_path, files):
    flags = ("--task", "causal-lm", "--dataset", f"shakespeare-text:{SCENES}", "--partition", "natural")
    code, _, err = run(
        capsys, tmp_path, files, *flags, "--num-clients", "3", "--clients-per-round", "3", "--truncation"
    )
    assert code == 2 and "num_clients must be 16, the number of groups in the data" in err
    code, _, err = run(capsys, tmp_path, files, *flags, "--num-clients", "16", "--truncation", "--rounds", "1")
    assert code == 0, err


@pytest.mark.parametrize(
    "argv, message",
    [
        # The scenes' rows are up to 200 characters, the model reads 64 tokens.
        (
            ["--task", "causal-lm", "--dataset", f"shakespeare-text:{SCENES}", "--clients-per-round", "2"],
            "tokens, more than the model's context (64 tokens); ask for truncation (--truncation)",
        ),
        (
            ["--task", "causal-lm", "--dataset", f"shakespeare-text:{SCENES}", "--max-length", "65", "--truncation"],
            "max_length 65 is more than the model's context (64 tokens)",
        ),
        (
            ["--task", "classification", "--dataset", "jsonl:{files}/reviews.jsonl"],
            "is text: train it with --task causal-lm or sequence-classification, not 'classification'",
        ),
        (
            ["--task", "sequence-classification", "--dataset", "jsonl:{files}/reviews.jsonl"],
            "task sequence-classification needs a label column (--label-column)",
        ),
        (
            ["--task", "causal-lm", "--dataset", "jsonl:{files}/reviews.jsonl", "--text-column", "review"],
            "reviews.jsonl, line 1: no column 'review'",
        ),
        (["--task", "causal-lm", "--dataset", "jsonl:{files}/missing.jsonl"], "missing.jsonl does not exist"),
        (
            ["--task", "causal-lm", "--dataset", "jsonl:{files}/reviews.jsonl", "--padding", "shortest"],
            "unknown padding 'shortest' (choose from: longest, max_length)",
        ),
        (
            ["--task", "causal-lm", "--dataset", "jsonl:{files}/reviews.jsonl", "--response-column", "label"],
            "instruction tuning needs both an instruction and a response column",
        ),
        (["--dataset", "digits", "--text-column", "review"], "text_column is a setting of text data"),
        (
            ["--task", "causal-lm", "--dataset", f"shakespeare-text:{SCENES}", "--model", "mlp"],
            "lora_targets is a setting of hf: models",
        ),
        (
            ["--task", "causal-lm", "--dataset", "jsonl:{files}/reviews.jsonl", "--strategy", "krum"],
            "strategy krum cannot run with personal or frozen entries",
        ),
        (
            ["--task", "causal-lm", "--dataset", "jsonl:{files}/reviews.jsonl", "--strategy", "median"],
            "strategy median cannot run with personal or frozen entries",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, files, argv, message):
    code, _out, err = run(capsys, tmp_path, files, *(a.format(files=files) for a in argv))
    assert code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 is refused on the CPU only")
def test_bf16_on_the_cpu_is_refused_in_one_line(capsys, tmp_path, files):
    code, _, err = run(capsys, tmp_path, files, "--task", "causal-lm", "--dataset", "jsonl:x", "--precision", "bf16")
    assert code == 2 and "precision bf16 is for CUDA" in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "strategy", [["fedavg"], ["fedavgm", "--server-momentum", "0.5"], ["fedadam", "--server-lr", "0.01"], ["fedprox"]]
)
def test_the_averaging_strategies_run_unchanged_on_adapters(capsys, tmp_path, files, strategy):
    code, _, err = run(
        capsys,
        tmp_path,
        files,
        *("--task", "sequence-classification", "--dataset", f"jsonl:{files / 'reviews.jsonl'}"),
        *("--label-column", "label", "--num-clients", "3", "--clients-per-round", "3", "--rounds", "2"),
        *("--strategy", *strategy),
        model="classifier",
    )
    assert code == 0, err
    params = torch.load(tmp_path / "run" / "model.pt")
    assert len(params) == 9 and all(v.dtype == torch.float32 for v in params.values())  # 8 adapters, the head
    assert history(tmp_path)[-1]["metrics"]["payload_up"] == 3 * nbytes(params)


def _reviews_data(files: Path, clients: int) -> ff.FederatedData:
    from fedforge.llm.models import load_tokenizer

    tokenizer = load_tokenizer(f"hf:{files / 'llama'}")
    dataset = text_dataset({"all": ROWS}, tokenizer, task="causal-lm", options=TextOptions(), context=64)
    return ff.FederatedData(dataset.train, np.array_split(np.arange(len(dataset.train)), clients), dataset.test)


def test_dp_clips_and_noises_exactly_the_adapters_update(files):
    """Central DP on one round of two clients: the new adapters are the initial ones plus the mean
    of the clients' adapter updates, each clipped to C over the adapters alone, plus noise of std
    z C / m on each adapter entry, and nothing else moves."""
    data = _reviews_data(files, 2)
    settings = LlmSettings(lora_rank=8, lora_targets="q_proj,v_proj")
    model = build_hf_model(f"hf:{files / 'llama'}", targets="tokens", num_classes=60, seed=0, settings=settings)
    initial = {n: model.state_dict()[n].clone() for n in Roles().assign(model).shared}
    client = ff.ClientConfig(batch_size=8, lr=0.01, task=ff.make_task("causal-lm", optimizer="adamw"))
    updates: list = []
    plain = ff.simulate(model, data, rounds=1, clients_per_round=2, client=client, on_client=updates.append)
    norms = [torch.cat([d.reshape(-1) for d in u.delta.values()]).norm() for u in updates]
    assert len(updates) == 2 and all(u.delta.keys() == initial.keys() for u in updates)
    clip, z = float(min(norms)) / 4, 1e-3  # both clipped
    privacy = DifferentialPrivacy(mode="central", clip=clip, noise_multiplier=z)
    noised = ff.simulate(model, data, rounds=1, clients_per_round=2, client=client, privacy=privacy)
    assert noised.state.params.keys() == initial.keys()
    expected = {n: sum(u.delta[n] * (clip / norm) for u, norm in zip(updates, norms, strict=True)) / 2 for n in initial}
    residual = torch.cat([(noised.state.params[n] - initial[n] - expected[n]).reshape(-1) for n in initial])
    assert residual.numel() == ADAPTERS
    assert residual.std().item() == pytest.approx(z * clip / 2, rel=0.1)  # the noise, on the adapters
    assert abs(residual.mean().item()) < 4 * z * clip / 2 / residual.numel() ** 0.5
    assert noised.history.records[-1].metrics["epsilon"] > 0  # the accountant as for any model
    assert plain.state.params.keys() == initial.keys()


def test_bf16_keeps_the_base_in_bfloat16_and_trains_float32_adapters(files):
    settings = LlmSettings(lora_rank=8, lora_targets="q_proj,v_proj", precision="bf16")
    for targets, classes in (("tokens", 60), ("classes", 2)):
        model = build_hf_model(f"hf:{files / 'llama'}", targets=targets, num_classes=classes, settings=settings)
        trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
        frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
        assert set(trained.values()) == {torch.float32} and set(frozen.values()) == {torch.bfloat16}
        assert set(trained) == set(Roles().assign(model).shared)


def test_the_round_loop_carries_a_bfloat16_base_and_float32_adapters(files):
    """The same code as on CUDA, run on the CPU from Python (the command line refuses bf16 there):
    the frozen bfloat16 base stays as it is, the adapters travel and are averaged in float32, and
    the run's loss is close to the float32 run's."""
    data = _reviews_data(files, 2)
    client = ff.ClientConfig(batch_size=8, lr=0.01, task=ff.make_task("causal-lm", optimizer="adamw"))
    losses = {}
    for precision in ("bf16", "float32"):
        settings = LlmSettings(lora_targets="q_proj,v_proj", precision=precision)
        model = build_hf_model(f"hf:{files / 'llama'}", targets="tokens", num_classes=60, settings=settings)
        result = ff.simulate(model, data, rounds=2, clients_per_round=2, client=client)
        assert {v.dtype for v in result.state.params.values()} == {torch.float32}
        losses[precision] = result.history.column("test_loss")
    assert losses["bf16"][-1] < losses["bf16"][0]
    assert losses["bf16"] == pytest.approx(losses["float32"], rel=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("engine", ["sequential", "auto"])
def test_bf16_on_cuda_trains_under_autocast_and_matches_float32_closely(capsys, tmp_path, files, engine):
    flags = (
        *("--task", "causal-lm", "--dataset", f"jsonl:{files / 'reviews.jsonl'}", "--device", "cuda"),
        *("--num-clients", "4", "--clients-per-round", "4", "--rounds", "3", "--engine", engine),
    )
    assert run(capsys, tmp_path / "bf16", files, *flags, "--precision", "bf16")[0] == 0
    assert run(capsys, tmp_path / "fp32", files, *flags)[0] == 0
    bf16, fp32 = history(tmp_path / "bf16"), history(tmp_path / "fp32")
    losses = [r["test_loss"] for r in bf16]
    assert losses[-1] < losses[0]
    assert losses[-1] == pytest.approx(fp32[-1]["test_loss"], rel=0.1)
    params = torch.load(tmp_path / "bf16" / "run" / "model.pt")
    assert all(v.dtype == torch.float32 for v in params.values())


def test_the_welcome_sends_the_text_settings_and_no_path_of_the_servers():
    from fedforge.network.welcome import References, check_welcome, welcome_header

    config = ff.Config(
        model="hf:/srv/secret/llama",
        task="causal-lm",
        dataset="jsonl:/srv/secret/chats.jsonl",
        instruction_column="question",
        response_column="answer",
        max_length=128,
        truncation=True,
    )
    header = welcome_header(config)
    assert "/srv" not in json.dumps(header)
    sent = header["config"]
    assert (sent["model"], sent["dataset"]) == ("hf:llama", "jsonl:chats.jsonl")
    assert (sent["instruction_column"], sent["response_column"], sent["max_length"], sent["truncation"]) == (
        "question",
        "answer",
        128,
        True,
    )
    welcome = check_welcome(header, References(model="hf:/home/me/llama"))
    assert welcome.config.group(ff.config.TextSettings) == config.group(ff.config.TextSettings)


def test_causal_lm_with_a_target_reads_token_rows_as_they_are(capsys, tmp_path, files):
    """An hf: dataset already tokenized, its labels the input ids with -100 where nothing is
    predicted (as transformers' examples write them): --target names them, the loss shifts them."""
    datasets = pytest.importorskip("datasets")
    data = _reviews_data(files, 1)
    rows = {"input_ids": data.train.x["input_ids"].tolist(), "attention_mask": data.train.x["attention_mask"].tolist()}
    datasets.Dataset.from_dict({**rows, "labels": data.train.y.tolist()}).save_to_disk(str(tmp_path / "tokens"))
    code, _, err = run(
        capsys,
        tmp_path,
        files,
        *("--task", "causal-lm", "--dataset", f"hf:{tmp_path / 'tokens'}", "--target", "labels"),
        *("--num-clients", "2", "--clients-per-round", "2", "--rounds", "1"),
    )
    assert code == 0, err
    first = history(tmp_path)[0]["metrics"]["test_perplexity"]
    assert 30 < first < 100  # the untrained model's, over the predicted tokens only (-100 ignored)
