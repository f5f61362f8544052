"""Replay a sweep through pruning policies: compute spent against the best run found.

    python bench/pruning.py [--tracking-uri sqlite:///mlflow.db] [--experiment offgrid]
        [--model models:/NAME@ALIAS] [--orders 10] [--figure PATH] [--choose-on population]
        [--quantile-before-training 0.5]

Takes the finished runs of a population the predictor was not fitted on (default: the
``offgrid`` sweep, ``make offgrid``), and replays them as a sequential sweep in several random
job orders. Each policy sees, after every epoch of a job, what a live job would see: its own
``val_acc`` so far, the registered champion's prediction from its epochs so far (the same model
input as live prediction), and the jobs before it. Policies:

- ours (``mlflow_tg.prune.policies.PredictedPolicy``) at several quantiles;
- the median rule (``MedianPolicy``), as ``prune=median`` runs it;
- Optuna's MedianPruner, PercentilePruner, SuccessiveHalvingPruner and HyperbandPruner, the
  real classes, fed ``val_acc`` through ``trial.report`` / ``trial.should_prune``;
- keeping the top K jobs by ``val_acc`` after one epoch (Egele et al. 2023), and no pruning.

For each it prints the share of epochs trained, the regret (best final test accuracy among the
jobs that trained their whole budget minus the best of the population, in points; 0 is best)
and the recall of the population's top 10%, averaged over the orders, and draws compute against
regret (``--figure``, by default ``bench/figures/pruning.png``, the README's).

``--choose-on POPULATION`` picks ``prune.quantile`` the way a user can before a new sweep: it
replays the version's held-out runs of the population it was fitted on (configurations it never
saw) at each quantile of ``CHOICES``, takes the least compute that meets the target there
(regret ≤ 0.5 points, top-10% recall ≥ 0.9), and adds that setting to the replay of
``--experiment``. Nothing of ``--experiment`` enters the choice.

A version with a window k=0 answers before any training: ours may then stop a job at epoch 0
(no epoch trained), against the ``--quantile-before-training`` bar (``null``: the quantile).
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import optuna
import pandas as pd
from mlflow import MlflowClient
from out_of_population import usable

from mlflow_tg import keys
from mlflow_tg.predictor.answering import model_input
from mlflow_tg.predictor.registry import FeatureSpec
from mlflow_tg.prune.policies import MedianPolicy, Policy, PredictedPolicy, RunView
from mlflow_tg.tracking.runs import load_runs

FIGURE = Path(__file__).parent / "figures" / "pruning.png"
ORDERS = 10
# --choose-on: the settings tried on held-out runs, and the target a choice must meet there
CHOICES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
TARGET_REGRET, TARGET_RECALL = 0.5, 0.9


@dataclass
class Job:
    """One replayed run: its validation curve, final accuracy and predictions by epoch."""

    run_id: str
    val_acc: dict[int, float]
    final: float
    budget: int
    predicted: dict[int, tuple[float, float]]  # epoch → (prediction, upper end of its interval)


@dataclass
class Outcome:
    """What a policy spent and found on one job order."""

    epochs: int
    budget: int
    best_found: float
    top_recall: float


def load_jobs(client: MlflowClient, experiment: str, model_uri: str) -> list[Job]:
    """Every completed, unpruned run of the experiment, with the champion's predictions."""
    records = [
        r
        for r in load_runs(client, experiment)
        if r.history and keys.TARGET in r.metrics and r.tags.get(keys.PRUNED) != "true"
    ]
    return jobs_of(records, model_uri)


def held_out_jobs(client: MlflowClient, population: str, model_uri: str) -> list[Job]:
    """The runs of ``population`` that the version was fitted without (its recorded split)."""
    name, _, which = model_uri.removeprefix("models:/").partition("@")
    if which:
        version = client.get_model_version_by_alias(name, which)
    else:
        name, _, number = name.partition("/")
        version = client.get_model_version(name, number)
    spec = FeatureSpec.of_version(version)
    if spec.holdout is None:
        raise SystemExit(f"{model_uri} has no held-out split in its tags: nothing to choose on")
    records = usable(load_runs(client, population), spec.k)
    held = spec.holdout.rows([r.group for r in records])
    chosen = [r for r, h in zip(records, held, strict=True) if h]
    return jobs_of(chosen, f"models:/{name}/{version.version}")  # the version read above


def jobs_of(records: list, model_uri: str) -> list[Job]:
    """The replayable jobs among ``records``, with the version's predictions by epoch."""
    model = mlflow.pyfunc.load_model(model_uri)
    jobs = []
    for record in records:
        history = sorted(record.history, key=lambda row: row["epoch"])
        budget = int(history[-1]["epoch"])
        if budget < int(float(record.params.get("epochs", budget))):
            continue  # diverged before its budget: its final accuracy is known, nothing to prune
        jobs.append(
            Job(
                record.run_id,
                {int(row["epoch"]): row[keys.VAL_ACC] for row in history if keys.VAL_ACC in row},
                record.metrics[keys.TARGET],
                budget,
                predictions(model, history, record.params, record.run_id),
            )
        )
    return jobs


def predictions(model, history, params, run_id) -> dict[int, tuple[float, float]]:
    """The champion's answer from epochs 0..e, for every epoch e it can answer from."""
    frames, epochs = [], []
    first = min(model.unwrap_python_model().ks)  # a window 0 answers before any training
    for epoch in range(first, int(history[-1]["epoch"]) + 1):
        prefix = [row for row in history if row["epoch"] <= epoch]
        frames.append(model_input(prefix, params, f"{run_id}@{epoch}"))
        epochs.append(epoch)
    try:
        answer = model.predict(pd.concat(frames, ignore_index=True))
    except Exception:  # some prefixes are shorter than the smallest window: score one by one
        return predictions_one_by_one(model, frames, epochs)
    return {
        epoch: (row["predicted_test_acc"], row["predicted_test_acc_high"])
        for epoch, (_, row) in zip(epochs, answer.iterrows(), strict=True)
    }


def predictions_one_by_one(model, frames, epochs) -> dict[int, tuple[float, float]]:
    """Scores each prefix alone, skipping those the model has too few epochs for."""
    found = {}
    for epoch, frame in zip(epochs, frames, strict=True):
        try:
            row = model.predict(frame).iloc[0]
        except Exception:
            continue
        found[epoch] = (row["predicted_test_acc"], row["predicted_test_acc_high"])
    return found


def view(job: Job, epoch: int, completed: bool) -> RunView:
    """What a policy knows of a job after ``epoch``."""
    point, high = job.predicted.get(min(epoch, max(job.predicted, default=0)), (None, None))
    return RunView(
        val_acc={e: v for e, v in job.val_acc.items() if e <= epoch},
        predicted=point,
        predicted_high=high,
        final=job.final if completed else None,
    )


def replay_policy(policy: Policy, order: list[Job]) -> list[int]:
    """Epochs each job trains under a mlflow_tg policy, jobs run one after another."""
    mates, trained = [], []
    for job in order:
        stop = job.budget
        for epoch in range(job.budget):  # epoch 0: before training, from the initialisation
            if policy.decide(epoch, view(job, epoch, False), mates):
                stop = epoch
                break
        trained.append(stop)
        mates.append(view(job, stop, completed=stop == job.budget))
    return trained


def replay_optuna(make_pruner: Callable[[], optuna.pruners.BasePruner], order: list[Job]):
    """Epochs each job trains under an Optuna pruner fed the replayed val_acc curves."""
    # Hyperband assigns trials to brackets by a hash of the study's name: a name fixed by the
    # order makes each replay reproducible (Optuna's default name is a random UUID)
    name = "replay " + " ".join(job.run_id for job in order)
    study = optuna.create_study(direction="maximize", pruner=make_pruner(), study_name=name)
    trained = []
    for job in order:
        trial, stop = study.ask(), job.budget
        for epoch in range(1, job.budget + 1):
            trial.report(job.val_acc.get(epoch, 0.0), epoch)
            if epoch < job.budget and trial.should_prune():
                stop = epoch
                break
        state = optuna.trial.TrialState.PRUNED if stop < job.budget else None
        study.tell(trial, None if state else job.val_acc[job.budget], state=state)
        trained.append(stop)
    return trained


def replay_top_k(fraction: float, order: list[Job]) -> list[int]:
    """Every job trains one epoch; the best ``fraction`` by val_acc@1 train on."""
    keep = max(1, round(fraction * len(order)))
    ranked = sorted(order, key=lambda job: -job.val_acc.get(1, 0.0))[:keep]
    kept = {job.run_id for job in ranked}
    return [job.budget if job.run_id in kept else 1 for job in order]


def outcome(order: list[Job], trained: list[int]) -> Outcome:
    """Compute spent, best completed job and top-10% recall of one replay."""
    completed = [job for job, epochs in zip(order, trained, strict=True) if epochs == job.budget]
    top = sorted(order, key=lambda job: -job.final)[: math.ceil(0.1 * len(order))]
    done = {job.run_id for job in completed}
    return Outcome(
        epochs=sum(trained),
        budget=sum(job.budget for job in order),
        best_found=max((job.final for job in completed), default=0.0),
        top_recall=sum(job.run_id in done for job in top) / len(top),
    )


BEFORE_TRAINING = PredictedPolicy.quantile_before_training  # prune.quantile_before_training


def ours(
    quantile: float, warmup: int = 5, before: float | None = BEFORE_TRAINING
) -> Callable[[list[Job]], list[int]]:
    """``prune=predicted`` at one setting, as a replay (``before``: its bar at epoch 0)."""
    policy = PredictedPolicy(quantile=quantile, warmup=warmup, quantile_before_training=before)
    return lambda order: replay_policy(policy, order)


def policies(before: float | None) -> dict[str, Callable[[list[Job]], list[int]]]:
    """Every policy of the comparison, by name."""
    found: dict[str, Callable[[list[Job]], list[int]]] = {
        "no pruning": lambda o: [j.budget for j in o]
    }
    for quantile in (0.5, 0.75, 0.9):
        for warmup in (5, 10):
            found[f"ours q={quantile} warmup={warmup}"] = ours(quantile, warmup, before)
    found["median rule (prune=median)"] = lambda o: replay_policy(MedianPolicy(warmup=5), o)
    pruners = {
        "optuna MedianPruner": lambda: optuna.pruners.MedianPruner(n_startup_trials=5),
        "optuna PercentilePruner 25": lambda: optuna.pruners.PercentilePruner(
            25.0, n_startup_trials=5
        ),
        "optuna PercentilePruner 75": lambda: optuna.pruners.PercentilePruner(
            75.0, n_startup_trials=5
        ),
        "optuna SuccessiveHalvingPruner": optuna.pruners.SuccessiveHalvingPruner,
        "optuna HyperbandPruner": lambda: optuna.pruners.HyperbandPruner(min_resource=1),
    }
    for name, make in pruners.items():
        found[name] = lambda o, m=make: replay_optuna(m, o)
    for fraction in (0.05, 0.1, 0.2):
        found[f"top {fraction:.0%} after 1 epoch"] = lambda o, f=fraction: replay_top_k(f, o)
    return found


def main() -> None:
    """Replay, print the table, draw the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="offgrid")
    parser.add_argument("--model", default=f"models:/{keys.REGISTERED_MODEL}@{keys.CHAMPION}")
    parser.add_argument("--orders", type=int, default=ORDERS)
    parser.add_argument("--figure", type=Path, default=FIGURE, help="where to draw the figure")
    parser.add_argument(
        "--choose-on",
        metavar="POPULATION",
        help="first pick prune.quantile on the version's held-out runs of POPULATION (the "
        "experiment it was fitted on), then replay that choice beside the others",
    )
    parser.add_argument(
        "--quantile-before-training",
        type=lambda text: None if text == "null" else float(text),
        default=BEFORE_TRAINING,
        help="prune.quantile_before_training of every setting of ours (null: the quantile)",
    )
    args = parser.parse_args()
    before = args.quantile_before_training
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    mlflow.set_tracking_uri(args.tracking_uri)
    logging.getLogger("mlflow.models.utils").setLevel(logging.ERROR)  # extra history columns
    client = MlflowClient()
    compared = policies(before)
    if args.choose_on:
        held = held_out_jobs(client, args.choose_on, args.model)
        print(f"choosing prune.quantile on the version's held-out runs of {args.choose_on!r}:")
        settings = {f"ours q={q} warmup=5": ours(q, before=before) for q in CHOICES}
        tried = replay_all(settings, held, args.orders)
        quantile = choose(dict(zip(CHOICES, tried, strict=True)))
        compared[f"ours q={quantile} (chosen on held-out)"] = ours(quantile, before=before)
        print()
    jobs = load_jobs(client, args.experiment, args.model)
    draw(replay_all(compared, jobs, args.orders), args.figure)


def replay_all(
    named: dict[str, Callable[[list[Job]], list[int]]], jobs: list[Job], orders: int
) -> list[tuple[str, float, float, float]]:
    """Each policy over the same random job orders: its compute, regret and recall, printed."""
    best = max(job.final for job in jobs)
    rng = np.random.default_rng(0)
    shuffled = [list(rng.permutation(np.array(jobs, dtype=object))) for _ in range(orders)]
    print(f"{len(jobs)} runs, {orders} random job orders, best final test accuracy {best:.4f}")
    print(f"{'policy':36s} {'epochs':>7s} {'regret (points)':>16s} {'top-10% recall':>15s}")
    rows = []
    for name, replay in named.items():
        results = [outcome(order, replay(order)) for order in shuffled]
        share = np.mean([r.epochs / r.budget for r in results])
        regret = np.mean([100 * (r.best_found - best) for r in results])
        recall = np.mean([r.top_recall for r in results])
        rows.append((name, share, regret, recall))
        print(f"{name:36s} {share:7.1%} {regret:16.2f} {recall:15.2f}")
    return rows


def choose(tried: dict[float, tuple[str, float, float, float]]) -> float:
    """The quantile of least compute meeting the target on the runs replayed, else the lowest."""
    meeting = {
        q: share
        for q, (_, share, regret, recall) in tried.items()
        if -regret <= TARGET_REGRET and recall >= TARGET_RECALL
    }
    chosen = min(meeting, key=meeting.get) if meeting else min(tried)
    print(f"chosen: prune.quantile={chosen} ({'meets' if meeting else 'none meets'} the target: "
          f"regret <= {TARGET_REGRET} points, top-10% recall >= {TARGET_RECALL})")  # fmt: skip
    return chosen


def draw(rows: list[tuple[str, float, float, float]], path: Path) -> None:
    """Compute against regret, one point per policy."""
    figure, axis = plt.subplots(figsize=(8, 5))
    for name, share, regret, _ in rows:
        marker = "o" if name.startswith("ours") else ("s" if "optuna" in name else "^")
        axis.scatter(100 * share, regret, marker=marker, label=name)
    axis.set_xlabel("epochs trained (% of the sweep's budget)")
    axis.set_ylabel("regret: best found - best in population (points)")
    axis.legend(fontsize="x-small", loc="lower right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
