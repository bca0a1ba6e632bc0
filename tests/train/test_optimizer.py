"""Which AdamW implementation each parameter placement gets, and that the fused one trains like the reference loop."""

from __future__ import annotations

import pytest
import torch

from crv_ray.train.config import CogPOConfig, FSDPConfig
from crv_ray.train.distributed import adamw_impl_kwargs, setup_optimizer, uses_cpu_offload


@pytest.mark.parametrize("device_type, cpu_offload, expected", [
    ("cuda", False, {"fused": True}),
    ("cpu", False, {"fused": True}),
    ("cpu", True, {"foreach": False, "fused": False}),  # FSDP2 CPU offload: the single-tensor loop
    ("xpu-like", False, {"foreach": True}),
])
def test_adamw_impl_per_placement(device_type, cpu_offload, expected):
    assert adamw_impl_kwargs(device_type, cpu_offload) == expected


def test_cpu_offload_with_device_parameters_is_refused():
    with pytest.raises(ValueError, match="cpu_offload keeps parameters on the CPU, got parameters on 'cuda'"):
        adamw_impl_kwargs("cuda", True)


def test_cpu_offload_applies_to_sharded_gpu_runs_only():
    offload = FSDPConfig(cpu_offload=True)
    # No process group in this test process: the model is not sharded, so nothing is offloaded.
    assert not uses_cpu_offload(offload, torch.device("cuda", 0))
    assert not uses_cpu_offload(offload, torch.device("cpu"))
    assert not uses_cpu_offload(FSDPConfig(), torch.device("cuda", 0))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))


def _trained_weights(impl: dict | None) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    model = _model()
    stage = CogPOConfig(lr=1e-2, weight_decay=0.1)
    if impl is None:
        opt = setup_optimizer(model, stage)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=stage.adam_betas,
                                weight_decay=stage.weight_decay, **impl)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    for _ in range(20):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), opt


def test_setup_optimizer_uses_fused_on_cpu_and_matches_single_tensor_loop():
    fused, opt = _trained_weights(None)
    assert opt.param_groups[0]["fused"] is True
    reference, ref_opt = _trained_weights({"foreach": False, "fused": False})
    assert not ref_opt.param_groups[0]["fused"] and not ref_opt.param_groups[0]["foreach"]
    initial = torch.cat([p.detach().flatten() for p in _model().parameters()])
    assert (fused - initial).abs().max() > 1e-2  # it did train
    torch.testing.assert_close(fused, reference, atol=1e-6, rtol=1e-5)


def test_setup_optimizer_refuses_parameters_on_two_device_types():
    cpu = torch.nn.Parameter(torch.zeros(2))
    meta = torch.nn.Parameter(torch.zeros(2, device="meta"))
    model = torch.nn.ParameterList([cpu, meta])
    with pytest.raises(ValueError, match=r"one device type, found \['cpu', 'meta'\]"):
        setup_optimizer(model, CogPOConfig())
