"""Fixtures of the multi-node tests: where run directories go (`run_root`) and what the nodes need to reach it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> str:
    """The folder or URI under which each test's run_dir goes, as the drivers and every node see it.

    A local folder today (the "nodes" share this machine's disk). For object storage: take the session's
    `s3_server` fixture and return `s3_server.uri("multinode")`; the tests read outputs through `_fs` in
    test_two_nodes.py (pyarrow.fs.FileSystem.from_uri, which reads AWS_ENDPOINT_URL; or crv_ray.storage.resolve)."""
    return str(tmp_path_factory.mktemp("multinode"))


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, str]:
    """Extra environment for every node of the cluster and every driver: for S3, `s3_server.env` (the nodes' Ray
    workers inherit it from their `ray start`, the `crv-ray` drivers from this)."""
    return {}
