"""The private library APIs the project relies on, one small shim each.

Each is checked on first use: that it exists and takes the arguments we pass. If an upgrade
renamed or changed it, the error names the API and the installed version, instead of a
TypeError deep inside a training step. tests/test_shims.py runs each against a public
reference, so such an upgrade fails there first.

  fused_adamw_      torch._fused_adamw_ (optim.py): the kernel AdamW(fused=True) runs
  relu_backward     torch.ops.aten.threshold_backward (mlp_step.py): ReLU's backward in one op
  stale_trial_ids   optuna RDBStorage._get_stale_trial_ids (study.py): the query fail_stale_trials uses
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

from mnist_tune.errors import MnistTuneError


class PrivateAPIError(MnistTuneError):
    """A private API this package uses is missing or changed in the installed library."""


def _broken(api: str, library: str, version: str, why: str) -> PrivateAPIError:
    return PrivateAPIError(f"{api} {why} in the installed {library} {version}; mnist-tune relies on it "
                           f"(mnist_tune/shims.py): install a version it supports")


def _schema_names(op) -> set[str]:
    """Argument names of a torch operator's schema."""
    return {arg.name for arg in op.default._schema.arguments}


FUSED_ADAMW_ARGS = {"self", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "lr", "beta1",
                    "beta2", "weight_decay", "eps", "amsgrad", "maximize"}


@functools.cache
def _fused_adamw() -> Callable:
    import torch

    op = getattr(torch, "_fused_adamw_", None)
    if op is None or not hasattr(torch.ops.aten, "_fused_adamw_"):
        raise _broken("torch._fused_adamw_", "torch", torch.__version__, "does not exist")
    missing = FUSED_ADAMW_ARGS - _schema_names(torch.ops.aten._fused_adamw_)
    if missing:
        raise _broken("torch._fused_adamw_", "torch", torch.__version__,
                      f"lacks the argument(s) {', '.join(sorted(missing))}")
    return op


def fused_adamw_(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, steps: list, *, lr: float,
                 beta1: float, beta2: float, weight_decay: float, eps: float) -> None:
    """One AdamW step in place, with torch's fused kernel (``steps`` are tensors, already advanced)."""
    _fused_adamw()(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                   weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)


@functools.cache
def _threshold_backward() -> Callable:
    import torch

    op = getattr(torch.ops.aten, "threshold_backward", None)
    if op is None:
        raise _broken("torch.ops.aten.threshold_backward", "torch", torch.__version__, "does not exist")
    names = [arg.name for arg in op.default._schema.arguments]
    if names != ["grad_output", "self", "threshold"]:
        raise _broken("torch.ops.aten.threshold_backward", "torch", torch.__version__,
                      f"takes ({', '.join(names)}), not (grad_output, self, threshold)")
    return op


def relu_backward(grad, output):
    """ReLU's backward: ``grad`` where ``output > 0``, else 0, in one kernel (no mask tensor)."""
    return _threshold_backward()(grad, output, 0)


@functools.cache
def _stale_trial_query() -> Callable:
    import optuna
    from optuna.storages import RDBStorage

    method = getattr(RDBStorage, "_get_stale_trial_ids", None)
    if method is None:
        raise _broken("optuna RDBStorage._get_stale_trial_ids", "optuna", optuna.__version__, "does not exist")
    params = list(inspect.signature(method).parameters)
    if params != ["self", "study_id"]:
        raise _broken("optuna RDBStorage._get_stale_trial_ids", "optuna", optuna.__version__,
                      f"takes ({', '.join(params)}), not (self, study_id)")
    return method


def stale_trial_ids(storage, study_id: int) -> list[int]:
    """Ids of the study's RUNNING trials whose heartbeat is older than the grace period (the
    storage needs a heartbeat_interval); Optuna has no public query for them."""
    return list(_stale_trial_query()(storage, study_id))
