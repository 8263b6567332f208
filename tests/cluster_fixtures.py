"""Redis Clusters for the tests: load with `pytest_plugins = ["cluster_fixtures"]`.

`redis_cluster` (3 primaries, no replicas) is shared by the session: tests
keep to their own key prefix and undo any setting they change.
`redis_cluster_with_replicas` (3 primaries, 1 replica each) is new for every
test, so a test may kill or freeze its nodes; mark such tests `failover`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from relay.embedded_cluster import EmbeddedCluster


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(primaries_count=3) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_with_replicas() -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(primaries_count=3, replicas_per_primary=1) as cluster:
        yield cluster
