"""A trial pack computes what its members' separate trainings compute: the same losses,
gradients and parameters step by step, given the same data order and dropout masks.

The reference is written independently of pack.py: each member's model from its own seed,
autograd through the model's own modules (its dropout replaced by the masks the pack drew),
torch.optim.AdamW with the lr / beta1 of its schedule set each step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnist_tune.models import Dropout, as_input, build_model
from mnist_tune.optim import BETA2, EPS, schedule_table
from mnist_tune.pack import Pack, shape_key
from mnist_tune.train import TrainConfig, seed_everything

from helpers import DEVICES

N, EPOCHS = 48, 2
MEMBERS = [  # (dropout, lr, weight decay, schedule, seed): every per-member setting differs
    (0.0, 1e-3, 0.0, "constant", 3),
    (0.3, 3e-3, 0.05, "cosine", 5),
    (0.5, 2e-3, 0.01, "onecycle", 7),
]
MODELS = {"mlp": ({"hidden_sizes": (24, 16)}, 16), "mixer": ({"patch_size": 14, "dim": 8, "depth": 1}, 12)}


class GivenMasks(nn.Module):
    """Dropout that applies the next of the masks the pack drew for this member."""

    def __init__(self, masks: list):
        super().__init__()
        self.masks = masks

    def forward(self, x):
        return x * self.masks.pop(0)


def replace_dropout(model: nn.Module, masks: list) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Dropout):
                setattr(module, name, GivenMasks(masks))


def make_pack(model_name, device):
    model_hp, batch = MODELS[model_name]
    model_hps = [{**model_hp, "dropout": p} for p, *_ in MEMBERS]
    hps = [TrainConfig(batch_size=batch, lr=lr, weight_decay=wd, schedule=sched, epochs=EPOCHS, seed=seed)
           for _, lr, wd, sched, seed in MEMBERS]
    return Pack(model_name, model_hps, hps, N, device), model_hps, hps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_name", ["mlp", "mixer"])
def test_pack_equals_separate_trainings(model_name, device):
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    train_x = torch.randint(0, 256, (N, 28, 28), dtype=torch.uint8, generator=gen).to(device)
    train_y = torch.randint(0, 10, (N,), generator=gen).to(device)
    pack, model_hps, hps = make_pack(model_name, device)
    steps = pack.steps(train_x, train_y)

    refs, optimizers, schedules, orders = [], [], [], []
    for model_hp, hp in zip(model_hps, hps):
        seed_everything(hp.seed)
        model = build_model(model_name, **model_hp).to(device).train()
        refs.append(model)
        optimizers.append(torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay,
                                            eps=EPS, foreach=False))
        schedules.append(schedule_table(hp.schedule, hp.lr, EPOCHS * pack.steps_per_epoch))
        orders.append(torch.Generator(device=device).manual_seed(hp.seed))
    masks_per_member = [[] for _ in MEMBERS]
    for model, masks in zip(refs, masks_per_member):
        replace_dropout(model, masks)

    step = 0
    for epoch in range(EPOCHS):
        order = pack.epoch_order()
        # the pack's order is each member's single-trial shuffle (train.fit draws it this way)
        for k, g in enumerate(orders):
            assert torch.equal(order[k], torch.randperm(N, device=device, generator=g))
        for index in range(pack.steps_per_epoch):
            pack.loss_sum.zero_()
            steps(pack.batch(order, index), pack.step)
            pack.step += 1
            grads = pack.optimizer.grad
            for k, (model, opt) in enumerate(zip(refs, optimizers)):
                rows = order[k, index * pack.batch_size:(index + 1) * pack.batch_size]
                for mask in pack.train_step.masks:
                    masks_per_member[k].append(mask[k])
                opt.zero_grad()
                loss = F.cross_entropy(model(as_input(train_x[rows])), train_y[rows])
                loss.backward()
                assert not masks_per_member[k]  # every mask the pack drew was used, in order
                torch.testing.assert_close(pack.loss_sum[k], loss.detach() * len(rows), rtol=1e-5, atol=1e-5)
                ref_grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
                torch.testing.assert_close(grads[k], ref_grad, rtol=1e-4, atol=1e-6)
                lrs, beta1s = schedules[k]
                for group in opt.param_groups:
                    group["lr"], group["betas"] = lrs[step], (beta1s[step], BETA2)
                opt.step()
                ref_params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
                # Adam divides by sqrt(v): a gradient that is 0 up to float noise (the Mixer's token-mixing
                # output bias: every LayerNorm after it removes it) moves its weight by up to lr either
                # way each step, so a few weights may drift apart, by no more than the lr summed so far
                close = (pack.optimizer.flat[k] - ref_params).abs() <= 1e-5 + 1e-4 * ref_params.abs()
                assert close.float().mean() > 0.99
                torch.testing.assert_close(pack.optimizer.flat[k], ref_params, rtol=0,
                                           atol=1e-5 + sum(lrs[:step + 1]))
            step += 1
    if model_name == "mlp":  # the masks differ between members (keep-probabilities 1, 0.7, 0.5)
        kept = [m.gt(0).float().mean().item() for m in pack.train_step.masks[0]]
        assert kept[0] == 1.0 and kept[1] > kept[2] > 0.2

    # members come out as ordinary models holding the pack's weights; the pack's evaluation is theirs
    val_x, val_y = train_x[:20], train_y[:20]
    losses, accs = pack.evaluate(val_x, val_y)
    for k in range(len(MEMBERS)):
        member = pack.member_model(k).eval()
        assert type(member) is type(refs[k])
        logits = member(as_input(val_x))
        torch.testing.assert_close(losses[k], F.cross_entropy(logits, val_y).item(), rtol=1e-4, atol=1e-5)
        assert accs[k] == pytest.approx((logits.argmax(1) == val_y).float().mean().item())


@pytest.mark.parametrize("model_name", ["mlp", "mixer"])
def test_compacted_pack_continues_as_the_members_alone(model_name):
    """Dropping members (pruned) leaves the others' training untouched: a compacted pack of
    members 0 and 2 goes on exactly as a pack built of those two would."""
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(1)
    train_x = torch.randint(0, 256, (N, 28, 28), dtype=torch.uint8, generator=gen)
    train_y = torch.randint(0, 10, (N,), generator=gen)
    pack, _, _ = make_pack(model_name, device)
    pack.keep = torch.ones_like(pack.keep)  # no dropout: the two packs draw different masks
    steps = pack.steps(train_x, train_y)
    pack.run_epoch(steps, train_x)
    before = pack.optimizer.flat[[0, 2]].clone()
    pack.keep_members([0, 2])
    assert pack.size == 2 and torch.equal(pack.optimizer.flat, before)
    loss = pack.run_epoch(pack.steps(train_x, train_y), train_x)

    alone, _, _ = make_pack(model_name, device)
    alone.keep = torch.ones_like(alone.keep)
    alone.run_epoch(alone.steps(train_x, train_y), train_x)
    alone.keep_members([0, 2])
    torch.testing.assert_close(alone.run_epoch(alone.steps(train_x, train_y), train_x), loss)
    torch.testing.assert_close(alone.optimizer.flat, pack.optimizer.flat)
    assert [hp.seed for hp in pack.hps] == [MEMBERS[0][4], MEMBERS[2][4]]


def test_shape_key_groups_what_changes_shapes():
    a = {"batch_size": 64, "hidden_sizes": [100, 80], "lr": 1e-3, "dropout": 0.1, "seed": 1, "epochs": 3}
    assert shape_key("mlp", a) == shape_key("mlp", {**a, "lr": 3e-2, "dropout": 0.3, "seed": 9,
                                                     "schedule": "cosine", "weight_decay": 0.1})
    assert shape_key("mlp", a) != shape_key("mlp", {**a, "batch_size": 128})
    assert shape_key("mlp", a) != shape_key("mlp", {**a, "hidden_sizes": [100, 40]})
    assert shape_key("mlp", a) != shape_key("mixer", a)


@pytest.mark.parametrize("model_name", ["mlp", "mixer"])
def test_refilled_member_trains_as_it_would_alone(model_name):
    """A trial joining a running pack (refill, at an epoch boundary) starts its own schedule,
    AdamW state and data order there: after one epoch it holds what a pack of it alone holds;
    the member that stayed is unaffected by the join."""
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(2)
    train_x = torch.randint(0, 256, (N, 28, 28), dtype=torch.uint8, generator=gen)
    train_y = torch.randint(0, 10, (N,), generator=gen)
    model_hp, batch = MODELS[model_name]
    model_hp = {**model_hp, "dropout": 0.0}  # packs of different sizes draw different masks
    hps = [TrainConfig(batch_size=batch, lr=lr, weight_decay=wd, schedule=sched, epochs=EPOCHS, seed=seed)
           for _, lr, wd, sched, seed in MEMBERS]

    def trained(pack, epochs):
        for _ in range(epochs):
            pack.run_epoch(pack.steps(train_x, train_y), train_x)
        return pack

    pack = trained(Pack(model_name, [model_hp] * 2, hps[:2], N, device), 1)
    pack.keep_members([0])
    pack.add_members([model_hp], [hps[2]])
    trained(pack, 1)
    assert pack.optimizer.starts == [0, pack.steps_per_epoch]
    first = trained(Pack(model_name, [model_hp], hps[:1], N, device), 2)
    joined = trained(Pack(model_name, [model_hp], hps[2:], N, device), 1)
    torch.testing.assert_close(pack.optimizer.flat, torch.cat([first.optimizer.flat, joined.optimizer.flat]))
    torch.testing.assert_close(pack.optimizer.exp_avg_sq[1:], joined.optimizer.exp_avg_sq)
