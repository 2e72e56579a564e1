"""Federated next-character prediction on Shakespeare, one client per speaking role (LEAF).

LEAF's Shakespeare task (Caldas et al. 2018) on a few scenes bundled with this example
(examples/data/shakespeare_scenes.txt: public-domain text laid out as Project Gutenberg's
Complete Works, which `fedforge.data.shakespeare` parses by LEAF's rules, as it does the real
file): each role with enough lines is a client (the `natural` partition), every 80 characters of
its speeches an example, its first 80 % training and the rest test. LEAF's char-LSTM (embedding
8, two LSTM layers of 256) learns to predict the next character at every position; FedAvg,
2 roles a round, SGD with LEAF's lr 0.8 and batches of 10. Prints the test loss and perplexity
per round. The untrained model's perplexity is about 80 (near uniform over the 80 symbols).

    python examples/shakespeare_char_lstm.py [--rounds 3]

The full dataset, downloaded and checked against its MD5:
    fedforge --dataset shakespeare --task language-model --model char-lstm --partition natural --num-clients N
(N the number of roles: fedforge names it if another number is given).
"""

import argparse
from pathlib import Path

import torch

import fedforge as ff
from fedforge.data.partition import natural
from fedforge.data.shakespeare import kept_roles, parse_roles, to_dataset
from fedforge.models import build_model
from fedforge.tasks import make_task

TEXT = Path(__file__).parent / "data" / "shakespeare_scenes.txt"


def main(rounds: int, threads: int) -> ff.SimulationResult:
    torch.set_num_threads(threads)
    roles = parse_roles(TEXT.read_text())
    dataset = to_dataset(roles)
    speakers = kept_roles(roles)
    print(
        f"{len(speakers)} roles of {len(roles)} keep test examples: {len(dataset.train)} training and "
        f"{len(dataset.test)} test examples of 80 characters"
    )
    data = ff.FederatedData(dataset.train, natural(dataset.groups, len(speakers)), dataset.test)
    model = build_model("char-lstm", dataset.input_shape, dataset.num_classes, seed=0)
    config = ff.ClientConfig(local_epochs=1, batch_size=10, lr=0.8, task=make_task("language-model"))

    def report(record, state):
        m = record.metrics
        clients = ", ".join(speakers[c] for c in record.clients) or "none yet"
        print(
            f"round {record.round}  test loss {record.test_loss:.3f}  perplexity {m['test_perplexity']:6.2f}  "
            f"token accuracy {m['test_token_accuracy']:.3f}  ({clients})",
            flush=True,
        )

    return ff.simulate(model, data, rounds=rounds, clients_per_round=2, client=config, on_round=report)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    # Batches of 10 sequences gain little from a second thread, and a shared CPU makes two
    # threads wait on each other (47-100 ms a step on one thread vs 0.3-3.5 s on two, measured
    # while other jobs ran on this 2-core machine).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    main(args.rounds, args.threads)
