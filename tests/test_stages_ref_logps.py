"""The preference stage computes reference log-probs only where its loss reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from crv_ray import stages
from crv_ray.train import api
from crv_ray.train.config import TrainConfig


@pytest.mark.parametrize("cogpo, computed", [({"loss": "cogpo"}, True), ({"loss": "dpo"}, True),
                                             ({"loss": "ipo"}, True), ({"loss": "simpo"}, False),
                                             ({"loss": "dpo", "reference": "online"}, False)])
def test_reference_log_probs_only_where_the_loss_uses_them(monkeypatch, cogpo, computed):
    calls = []
    monkeypatch.setattr(api, "run_ref_logps", lambda cfg, model, pairs, out: calls.append(out) or out)
    train = TrainConfig(cogpo=cogpo)
    got = stages._pairs_for(train, Path("/sft"), Path("/pairs"), Path("/ref"))
    assert calls == ([Path("/ref")] if computed else [])
    assert got == (Path("/ref") if computed else Path("/pairs"))
