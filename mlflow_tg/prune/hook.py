"""The pruning hook of a training job: reads its sweep-mates from the tracking store, decides.

Mates are the other runs of the same experiment that carry the same ``mlflow_tg.sweep`` tag
(that of the job's Hydra multirun, or ``prune.sweep`` to group jobs launched apart), so jobs
of one sweep running in parallel (``hydra/launcher=joblib``, one tracking server) see each
other as they go. A pruned run stops after the epoch, is evaluated on the test split as it
is, ends FINISHED, and is tagged ``pruned=true`` with its epoch and the reason; a run the policy
let through is tagged ``pruned=false``, so both sides can be filtered in the MLflow UI. The
predictor never learns from a pruned run: its final accuracy is not the full budget's.
"""

from __future__ import annotations

import logging

from mlflow import MlflowClient
from mlflow.entities import Run, RunStatus

from mlflow_tg import keys
from mlflow_tg.prune.policies import Policy, RunView
from mlflow_tg.tracking.run import RunLogger
from mlflow_tg.train.hooks import Epoch

log = logging.getLogger(__name__)
FINISHED = RunStatus.to_string(RunStatus.FINISHED)


class MateCurves:
    """Mates' ``val_acc`` curves, each read from the store only when it may have changed.

    The median rule compares every mate at every epoch. Read afresh each time, a sweep of N
    jobs of E epochs would ask the store for about N² x E histories; here a job reads a
    mate's history again only when the mate is still running and the cached curve lacks the
    epoch being decided, so a mate that ended is read once. Once, unless its latest
    ``val_acc`` (in the search's answer, so free) is not its curve's last: epochs that reached
    the store after the run was ended (``mlflow-tg reap`` ended it, ``replay`` delivered them).
    """

    def __init__(self) -> None:
        self.cached: dict[str, dict[int, float]] = {}
        self.ended: set[str] = set()  # curves read after their run ended: they cannot change

    def through(self, client: MlflowClient, mate: Run, epoch: int) -> dict[int, float]:
        """The mate's curve, complete at least up to ``epoch`` as far as the mate got."""
        run_id = mate.info.run_id
        curve = self.cached.get(run_id)
        if run_id in self.ended and grew_after_end(curve, mate):
            self.ended.discard(run_id)
            curve = None
        if curve is None or (run_id not in self.ended and epoch not in curve):
            ended = RunStatus.is_terminated(RunStatus.from_string(mate.info.status))
            history = client.get_metric_history(run_id, keys.VAL_ACC)
            curve = self.cached[run_id] = {point.step: point.value for point in history}
            if ended:  # status read before the history: nothing can follow what was read
                self.ended.add(run_id)
        return curve


def grew_after_end(curve: dict[int, float], mate: Run) -> bool:
    """Whether the mate's latest ``val_acc`` in the store is not the last of ``curve``."""
    latest = mate.data.metrics.get(keys.VAL_ACC)
    return bool(curve) and latest is not None and latest != curve[max(curve)]


def as_view(run: Run, val_acc: dict[int, float] | None = None) -> RunView:
    """What a policy may know of a mate found in the store."""
    metrics, tags = run.data.metrics, run.data.tags
    completed = (
        run.info.status == FINISHED
        and tags.get(keys.PRUNED) != "true"
        and tags.get(keys.DIVERGED) != "true"
    )
    return RunView(
        val_acc=val_acc or {},
        predicted=metrics.get(keys.PREDICTED),
        predicted_high=metrics.get(keys.PREDICTED_HIGH),
        final=metrics.get(keys.TARGET) if completed else None,
    )


class SweepPruner:
    """Stops a job of a sweep when its policy says so (see the module docstring)."""

    def __init__(self, policy: Policy, needs_curves: bool, sweep: str | None = None) -> None:
        self.policy = policy
        self.sweep = sweep  # None: the run's own mlflow_tg.sweep tag (its Hydra multirun)
        self.experiment_id: str | None = None
        self.needs_curves = needs_curves  # the median rule compares val_acc epoch by epoch
        self.curves = MateCurves()
        self.val_acc: dict[int, float] = {}

    def on_epoch(self, epoch: Epoch, run: RunLogger) -> None:
        """Decide after the epoch's own metrics (a live prediction included) are known."""
        if keys.VAL_ACC in epoch.metrics:
            self.val_acc[epoch.number] = epoch.metrics[keys.VAL_ACC]
        if epoch.number == 0:
            run.set_tag(keys.PRUNED, "false")
            self.find_sweep(run)
        view = RunView(
            val_acc=self.val_acc,
            predicted=epoch.metrics.get(keys.PREDICTED),
            predicted_high=epoch.metrics.get(keys.PREDICTED_HIGH),
        )
        if not self.policy.ready(epoch.number, view):  # nothing to decide on: mates not read
            return
        reason = self.policy.decide(epoch.number, view, self.mates(run, epoch.number))
        if reason:
            run.set_tag(keys.PRUNED, "true")
            run.set_tag(keys.PRUNED_EPOCH, epoch.number)
            run.set_tag(keys.PRUNED_BY, reason)
            epoch.stop = f"pruned, {reason}"

    def find_sweep(self, run: RunLogger) -> None:
        """The run's experiment and sweep, read once: they do not change while it trains."""
        this = MlflowClient().get_run(run.run_id)
        self.experiment_id = this.info.experiment_id
        self.sweep = self.sweep or this.data.tags.get(keys.SWEEP)
        if self.sweep is None:
            log.warning("pruning is on but this run is not part of a sweep (-m): no mates")

    def mates(self, run: RunLogger, epoch: int) -> list[RunView]:
        """The other runs of this run's sweep, as the store has them after ``epoch``."""
        if self.experiment_id is None:  # a caller that began after epoch 0
            self.find_sweep(run)
        if self.sweep is None:
            return []
        client = MlflowClient()
        found = client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{keys.SWEEP}` = '{self.sweep}'",
            max_results=10_000,
        )
        mates = [mate for mate in found if mate.info.run_id != run.run_id]
        if not self.needs_curves:
            return [as_view(mate) for mate in mates]
        return [as_view(mate, self.curves.through(client, mate, epoch)) for mate in mates]

    def on_end(self, run: RunLogger) -> None:
        """Nothing to log at the end."""
