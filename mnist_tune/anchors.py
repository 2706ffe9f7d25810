"""What ``best`` prints beside a study's best result: the seed's published test accuracy, and
the study's own trial of the seed's configuration, so a reader sees how far the search went.

The seed's configuration is, by convention, the sweep's first ``enqueue:`` entry (mlp.yaml's
is); the study stores its sweep's entries when it is created. Optuna only, no torch.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnist_tune import record

# The seed project's reported MNIST test accuracy (issue 3; its epoch was chosen on the test set).
SEED_TEST_ACC = 0.9798


def seed_trial(study: optuna.Study) -> FrozenTrial | None:
    """The study's first trial of its sweep's first enqueued configuration (a finished one if
    there is one); a skipped duplicate stands for the trial it repeats, which comes first."""
    from mnist_tune.study import SWEEP_ATTR

    entries = study.user_attrs.get(SWEEP_ATTR, {}).get("enqueue") or []
    if not entries:
        return None
    matching = [t for t in study.get_trials(deepcopy=False)
                if t.params and all(t.params.get(name) == value for name, value in entries[0].items())]
    finished = [t for t in matching if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    return (finished or matching or [None])[0]


def anchors(study: optuna.Study) -> dict:
    """Fields for ``best``: the seed's test accuracy, and its configuration's trial here (or None)."""
    trial = seed_trial(study)
    found = {"seed_trial": None, "seed_trial_state": None, "seed_trial_value": None, "seed_trial_test_acc": None}
    if trial is not None:
        found = {"seed_trial": trial.number, "seed_trial_state": trial.state.name, "seed_trial_value": trial.value,
                 "seed_trial_test_acc": trial.user_attrs.get(record.TEST_ACC_ATTR)}
    return {"seed_test_acc": SEED_TEST_ACC, **found}
