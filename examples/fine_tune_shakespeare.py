"""Federated LoRA fine-tuning of a small Llama on Shakespeare, one client per speaking role.

Runs anywhere, with no download: a Llama-architecture model (2 layers, hidden 64) is built from a
config with random weights and saved with `save_pretrained`, beside a character tokenizer, into a
model folder (`fedforge.llm.models.save_tiny_llama`). The bundled scenes
(examples/data/shakespeare_scenes.txt) become plain-text rows, each role's lines its client's
(`--dataset shakespeare-text:FILE --partition natural`); the `causal-lm` task trains LoRA
adapters of rank 8 on the attention's four projections while the base stays frozen, and only the
adapters travel. The test perplexity falls round by round. Prints the run's time and the
`fedforge run` command that does the same on the saved model folder.

    pip install 'fedforge[llm]'
    python examples/fine_tune_shakespeare.py [--rounds 5] [--model-dir DIR]
"""

import argparse
import shlex
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fedforge as ff
from fedforge.data import load
from fedforge.llm.models import save_tiny_llama
from fedforge.llm.text import shakespeare_rows

SCENES = Path(__file__).parent / "data" / "shakespeare_scenes.txt"


def main(rounds: int, model_dir: Path, out_dir: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    save_tiny_llama(model_dir, shakespeare_rows(SCENES.read_text())["text"])
    settings = {
        "model": f"hf:{model_dir}",
        "task": "causal-lm",
        "dataset": f"shakespeare-text:{SCENES}",
        "lora_rank": 8,
        "lora_alpha": 16.0,
        "lora_targets": "q_proj,k_proj,v_proj,o_proj",
        "optimizer": "adamw",
        "lr": 0.01,
        "batch_size": 4,
        "rounds": rounds,
        "clients_per_round": 8,
        "out_dir": str(out_dir),
        "name": "shakespeare-lora",
        "quiet": True,
    }
    # One client per role of the training rows: the natural partition needs their count.
    dataset = load(settings["dataset"], ff.Config(**settings).data_request(progress=False))
    roles = len(np.unique(dataset.groups))
    config = ff.Config(**settings, partition="natural", num_clients=roles)
    print(f"{roles} roles, {len(dataset.train)} training and {len(dataset.test)} test rows; model in {model_dir}")
    ff.run_experiment(config, progress=False)
    print(f"took {time.perf_counter() - start:.1f} s, the model's making included")
    print("the same from the command line (--model-dir DIR keeps the model folder):\n  " + command(config, settings))


def command(config: ff.Config, settings: dict) -> str:
    """The `fedforge run` command line of `config`'s settings that `settings` names."""
    words = ["fedforge", "run"]
    for key in (*settings, "partition", "num_clients"):
        if key not in ("quiet", "out_dir", "name"):
            words += [f"--{key.replace('_', '-')}", str(getattr(config, key))]
    return shlex.join(words)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model-dir", type=Path, help="where to save the model (default: a temporary folder)")
    parser.add_argument("--out-dir", type=Path, help="where the run's outputs go (default: a temporary folder)")
    # Small matrices: one thread is fastest, and two on a loaded 2-core machine were 20x slower.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        main(
            args.rounds,
            args.model_dir or Path(scratch) / "tiny-llama",
            args.out_dir or Path(scratch) / "runs",
            args.threads,
        )
