"""Fixtures of the training tests."""

from __future__ import annotations

import os
import socket

import pytest


@pytest.fixture(scope="module")
def gloo_group():
    """A one-process gloo group, so setup_model takes its FSDP2 path (fully_shard, DTensor parameters) in-process."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
