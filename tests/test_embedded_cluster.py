"""relay.embedded_cluster: the loopback Redis Cluster the tests and the benchmark start."""

from __future__ import annotations

import os
import signal

import pytest
import redis

from relay.embedded import wait_until
from relay.embedded_cluster import EmbeddedCluster, parse_cluster_nodes
from relay.redis import address

pytest_plugins = ["cluster_fixtures"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_parse_cluster_nodes_skips_failing_nodes_and_reads_slot_ranges() -> None:
    text = (
        "a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460 7000 [5461->-b2]\n"
        "b2 127.0.0.1:7002@17002,host master,fail - 0 0 2 connected\n"
        "c3 127.0.0.1:7003@17003 slave a1 0 0 1 connected\n"
    )
    primary, replica = parse_cluster_nodes(text)
    assert (primary.port, primary.primary_id, primary.slots) == (
        7001,
        None,
        ((0, 5460), (7000, 7000)),
    )
    assert primary.serves(7000) and not primary.serves(5461)
    assert (replica.host, replica.port, replica.primary_id, replica.slots) == (
        "127.0.0.1",
        7003,
        "a1",
        (),
    )


def test_a_cluster_of_three_primaries_serves_every_slot(redis_cluster: EmbeddedCluster) -> None:
    where = address.parse(redis_cluster.url)
    assert where.kind == "cluster"
    assert [port for _, port in where.nodes] == [port for _, port, _ in redis_cluster.nodes]
    primaries = redis_cluster.primaries()
    assert len(primaries) == 3 and redis_cluster.replicas() == []
    assert sum(last - first + 1 for m in primaries for first, last in m.slots) == 16384
    node_url = redis_cluster.node_url(primaries[0].port)
    with redis.Redis.from_url(node_url, decode_responses=True) as one:
        assert one.config_get("save") == {"save": ""}
        assert one.config_get("appendonly") == {"appendonly": "no"}


@pytest.mark.failover
def test_a_killed_primary_is_replaced_by_its_replica(
    redis_cluster_with_replicas: EmbeddedCluster,
) -> None:
    cluster = redis_cluster_with_replicas
    primaries, replicas = cluster.primaries(), cluster.replicas()
    assert len(primaries) == 3 and len(replicas) == 3
    assert {r.primary_id for r in replicas} == {p.node_id for p in primaries}
    victim = primaries[0]
    (heir,) = [r for r in replicas if r.primary_id == victim.node_id]
    cluster.kill(victim.port, signal.SIGKILL)
    wait_until(
        "a replica takes over", lambda: heir.port in {m.port for m in cluster.primaries()}, 30
    )
    assert victim.port not in {m.port for m in cluster.primaries()}
    assert cluster.primary_for("{m}:msg") in cluster.primaries()


def test_stop_ends_every_node_and_removes_their_files() -> None:
    cluster = EmbeddedCluster(primaries_count=3, replicas_per_primary=1)
    cluster.start()
    pids = [pid for _, _, pid in cluster.nodes]
    assert len(pids) == 6 and all(alive(pid) for pid in pids)
    folders = [os.readlink(f"/proc/{pid}/cwd") for pid in pids]  # each node runs in its --dir
    assert len(set(folders)) == 6 and all(os.path.isdir(f) for f in folders)
    cluster.kill(cluster.nodes[0][1], signal.SIGSTOP)  # a frozen node is stopped too
    cluster.stop()
    assert not any(alive(pid) for pid in pids)
    assert not any(os.path.exists(f) for f in folders)
    assert cluster.nodes == []
