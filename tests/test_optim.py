"""FlatAdamW and the schedule tables against torch's own AdamW and lr schedulers."""

import pytest
import torch
from torch import nn

from mnist_tune.optim import FlatAdamW, schedule_table
from mnist_tune.tunables import SCHEDULES

from helpers import DEVICES


def _net(device="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(device)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_table_equals_torch_schedulers(schedule):
    for total in (1, 3, 10, 137):
        optimizer = torch.optim.AdamW(_net().parameters(), lr=3e-3)
        scheduler = {"constant": lambda: None,
                     "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total),
                     "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3,
                                                                             total_steps=total)}[schedule]()
        expected_lr, expected_beta1 = [], []
        for t in range(total):
            group = optimizer.param_groups[0]
            expected_lr.append(group["lr"])
            expected_beta1.append(group["betas"][0])
            optimizer.step()
            if scheduler is not None and t < total - 1:
                scheduler.step()
        lrs, beta1s = schedule_table(schedule, 3e-3, total)
        assert lrs == pytest.approx(expected_lr, rel=1e-12, abs=1e-18)
        assert beta1s == pytest.approx(expected_beta1, rel=1e-12)
    if schedule == "onecycle":  # it does move: warm-up, peak, anneal, beta1 inversely
        lrs, beta1s = schedule_table(schedule, 1e-2, 100)
        assert lrs[0] < lrs[30] == pytest.approx(1e-2, rel=1e-3) and lrs[-1] < lrs[0]
        assert beta1s[0] == pytest.approx(0.95) and beta1s[30] < 0.851


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])  # unfused: the path for devices without the kernel
def test_flat_adamw_matches_torch_adamw(fused, device):
    ours, reference = _net(device), _net(device)
    flat = FlatAdamW(ours.parameters(), weight_decay=0.05, fused=fused)
    torch_opt = torch.optim.AdamW(reference.parameters(), weight_decay=0.05)
    lrs, beta1s = schedule_table("onecycle", 1e-2, 20)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(torch_opt, max_lr=1e-2, total_steps=20)
    x, y = torch.randn(32, 6).to(device), torch.randint(0, 3, (32,)).to(device)
    for t in range(20):
        flat.zero_grad()
        nn.functional.cross_entropy(ours(x), y).backward()  # accumulates into flat.grad in place
        flat.step(lrs[t], beta1s[t])
        torch_opt.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        torch_opt.step()
        if t < 19:
            scheduler.step()
    for p, q in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours[0].weight, _net(device)[0].weight)  # it trained


def test_release_gives_parameters_their_own_storage():
    net = _net()
    flat = FlatAdamW(net.parameters())
    assert net[0].weight.data_ptr() == flat.flat.data_ptr()  # a view while training
    before = [p.detach().clone() for p in net.parameters()]
    flat.release()
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p, b) and p.grad is None
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()  # saves only itself


@pytest.mark.parametrize("device", DEVICES)
def test_step_with_schedule_rows_equals_step(device):
    """The device-table update (what a CUDA graph replays) is step(lr, beta1), weight decay,
    varying beta1 and bias corrections included."""
    lrs, beta1s = schedule_table("onecycle", 1e-2, 20)
    x, y = torch.randn(32, 6).to(device), torch.randint(0, 3, (32,)).to(device)
    trained = []
    for use_rows in (False, True):
        net = _net(device)
        flat = FlatAdamW(net.parameters(), weight_decay=0.05, fused=False)
        rows = flat.schedule_rows(lrs, beta1s)
        for t in range(20):
            flat.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            flat.step_with(rows[t]) if use_rows else flat.step(lrs[t], beta1s[t])
        trained.append(flat.flat.clone())
    torch.testing.assert_close(trained[1], trained[0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(trained[0], torch.cat([p.detach().reshape(-1) for p in _net(device).parameters()]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lr, weight_decay", [(3e-4, 1e-4), (1e-2, 0.1)])
def test_weight_decay_is_not_rounded_away(device, lr, weight_decay):
    """Decoupled weight decay as flat -= lr*wd*flat (CUDA's fused kernel does the same, so the
    CUDA-graph path and the eager path agree): a float32 factor (1 - lr*wd) would turn a decay
    of 3e-8 into 6e-8, or into nothing, for every parameter."""
    modes = ["unfused", "rows"] + (["fused"] if device == "cuda" else [])  # CPU's fused kernel uses the factor
    for mode in modes:
        flat = FlatAdamW(_net(device).parameters(), weight_decay=weight_decay, fused=mode == "fused")
        start = torch.linspace(-2, 2, len(flat.flat), device=device)
        with torch.no_grad():
            flat.flat.copy_(start)
        flat.zero_grad()  # no gradient: only the decay moves the parameters
        if mode == "rows":
            flat.step_with(flat.schedule_rows([lr], [0.9])[0])
        else:
            flat.step(lr)
        exact = (start.double() * (1 - lr * weight_decay)).float()  # correctly rounded
        assert torch.equal(flat.flat, exact), mode


def test_every_configured_schedule_has_a_table():
    for schedule in SCHEDULES:
        lrs, beta1s = schedule_table(schedule, 1e-3, 10)
        assert len(lrs) == len(beta1s) == 10
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_table("step", 1e-3, 10)
