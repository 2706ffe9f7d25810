"""Each private-API shim against a public reference, on tiny inputs: an upgrade that changes
one fails here, loudly, with the message naming the API and the installed version."""

import re
import time

import optuna
import pytest
import torch

from mnist_tune import shims


@pytest.fixture(autouse=True)
def fresh_checks():
    """The checks are cached per process; each test starts unchecked."""
    for cached in (shims._fused_adamw, shims._threshold_backward, shims._stale_trial_query):
        cached.cache_clear()
    yield
    for cached in (shims._fused_adamw, shims._threshold_backward, shims._stale_trial_query):
        cached.cache_clear()


def test_fused_adamw_equals_torch_adamw_steps():
    torch.manual_seed(0)
    param, grad = torch.randn(7), torch.randn(7)
    reference = torch.nn.Parameter(param.clone())
    optimizer = torch.optim.AdamW([reference], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                                  foreach=False)
    mine, exp_avg, exp_avg_sq, steps = param.clone(), torch.zeros(7), torch.zeros(7), torch.zeros(())
    for _ in range(3):
        reference.grad = grad.clone()
        optimizer.step()
        steps += 1
        shims.fused_adamw_([mine], [grad], [exp_avg], [exp_avg_sq], [steps], lr=1e-2, beta1=0.9, beta2=0.999,
                           weight_decay=0.1, eps=1e-8)
    torch.testing.assert_close(mine, reference.detach())


def test_relu_backward_equals_autograd():
    x = torch.randn(4, 5, requires_grad=True)
    upstream = torch.randn(4, 5)
    out = torch.relu(x)
    out.backward(upstream)
    torch.testing.assert_close(shims.relu_backward(upstream, out.detach()), x.grad)


def test_stale_trial_ids_are_those_optuna_fails(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage, study_name="s")
    stale, live = study.ask(), study.ask()
    storage.record_heartbeat(stale._trial_id)
    assert shims.stale_trial_ids(storage, study._study_id) == []  # fresh heartbeat
    time.sleep(2.2)  # the heartbeat is older than the grace period now (SQLite's clock has 1 s steps)
    storage.record_heartbeat(live._trial_id)
    assert shims.stale_trial_ids(storage, study._study_id) == [stale._trial_id]
    optuna.storages.fail_stale_trials(study)  # the public API that uses the same query
    assert [t.number for t in study.get_trials(states=(optuna.trial.TrialState.FAIL,))] == [stale.number]


def test_a_missing_private_api_is_named_with_the_installed_version(monkeypatch):
    monkeypatch.delattr(torch, "_fused_adamw_")
    with pytest.raises(shims.PrivateAPIError, match=rf"torch\._fused_adamw_ does not exist in the installed "
                                                    rf"torch {re.escape(torch.__version__)}"):
        shims.fused_adamw_([], [], [], [], [], lr=1.0, beta1=0.9, beta2=0.9, weight_decay=0.0, eps=1e-8)


def test_a_changed_private_signature_is_named(monkeypatch):
    monkeypatch.setattr(optuna.storages.RDBStorage, "_get_stale_trial_ids", lambda self, study_id, now: [])
    with pytest.raises(shims.PrivateAPIError, match=rf"RDBStorage\._get_stale_trial_ids takes \(self, study_id, "
                                                    rf"now\).* optuna {re.escape(optuna.__version__)}"):
        shims.stale_trial_ids(None, 0)
