"""The Ray engine on two nodes (`ray.cluster_utils.Cluster`: two raylets on this machine), one worker on each."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402
from ray_problem import SEED, WORKER_ENV, assert_same_run, blobs_data, run  # noqa: E402

from fedforge.engines import AutoEngine  # noqa: E402
from fedforge.engines.ray import RayEngine  # noqa: E402


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", runtime_env=WORKER_ENV)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_nodes_give_the_in_process_run(two_nodes):
    # The address is checked as a user's would be (a gRPC answer within the bound); the connection is kept.
    with RayEngine(blobs_data, seed=SEED, workers=2, cpus_per_worker=1, address=two_nodes.address) as engine:
        assert len({p["node"] for p in engine.placement}) == 2
        for strategy in ("fedavg", "krum"):
            assert_same_run(run(engine, strategy), run(AutoEngine(), strategy))
