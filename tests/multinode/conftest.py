"""Fixtures of the multi-node tests: where run directories go (`run_root`) and what the nodes need to reach it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def run_root(s3_server) -> str:
    """The URI under which each test's run_dir goes, as the drivers and every node see it: a bucket on the local S3
    API server (moto), as on a multi-node cluster without a shared disk. The tests read outputs through `_fs` in
    test_two_nodes.py (crv_ray.storage.resolve)."""
    return s3_server.uri("multinode")


@pytest.fixture(scope="module")
def cluster_env(s3_server) -> dict[str, str]:
    """Extra environment for every node of the cluster and every driver: the S3 endpoint and keys (the nodes' Ray
    workers inherit it from their `ray start`, the `crv-ray` drivers from this)."""
    return dict(s3_server.env)
