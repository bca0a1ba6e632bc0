"""Fixtures of the multi-node tests: where run directories go (`run_root`)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> str:
    """The folder or URI under which each test's run_dir goes, as the drivers and every node see it.

    A local folder (the two "nodes" share this machine's disk). To run on object storage, return
    f"s3://{s3_server.bucket}/multinode" from the `s3_server` fixture instead, and merge `s3_server.env` into
    `cluster_env` below: the nodes' Ray workers and the drivers then reach the bucket."""
    return str(tmp_path_factory.mktemp("multinode"))


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, str]:
    """Extra environment for every node of the cluster and every driver (credentials of the run_dir's storage)."""
    return {}
