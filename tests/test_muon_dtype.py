"""Muon's Newton-Schulz dtype follows the device (train/optim.py): the same update as torch.optim.Muon."""

import copy

import torch
from torch import nn

from train.optim import DeviceMuon, newton_schulz, newton_schulz_dtype


def reference_newton_schulz(grad: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic iteration of torch.optim.Muon in float64 (the exact-arithmetic reference)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = grad.double()
    tall = grad.size(0) > grad.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def _params(seed: int) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(24, 40, generator=g)), nn.Parameter(torch.randn(48, 16, generator=g))]


def _steps(opt_params: list[nn.Parameter], opt: torch.optim.Optimizer, seed: int, n: int = 3) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(n):
        for p in opt_params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_cpu_runs_newton_schulz_in_float32_and_cuda_in_bfloat16_when_supported():
    assert newton_schulz_dtype(torch.device("cpu")) == torch.float32
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert newton_schulz_dtype(torch.device("cuda")) == torch.bfloat16


def test_float32_newton_schulz_equals_the_float64_reference():
    g = torch.Generator().manual_seed(0)
    for shape in ((24, 40), (48, 16), (32, 32)):
        grad = torch.randn(shape, generator=g)
        got = newton_schulz(grad, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
        assert got.dtype == torch.float32 and got.shape == grad.shape
        torch.testing.assert_close(got.double(), reference_newton_schulz(grad), rtol=1e-4, atol=1e-5)


def test_bfloat16_device_muon_is_torch_muon_step_for_step():
    ours, theirs = _params(3), _params(3)
    kwargs = dict(lr=0.02, momentum=0.95, weight_decay=0.1)
    _steps(ours, DeviceMuon(ours, ns_dtype=torch.bfloat16, **kwargs), seed=3)
    _steps(theirs, torch.optim.Muon(theirs, **kwargs), seed=3)
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_float32_device_muon_is_the_reference_update_and_close_to_torch_muon():
    start = _params(5)
    ours = copy.deepcopy(start)
    lr, momentum, decay = 0.02, 0.95, 0.1
    opt = DeviceMuon(ours, ns_dtype=torch.float32, lr=lr, momentum=momentum, weight_decay=decay)
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(9)) for p in ours]
    for p, grad in zip(ours, grads, strict=True):
        p.grad = grad.clone()
    opt.step()
    for p0, p, grad in zip(start, ours, grads, strict=True):
        buf = grad * (1 - momentum)
        nesterov = grad + (buf - grad) * momentum
        scale = max(1, p.shape[0] / p.shape[1]) ** 0.5
        expected = p0.detach().double() * (1 - lr * decay) - lr * scale * reference_newton_schulz(nesterov)
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)
    torch_muon = copy.deepcopy(start)
    _opt = torch.optim.Muon(torch_muon, lr=lr, momentum=momentum, weight_decay=decay)
    for p, grad in zip(torch_muon, grads, strict=True):
        p.grad = grad.clone()
    _opt.step()
    for p, q in zip(ours, torch_muon, strict=True):  # bfloat16's own error is the only difference
        torch.testing.assert_close(p, q, rtol=0, atol=lr * 2 * 0.02)


def test_device_muon_state_loads_into_torch_muon():
    params = _params(7)
    opt = DeviceMuon(params, ns_dtype=torch.float32, lr=0.02)
    _steps(params, opt, seed=7, n=1)
    other = torch.optim.Muon(_params(7), lr=0.02)
    other.load_state_dict(opt.state_dict())
    assert set(other.state_dict()["state"][0]) == {"momentum_buffer"}
