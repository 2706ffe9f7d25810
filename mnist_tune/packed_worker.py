"""The worker's loop with trial packs (``mnist-tune study --pack K|auto``): K trials at a time.

Each round asks Optuna for up to K trials at once (``study.ask``; TPE's constant liar, which
``study.make_sampler`` keeps on, holds running trials apart): the first freely, the others
enqueued with its shape-changing hyperparameters (batch size, widths, Mixer dims) fixed so the
sampler proposes only what members may differ in; a sweep searching several shapes would
otherwise scatter a round over packs of one or two (the Mixer sweep has 1620 shapes). A round
thus tries one shape where a sequential study tries K, which costs search quality where the
shape is an architecture, so ``--pack auto`` packs only sweeps that search no more than the
batch size (``auto_limit``).
Trials are grouped by ``pack.shape_key`` (retries of other shapes make their own pack) and
each group is trained as one ``pack.Pack``. Every member stays a trial as ``worker.Objective``
makes one: its own Optuna trial (heartbeats recorded here, one thread for the round, as
``optimize`` would per trial),
its own MLflow child run with the same params, per-epoch metrics, test accuracy and exported
model (``Pack.member_model``: the ordinary model); the budget counts members. After each epoch
every member reports; a pruned, diverged or finished member leaves, and the pack is compacted
to the others (on the CPU a step costs in proportion to K, benchmarks/pack_throughput.py).
Refill: at the epoch boundary where members leave, the pack asks Optuna for as many new
trials as it has free slots (budget permitting, never more than K waiting); those of its shape
group join at once (their schedule, AdamW state and epochs start there), the others wait for
the next pack of the round and stop the refill (so none waits longer than one pack). On a
GPU a step costs about the same below the auto size, so a refilled slot trains a trial almost
for free where a new pack would pay its own steps (the CPU: in proportion, no gain or loss).
SIGTERM / Ctrl-C close every member's run KILLED and its trial FAIL (as a single trial's); a
dead worker's members are retried by the next worker.

With ``--pack 1`` (the CPU's ``auto``) the worker runs today's ``study.optimize`` loop.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from dataclasses import dataclass, field

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from mnist_tune import record, stop, warm
from mnist_tune.errors import MnistTuneError
from mnist_tune.space import suggest
from mnist_tune.study import SURPLUS_ATTR, WORKER_ATTR, count_budget, this_worker
from mnist_tune.tunables import split_hyperparameters

MAX_AUTO_PACK = 256  # auto tries K = 1, 2, 4, ... up to this
PACK_STEP_BOUND_S = 0.025  # auto: a pack step may take this long (an MLP epoch at batch 100: ~14 s)
AUTO_MEMORY_SHARE = 0.8  # auto: of the GPU's memory, leaving room for evaluation and export
DRY_RUN_STEPS = 20
# auto: at least this many rounds per study, since a round's K trials are proposed before any
# of them reports and share one shape (4 rounds of 10 cost a point of accuracy, 10 of 4 none:
# benchmarks/RESULTS.md, trial packs)
MIN_ROUNDS = 10


def parse_pack(value: str) -> int | str:
    """``--pack``: "auto" or a positive integer."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise MnistTuneError(f"{value!r} is not auto or a positive integer")
    return int(value)


# Settings a pack does not implement, each with the value that needs nothing from it.
UNPACKABLE = {"amp": False, "compile": False, "image_size": 28, "shift": 0, "rotate": 0, "scale": 0}


def pack_problem(sweep) -> str | None:
    """Why the sweep's trials cannot be packed (checked before any work), or None."""
    if sweep.objectives:
        return f"--pack trains single-objective sweeps only; sweep {sweep.name!r} has several objectives"
    for name, plain in UNPACKABLE.items():
        if sweep.fixed.get(name, plain) != plain or any(p.name == name for p in sweep.space):
            if name in ("amp", "compile"):
                return f"--pack needs float32 trials without torch.compile; sweep {sweep.name!r} sets {name}"
            return f"--pack does not train {name} yet; sweep {sweep.name!r} sets it (use --pack 1)"
    return None


def auto_limit(sweep, budget: int) -> tuple[int, str]:
    """The largest K ``auto`` may choose for this sweep and budget, and why: 1 where the sweep
    searches the architecture (a round would try one), else at least MIN_ROUNDS rounds."""
    from mnist_tune.pack import PER_MEMBER

    shaped = [p.name for p in sweep.space if p.name not in (*PER_MEMBER, "batch_size")]
    if shaped:
        return 1, f"the sweep searches {', '.join(shaped)}, which a round's members would share"
    return max(1, min(MAX_AUTO_PACK, budget // MIN_ROUNDS)), f"at least {MIN_ROUNDS} rounds of {budget} trials"


def resolve_pack(requested: int | str, sweep, data, device, log, budget: int) -> int:
    """The pack size: as given, or for ``auto`` 1 off CUDA and on CUDA the largest K within
    ``auto_limit`` whose step stays under PACK_STEP_BOUND_S and whose memory fits, from a
    short dry run (logged)."""
    if requested != "auto":
        return requested
    if device.type != "cuda" or pack_problem(sweep):  # auto packs only what can be packed
        return 1
    limit, why = auto_limit(sweep, budget)
    if limit == 1:
        log(f"--pack auto: 1 ({why}; --pack K packs them anyway)")
        return 1
    import torch

    from mnist_tune.pack import Pack
    from mnist_tune.train import TrainConfig

    point = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()  # one point of the space
    model_hp, train_hp = split_hyperparameters({**suggest(point, sweep), "epochs": sweep.epochs, "seed": 0})
    total = torch.cuda.get_device_properties(device).total_memory
    chosen, k = 1, 1
    while k <= limit and k * train_hp.get("batch_size", 100) <= len(data.train_x):
        try:
            torch.cuda.reset_peak_memory_stats(device)
            pack = Pack(sweep.model, [model_hp] * k, [TrainConfig(**{**train_hp, "seed": i}) for i in range(k)],
                        len(data.train_x), device)
            steps = pack.steps(data.train_x, data.train_y)
            order = pack.epoch_order()
            for s in range(3):
                steps(pack.batch(order, s % pack.steps_per_epoch), s % (pack.epochs * pack.steps_per_epoch))
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            for s in range(DRY_RUN_STEPS):
                steps(pack.batch(order, s % pack.steps_per_epoch), s % (pack.epochs * pack.steps_per_epoch))
            torch.cuda.synchronize(device)
            seconds = (time.perf_counter() - started) / DRY_RUN_STEPS
            memory = torch.cuda.max_memory_allocated(device)
        except torch.cuda.OutOfMemoryError:
            log(f"pack dry run: K={k} does not fit in memory")
            break
        finally:
            pack = steps = None
            torch.cuda.empty_cache()
        log(f"pack dry run: K={k}: {seconds * 1e3:.2f} ms/step, {memory / 2**30:.2f} GiB")
        if seconds > PACK_STEP_BOUND_S or memory > AUTO_MEMORY_SHARE * total:
            break
        chosen, k = k, 2 * k
    log(f"--pack auto: {chosen} trials per pack on {device} (step bound {PACK_STEP_BOUND_S * 1e3:.0f} ms, "
        f"at most {limit}: {why})")
    return chosen


class Heartbeats:
    """One thread recording the heartbeat of every live member (``optimize`` runs one per trial)."""

    def __init__(self, storage):
        self.storage, self.trial_ids = storage, set()
        self.lock, self.done = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def add(self, trial_id: int) -> None:
        with self.lock:
            self.trial_ids.add(trial_id)
        self.storage.record_heartbeat(trial_id)

    def remove(self, trial_id: int) -> None:
        with self.lock:
            self.trial_ids.discard(trial_id)

    def _beat(self) -> None:
        interval = self.storage.get_heartbeat_interval()
        while not self.done.wait(interval):
            with self.lock:
                ids = list(self.trial_ids)
            for trial_id in ids:
                self.storage.record_heartbeat(trial_id)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


@dataclass
class Member:
    trial: optuna.Trial
    model_hp: dict
    train_hp: dict
    retry_of: int | None
    run_id: str | None = None
    history: list = field(default_factory=list)
    epochs_done: int = 0

    @property
    def key(self) -> tuple:
        from mnist_tune.pack import shape_key

        return shape_key("", {**self.model_hp, **self.train_hp})

    @property
    def shape_params(self) -> dict:
        """The searched hyperparameters that change shapes, as the trial's params."""
        from mnist_tune.pack import PER_MEMBER

        return {k: v for k, v in self.trial.params.items() if k not in PER_MEMBER}


class MemberTrials:
    """Members in and out: each asked, started, ended and told as the one trial of a
    sequential worker is (Objective, run_lifecycle, optimize)."""

    def __init__(self, worker, trials_bar):
        self.worker, self.trials_bar = worker, trials_bar
        self.study, self.sweep, self.tracker = worker.study, worker.sweep, worker.tracker
        self.data, self.device = worker.data, worker.device

    def ask(self, beats: Heartbeats) -> Member | None:
        """A new (or retried) trial with its hyperparameters, as Objective._train starts one;
        None if it lost the race for the budget's last slot (closed FAIL, untrained) or repeats
        an earlier trial (ended as that one, untrained)."""
        with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": Heartbeats records it
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            trial = self.study.ask()
        beats.add(trial._trial_id)
        trials = self.study.get_trials(deepcopy=False)
        retry_of = RetryHeartbeatStaleTrialCallback.retried_trial_number(
            next(t for t in trials if t.number == trial.number))
        if retry_of is None and count_budget(trials, below=trial.number).used >= self.worker.settings.trials:
            trial.set_user_attr(SURPLUS_ATTR, True)
            beats.remove(trial._trial_id)
            self.study.tell(trial, state=TrialState.FAIL)
            return None
        trial.set_user_attr(WORKER_ATTR, this_worker())
        seed = (self.worker.settings.seed or 0) + trial.number
        hp = {**suggest(trial, self.sweep), "epochs": self.sweep.epochs, "seed": seed}
        if (earlier := warm.earlier_same(self.study, trial)) is not None:  # never train a configuration twice
            self.skip(trial, earlier, beats)
            return None
        model_hp, train_hp = split_hyperparameters(hp)
        return Member(trial, model_hp, train_hp, retry_of)

    def skip(self, trial: optuna.Trial, earlier, beats: Heartbeats) -> None:
        """End a duplicate untrained, as Objective does (warm.skip_duplicate says how)."""
        beats.remove(trial._trial_id)
        try:
            frozen = self.study.tell(trial, warm.skip_duplicate(trial, earlier, self.sweep.metric, self.worker.log))
        except optuna.TrialPruned:
            frozen = self.study.tell(trial, state=TrialState.PRUNED)
        self.worker._after_trial(frozen, self.trials_bar)

    def start(self, member: Member) -> None:
        from mnist_tune.models import build_model
        from mnist_tune.run import log_run_params
        from mnist_tune.train import TrainConfig

        member.run_id = self.worker.record.start_trial(member.trial.number, self.sweep.model,
                                                       self.sweep.sampler["name"], member.retry_of)
        member.trial.set_user_attr(record.RUN_ATTR, member.run_id)
        log_run_params(self.tracker, member.run_id, self.sweep.model, member.model_hp,
                       TrainConfig(**member.train_hp), self.data, self.device,
                       build_model(self.sweep.model, **member.model_hp))

    def end(self, member: Member, beats: Heartbeats, end: tuple[str, str], message: str = "",
            value: float | None = None) -> TrialState:
        """Close the member's run and tell its trial, as run_lifecycle + optimize do for one trial."""
        beats.remove(member.trial._trial_id)
        if member.run_id is not None:
            try:
                self.tracker.metrics.flush(member.run_id)
            finally:
                record.close_run(self.tracker, member.run_id, end, message)
        # the run's record, all but its model upload, is complete before the trial ends (record.tracking_failure)
        if (failed := record.tracking_failure(self.tracker, member.run_id)) and end == record.FINISHED:
            end, message = record.FAILED, f"its MLflow run {member.run_id} is FAILED: tracking failed ({failed})"
        if end in (record.FAILED, record.KILLED) and message:
            member.trial.set_user_attr(record.ERROR_ATTR, message[:1000])
        state = {record.FINISHED: TrialState.COMPLETE, record.PRUNED_END: TrialState.PRUNED}.get(end, TrialState.FAIL)
        frozen = self.study.tell(member.trial, value if state == TrialState.COMPLETE else None, state=state)
        self.worker._after_trial(frozen, self.trials_bar)
        return frozen.state

    def complete(self, member: Member, model, beats: Heartbeats) -> None:
        from mnist_tune.run import input_example
        from mnist_tune.train import evaluate

        _, test_acc = evaluate(model, self.data.test_x, self.data.test_y)
        self.tracker.metrics.queue(member.run_id, {record.TEST_METRIC: test_acc}, step=self.sweep.epochs)
        self.tracker.metrics.flush(member.run_id)
        model_uri = self.tracker.models.log_model(member.run_id, model, input_example(self.data))
        member.trial.set_user_attr(record.TEST_ACC_ATTR, test_acc)
        member.trial.set_user_attr(record.MODEL_URI_ATTR, model_uri)
        value = getattr(member.history[-1], self.sweep.metric)
        if self.end(member, beats, record.FINISHED, value=value) != TrialState.COMPLETE:
            return
        done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        better = self.worker.objective._better
        if all(better(value, t.value) for t in done if t.number != member.trial.number):
            self.worker.record.best_so_far(self.sweep.model, self.sweep.metric, value, test_acc, member.trial.number,
                                           member.run_id, model_uri)



class PackRound:
    """One round: ask up to K trials, train them as packs, tell every result."""

    def __init__(self, worker, size: int, trials_bar):
        self.worker, self.size, self.members = worker, size, MemberTrials(worker, trials_bar)
        self.study, self.sweep, self.tracker = worker.study, worker.sweep, worker.tracker
        self.data, self.device = worker.data, worker.device

    def run(self) -> None:
        optuna.storages.fail_stale_trials(self.study)
        with Heartbeats(self.study._storage) as beats:
            waiting: list[Member] = []
            try:
                # one shape per round: the first trial's shape, the others propose the rest
                self.ask_more(waiting, beats, 1)
                self.ask_more(waiting, beats, self.size - 1, waiting[0].shape_params if waiting else None)
                while waiting:
                    self.train_group(waiting, beats)
            except BaseException as e:
                end = record.KILLED if isinstance(e, KeyboardInterrupt) else record.FAILED
                for member in waiting:  # asked, not yet trained: they end as a single trial would
                    self.members.end(member, beats, end, record.error_text(e))
                raise

    def ask_more(self, waiting: list[Member], beats: Heartbeats, slots: int, shape: dict | None = None) -> None:
        """Ask up to ``slots`` trials, as many as the budget leaves (retries first), keeping at
        most one pack's worth waiting. With ``shape`` (searched hyperparameters that change
        shapes) each is enqueued with those values fixed and the sampler proposes the rest."""
        count = count_budget(self.study.get_trials(deepcopy=False))
        wanted = min(slots, self.size - len(waiting), count.waiting + max(0, self.worker.settings.trials - count.used))
        for i in range(wanted):
            if shape and i >= count.waiting:  # ask pops waiting trials (retries) first: no enqueue for those
                self.study.enqueue_trial(shape, skip_if_exists=False)
            if (member := self.members.ask(beats)) is not None:
                waiting.append(member)

    def _joining(self, waiting: list[Member], key: tuple, slots: int) -> list[Member]:
        joining = [m for m in waiting if m.key == key][:slots]
        for member in joining:
            waiting.remove(member)
        return joining

    def train_group(self, waiting: list[Member], beats: Heartbeats) -> None:
        """Train the first waiting trial's shape group as one pack, refilling freed slots with
        waiting trials of the group at epoch boundaries; the members leave as they end."""
        import torch

        from mnist_tune.pack import Pack
        from mnist_tune.train import EpochMetrics, TrainConfig

        key, shape = waiting[0].key, waiting[0].shape_params
        batch_size = waiting[0].train_hp.get("batch_size", 100)
        n_train = len(self.data.train_x)
        capacity = max(1, min(self.size, n_train // batch_size))  # K * B rows per step must fit the data
        live = self._joining(waiting, key, capacity)
        for member in live:
            self.members.start(member)
        pack = None
        try:
            pack = Pack(self.sweep.model, [m.model_hp for m in live], [TrainConfig(**m.train_hp) for m in live],
                        n_train, self.device)
            steps = pack.steps(self.data.train_x, self.data.train_y)
            while live:
                started = time.perf_counter()
                train_losses = pack.run_epoch(steps, self.data.train_x, stop.raise_if_requested)
                val_losses, val_accs = pack.evaluate(self.data.val_x, self.data.val_y)
                seconds = time.perf_counter() - started  # the pack's epoch: every member's epoch time
                staying = []
                for i, member in enumerate(live):
                    member.epochs_done += 1
                    train_loss = float(train_losses[i])
                    if not math.isfinite(train_loss):
                        self.members.end(member, beats, record.FAILED, "Diverged: training loss became "
                                         f"{train_loss} in epoch {member.epochs_done}")
                        continue
                    metrics = EpochMetrics(member.epochs_done, train_loss, val_losses[i], val_accs[i], seconds)
                    member.history.append(metrics)
                    self.tracker.metrics.queue(member.run_id, metrics.as_dict(), step=member.epochs_done)
                    value = getattr(metrics, self.sweep.metric)
                    member.trial.report(value, member.epochs_done)
                    if member.trial.should_prune():
                        self.members.end(member, beats, record.PRUNED_END,
                                         f"pruned after epoch {member.epochs_done} ({self.sweep.metric} {value:.4f})")
                    elif member.epochs_done == self.sweep.epochs:
                        self.members.complete(member, pack.member_model(i), beats)
                    else:
                        staying.append(i)
                stop.raise_if_requested()
                # refill: new trials of this group join now, others wait for the next pack; not while
                # another group waits already, so no trial waits longer than this pack's run
                if len(staying) < capacity and all(m.key == key for m in waiting):
                    self.ask_more(waiting, beats, capacity - len(staying), shape)
                joining = self._joining(waiting, key, capacity - len(staying))
                if len(staying) == len(live) and not joining:
                    continue
                for member in joining:
                    self.members.start(member)
                # compact to the members that stay, add the ones that join; then a new graph
                pack.keep_members(staying)
                pack.add_members([m.model_hp for m in joining], [TrainConfig(**m.train_hp) for m in joining])
                live = [live[i] for i in staying] + joining
                if live:
                    steps = pack.steps(self.data.train_x, self.data.train_y)
        except BaseException as e:
            end = record.KILLED if isinstance(e, KeyboardInterrupt) else record.FAILED
            for member in live:
                if member.trial._trial_id in beats.trial_ids:
                    self.members.end(member, beats, end, record.error_text(e))
            if isinstance(e, KeyboardInterrupt):
                raise
            self.worker.log(f"pack of trials {[m.trial.number for m in live]} failed: {record.error_text(e)}")
        finally:
            del pack
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def run_pack_round(worker, size: int, trials_bar) -> None:
    """Worker.run's loop body with packs: one round of up to ``size`` trials."""
    PackRound(worker, size, trials_bar).run()
