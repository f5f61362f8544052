"""The performance predictor's answers for runs, with MLflow left out: it takes runs, not columns.

**Request** (``dataframe_split``; the signature on MLflow's model page lists the columns): one
row per (run, epoch): ``run_id`` (string) and ``epoch`` (long), required; the run's metrics as
``history.parquet`` names them (double), and its params by their key (string: ``model.name``,
``optimizer.lr``, ``width`` … those the ``hparams`` features read). Metrics and params are
declared optional, so that a request lacking one reaches the model, which refuses it naming the
run, what is missing and the setting that logs it; MLflow's schema check drops any column the
signature does not name (the other metrics of ``history.parquet``). Several runs go in one
request; ``model_input`` builds one run's rows in Python.

**Answer**: one row per run, in request order: ``run_id``, ``k`` (the window used: the largest
of the version's ``ks`` whose epochs 0..k the run has), ``predicted_test_acc`` and its 80%
interval ``predicted_test_acc_low`` / ``predicted_test_acc_high`` (clipped to [0, 1] and sorted,
so low ≤ point ≤ high), ``out_of_distribution`` (bool) and ``ood_reasons`` (``"; "``-joined,
empty when none).

**Uncertainty**: one CatBoost ``MultiQuantile:alpha=0.1,0.5,0.9`` ensemble per window (fits
averaged quantile by quantile, ``ensemble.py``); the point is the middle quantile and the
interval the outer ones, once the three are sorted (separate quantile fits can cross), the
interval widened by a calibration on the training runs (conformalized quantile
regression, ``calibrate.py``); a run flagged out of distribution (below) by at least as much
as folds beyond the trained widths and learning rates ask (``calibrate.outside_widening``).
Measured with one fit (``ensemble=1``) by
``bench/predictor_uncertainty.py`` on 337 runs of the population (k=3, 600 trees, 32 columns,
3 held-out quarters of the configurations; coverage of the 80% interval / mean width / Kendall τ
of the point): MultiQuantile 0.44 / 0.037 / 0.831; ``RMSEWithUncertainty`` (mean ± 1.28 σ)
0.51 / 0.057 / 0.752; virtual ensembles (knowledge + data uncertainty) 0.50 / 0.062 / 0.750;
MultiQuantile calibrated 0.85 / 0.117 / 0.831. No uncalibrated interval comes near 0.8; the
quantile model ranks runs best (its median, not a mean between chance level and the top of a
bimodal outcome), and only its calibrated interval holds the nominal share.

**Out of distribution**: a run is flagged, and answered all the same, when a category
(``model``, ``optimizer``, ``lr_schedule``, ``data``) was never seen in training, when a numeric
hyperparameter (width, learning rate, weight decay, momentum, batch size, epochs, dropout,
BatchNorm) lies outside the range of the training runs, or when its feature row is far from
every training row: nearest-neighbour distance over the model's numeric columns, standardized
with the training mean and spread (NaN-aware, as scikit-learn's ``nan_euclidean``), above the
99th percentile of the training rows' own nearest-neighbour distances, each sought among the
other configurations' runs (a seed-twin would make every training row look close, and flag
most runs of a new configuration).

**Refusals** (``Refusal``; ``model.py`` makes it MLflow's ``INVALID_PARAMETER_VALUE``, HTTP
400 from ``mlflow models serve``), naming each run: no epochs 0..k for the smallest k; a metric
the model reads lacking at an epoch it reads (graph summaries: with the ``graph.*`` setting that
logs them); a param the model or the distribution check reads, unless training runs lacked it
too (``optimizer.momentum`` of Adam runs): that absence is a value the model learned from, not a
gap. Nothing is filled in.

``model.py`` wraps ``RunAnswerer`` as the registered MLflow pyfunc model. Each version also
carries its answerer without the wrapper (``answerer.pkl``, beside the CatBoost files), so that
``mlflow-tg predict`` answers on a local store without importing MLflow, which alone takes
longer than the whole command may.
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlflow_tg import keys
from mlflow_tg.errors import Refusal
from mlflow_tg.predictor.ensemble import Ensemble
from mlflow_tg.predictor.features import (
    CATEGORICAL_HPARAMS,
    MISSING_CATEGORY,
    NUMERIC_HPARAMS,
    hparam_features,
    metric_reads,
    param_of,
    parse_sets,
    run_features,
    set_of,
)

PARAM_KEYS = [*(key for key, _ in NUMERIC_HPARAMS.values()), *CATEGORICAL_HPARAMS.values()]
NEIGHBOUR_PERCENTILE = 99  # of training rows' leave-one-out distances: above it, far
UNUSUAL_SHOWN = 3  # columns named in a "far from the training runs" reason
# the answer's columns and their MLflow types, in order
OUTPUT_COLUMNS = {
    keys.RUN_ID: "string",
    keys.ANSWER_K: "long",
    keys.ANSWER: "double",
    keys.ANSWER_LOW: "double",
    keys.ANSWER_HIGH: "double",
    keys.ANSWER_OOD: "boolean",
    keys.ANSWER_OOD_REASONS: "string",
}
ANSWERER = "answerer"  # the artifact of a version's answerer, beside its catboost_k{k}*


def quantiles_of(loss_function: str) -> tuple[float, float, float]:
    """``(low, 0.5, high)`` of ``MultiQuantile:alpha=low,0.5,high``; ValueError otherwise."""
    found = re.fullmatch(r"MultiQuantile:alpha=([0-9.]+),([0-9.]+),([0-9.]+)", loss_function)
    alphas = tuple(float(alpha) for alpha in found.groups()) if found else ()
    if len(alphas) != 3 or not 0 < alphas[0] < alphas[1] == 0.5 < alphas[2] < 1:
        raise ValueError(
            f"catboost.loss_function={loss_function!r} is not allowed: the predictor answers "
            "a median and an interval, so it must be MultiQuantile:alpha=LOW,0.5,HIGH with "
            "0 < LOW < 0.5 < HIGH < 1 (for example MultiQuantile:alpha=0.1,0.5,0.9)."
        )
    return alphas


def to_interval(raw: np.ndarray, widen: float | np.ndarray = 0.0) -> np.ndarray:
    """A MultiQuantile model's (n, 3) output as (low, point, high), clipped to [0, 1].

    Sorted (quantile models may cross), then the ends moved out by ``widen`` (one value, or one
    per row): the interval's calibration (``calibrate.py``).
    """
    interval = np.sort(np.asarray(raw, float).reshape(len(raw), -1), axis=1)
    interval[:, 0] -= widen
    interval[:, -1] += widen
    return np.clip(interval, 0.0, 1.0)


def model_input(
    history: Sequence[Mapping[str, float | None]], params: Mapping[str, str], run_id: str
) -> pd.DataFrame:
    """One run's request rows: its history (one row per epoch) with its params on every row.

    ``history`` is ``history.parquet`` as rows (``epoch`` plus one key per metric); graph keys of
    older runs (``tg.x.gini``) take today's form. Params are the run's (MLflow's strings); only
    those the hparams features read are kept. Concatenate frames to ask about several runs.
    """
    rows = sorted(history, key=lambda row: row[keys.EPOCH])
    metrics = list(dict.fromkeys(key for row in rows for key in row if key != keys.EPOCH))
    columns: dict[str, Any] = {
        keys.RUN_ID: pd.Series([str(run_id)] * len(rows), dtype=object),
        keys.EPOCH: pd.Series([int(row[keys.EPOCH]) for row in rows], dtype="int64"),
    }
    for metric in metrics:
        values = [row.get(metric) for row in rows]
        columns[keys.upgrade_graph_key(metric)] = pd.Series(
            [math.nan if v is None else v for v in values], dtype="float64"
        )
    for key in PARAM_KEYS:
        if key in params:
            columns[key] = pd.Series([str(params[key])] * len(rows), dtype=object)
    return pd.DataFrame(columns)


def nan_distances(queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Euclidean distances over the coordinates both have, scaled up to all of them.

    scikit-learn's ``nan_euclidean_distances``; a pair with no coordinate in common is ``inf``.
    """
    have_q, have_r = ~np.isnan(queries), ~np.isnan(rows)
    q, r = np.where(have_q, queries, 0.0), np.where(have_r, rows, 0.0)
    squared = (q**2) @ have_r.T + have_q @ (r**2).T - 2 * q @ r.T
    shared = have_q.astype(float) @ have_r.T.astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.maximum(squared, 0) * queries.shape[1] / shared
    return np.sqrt(np.where(shared > 0, scaled, np.inf))


@dataclass
class Reference:
    """What the training runs of one window looked like: the out-of-distribution yardstick."""

    categories: dict[str, list[str]]  # hparams category → values seen
    ranges: dict[str, tuple[float, float]]  # numeric hparam → (min, max) seen; NaN: never set
    lacked: list[str]  # hparams some training run lacked (NaN, or category "none")
    numeric: list[str]  # the model's numeric columns, for the distance
    mean: np.ndarray
    scale: np.ndarray
    rows: np.ndarray  # training rows, standardized
    threshold: float  # 99th percentile of their nearest-neighbour distances, own config left out

    @classmethod
    def of(
        cls, hparams: pd.DataFrame, matrix: pd.DataFrame, groups: Sequence[str] | None = None
    ) -> Reference:
        """From the training runs' hparams features and their rows of the model's columns.

        ``groups``: each run's training configuration. A run's nearest neighbour is sought
        among the other configurations' runs (leaving its seed-twins out), as for a run of a
        configuration the model has not seen; without groups, among all other runs.
        """
        categories = {name: sorted(set(hparams[name].astype(str))) for name in CATEGORICAL_HPARAMS}
        ranges = {
            name: (float(np.nanmin(values)), float(np.nanmax(values)))
            if np.isfinite(values := hparams[name].to_numpy(float)).any()
            else (math.nan, math.nan)
            for name in NUMERIC_HPARAMS
        }
        lacked = [name for name in NUMERIC_HPARAMS if hparams[name].isna().any()] + [
            name for name in CATEGORICAL_HPARAMS if (hparams[name] == MISSING_CATEGORY).any()
        ]
        numeric = [column for column in matrix.columns if column not in CATEGORICAL_HPARAMS]
        values = matrix[numeric].to_numpy(float)
        with warnings.catch_warnings():  # a column no training run has: mean 0, scale 1
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nan_to_num(np.nanmean(values, axis=0))
            spread = np.nanstd(values, axis=0)
        scale = np.where(np.isfinite(spread) & (spread > 0), spread, 1.0)
        rows = (values - mean) / scale
        own = nan_distances(rows, rows)
        np.fill_diagonal(own, np.inf)
        if groups is not None:
            configuration = np.asarray(groups, dtype=object)
            own[configuration[:, None] == configuration[None, :]] = np.inf
        nearest = own.min(axis=1) if len(rows) > 1 else np.array([])
        nearest = nearest[np.isfinite(nearest)]
        threshold = float(np.percentile(nearest, NEIGHBOUR_PERCENTILE)) if len(nearest) else np.inf
        return cls(categories, ranges, lacked, numeric, mean, scale, rows, threshold)

    def hparam_reasons(self, hparams: Mapping[str, float | str]) -> list[str]:
        """Unseen categories and hyperparameters outside the trained ranges, in words."""
        reasons = []
        for name, seen in self.categories.items():
            if hparams[name] not in seen:
                reasons.append(f"{name} {hparams[name]!r} not seen in training ({', '.join(seen)})")
        for name, (low, high) in self.ranges.items():
            value = hparams[name]
            if math.isnan(value):
                continue
            shown, low_shown, high_shown = (
                (10**value, 10**low, 10**high) if name == "log10_lr" else (value, low, high)
            )
            label = "lr" if name == "log10_lr" else name
            if math.isnan(low):
                reasons.append(f"{label} {shown:g} set, but no training run set it")
            elif not low - 1e-9 <= value <= high + 1e-9:
                reasons.append(
                    f"{label} {shown:g} outside trained range [{low_shown:g}, {high_shown:g}]"
                )
        return reasons

    def reasons(
        self, hparams: Sequence[Mapping[str, float | str]], numeric: np.ndarray
    ) -> list[list[str]]:
        """Why each run is out of distribution; an empty list when it is not.

        ``hparams``: each run's ``hparam_features``; ``numeric``: its row of the numeric columns.
        """
        far = self.distance_reasons(numeric)
        return [
            self.hparam_reasons(h) + ([f] if f else []) for h, f in zip(hparams, far, strict=True)
        ]

    def distance_reasons(self, numeric: np.ndarray) -> list[str]:
        """For each row of the model's numeric columns: why it is far from every training row.

        '' when it is not.
        """
        if not self.numeric or not len(self.rows):
            return [""] * len(numeric)
        z = (numeric - self.mean) / self.scale
        nearest = nan_distances(z, self.rows).min(axis=1)
        reasons = []
        for row, distance in zip(z, nearest, strict=True):
            if distance <= self.threshold:
                reasons.append("")
                continue
            order = np.argsort(-np.nan_to_num(np.abs(row), nan=-1.0))[:UNUSUAL_SHOWN]
            unusual = ", ".join(f"{self.numeric[i]} z={row[i]:+.1f}" for i in order)
            reasons.append(
                f"features far from the training runs: nearest-neighbour distance {distance:.2f} "
                f"above {self.threshold:.2f}, the {NEIGHBOUR_PERCENTILE}th percentile of the "
                f"training runs' own (most unusual: {unusual})"
            )
        return reasons


@dataclass
class Window:
    """The model of one window k: its columns, what it reads of a run, its training runs."""

    k: int
    columns: list[str]  # the CatBoost ensemble's, in its order
    reference: Reference
    widen: float = 0.0  # each end of the interval moves out by this much (calibrate.py)
    widen_outside: float = 0.0  # ... for a run flagged out of distribution, if more
    metrics: dict[str, list[int]] = field(init=False)  # metric → the epochs it reads
    params: list[str] = field(init=False)  # param keys a run must have
    sets: tuple[str, ...] = field(init=False)  # the feature sets its columns belong to

    def __post_init__(self) -> None:
        self.metrics = {}
        for column in self.columns:
            if set_of(column) != "hparams":
                metric, epochs = metric_reads(column, self.k)
                if keys.is_graph_metric(metric):
                    epochs = [0, *epochs]  # run_features finds a run's graph metrics at epoch 0
                self.metrics[metric] = sorted({*self.metrics.get(metric, []), *epochs})
        lacked = {param_of(name) for name in self.reference.lacked}
        self.params = [key for key in PARAM_KEYS if key not in lacked]
        self.sets = parse_sets({set_of(column) for column in self.columns})

    def flags(self, matrix: pd.DataFrame, params: Sequence[Mapping[str, str]]) -> np.ndarray:
        """Which runs (rows of this window's columns, and their params) its answers flag."""
        numeric = [column for column in self.columns if column not in CATEGORICAL_HPARAMS]
        hparams = [hparam_features(run) for run in params]
        reasons = self.reference.reasons(hparams, matrix[numeric].to_numpy(float))
        return np.array([bool(reason) for reason in reasons], dtype=bool)

    def widening(self, flagged: np.ndarray) -> np.ndarray:
        """How far each run's interval widens: more for the runs flagged out of distribution."""
        return np.where(flagged, max(self.widen, self.widen_outside), self.widen)


def how_to_log(metric: str) -> str:
    """The training setting that logs ``metric``."""
    if not keys.is_graph_metric(metric):
        return "train.py logs it at every epoch"
    centrality = metric[len(keys.GRAPH_PREFIX) :].split("/", 1)[0]
    if centrality == keys.GRAPH_SIZE:
        return "logged with graph.enabled=true"
    return f"logged with graph.enabled=true and graph.centralities including {centrality}"


def unseen_model_hint(reference: Reference, params: Mapping[str, str]) -> str:
    """Why a run lacks params every training run had: its architecture is not among theirs.

    Params such as ``model.batch_norm`` exist for some architectures only, so a version fitted
    on one family cannot read a run of another; no setting of that run would log them.
    """
    seen = reference.categories.get("model", [])
    model = params.get(CATEGORICAL_HPARAMS["model"])
    if model is None or model in seen:
        return ""
    return (
        f" (this version was fitted on runs of model {', '.join(seen)} only, and model "
        f"{model!r} has no such setting: predict it with a version fitted on runs that include "
        f"{model} models, python -m mlflow_tg.predictor source_experiment=EXPERIMENT)"
    )


def epochs_text(epochs: Sequence[int]) -> str:
    """``epochs 0..3`` or ``epochs 1, 3`` or ``epoch 2``."""
    epochs = sorted(epochs)
    if len(epochs) == 1:
        return f"epoch {epochs[0]}"
    if epochs == list(range(epochs[0], epochs[-1] + 1)):
        return f"epochs {epochs[0]}..{epochs[-1]}"
    return "epochs " + ", ".join(map(str, epochs))


def present(value: Any) -> bool:
    """Whether a request cell holds a value (not None, NaN or empty)."""
    return value is not None and not pd.isna(value) and value != ""


class RunAnswerer:
    """Final test accuracy of runs from their first epochs: one CatBoost ensemble per window."""

    def __init__(
        self,
        windows: Sequence[Window],
        quantiles: tuple[float, float, float],
        models: Mapping[int, Any] | None = None,
    ):
        self.windows = {window.k: window for window in sorted(windows, key=lambda w: w.k)}
        self.quantiles = tuple(quantiles)
        self._models = dict(models or {})

    def __getstate__(self) -> dict:
        """Pickled without the CatBoost models: they travel as artifacts (``artifacts``)."""
        return self.__dict__ | {"_models": {}}

    @property
    def ks(self) -> list[int]:
        """The windows, smallest first."""
        return list(self.windows)

    @property
    def nominal(self) -> float:
        """The interval's nominal coverage (0.8 for alphas 0.1 and 0.9)."""
        return round(self.quantiles[2] - self.quantiles[0], 6)

    def metrics_read(self) -> list[str]:
        """Every metric some window reads, sorted."""
        return sorted({metric for window in self.windows.values() for metric in window.metrics})

    def request_columns(self) -> list[str]:
        """The request's columns: run and epoch, the metrics read, the params."""
        return [keys.RUN_ID, keys.EPOCH, *self.metrics_read(), *PARAM_KEYS]

    def request(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` with the columns read only, as MLflow's schema check leaves a request."""
        declared = set(self.request_columns())
        return frame[[column for column in frame if column in declared]]

    def save_models(self, folder: Path) -> dict[str, str]:
        """Write the artifacts to log under ``folder``; their paths by name.

        Each window's ensemble (``catboost_k{k}``, ``catboost_k{k}_1``, … one file per fit), and
        this answerer as a plain ``RunAnswerer``, which unpickles without MLflow.
        """
        paths = {}
        for k, model in self._models.items():
            paths |= model.save(folder, f"catboost_k{k}")
        plain = RunAnswerer.__new__(RunAnswerer)
        plain.__dict__.update(self.__getstate__())
        paths[ANSWERER] = str(folder / f"{ANSWERER}.pkl")
        Path(paths[ANSWERER]).write_bytes(pickle.dumps(plain))
        return paths

    def load_models(self, artifacts: Mapping[str, str]) -> None:
        """Load each window's ensemble from the logged artifacts (name → local path).

        A version logged before the predictor averaged fits has one model per window, which
        loads as an ensemble of one.
        """
        self._models = {k: Ensemble.load(artifacts, f"catboost_k{k}") for k in self.windows}

    @staticmethod
    def load(artifacts: Mapping[str, str]) -> RunAnswerer:
        """A version's answerer, ready, from its artifacts (``save_models``), without MLflow."""
        answerer = pickle.loads(Path(artifacts[ANSWERER]).read_bytes())
        answerer.load_models(artifacts)
        return answerer

    def answer(self, frame: pd.DataFrame) -> pd.DataFrame:
        """One answer row per run of ``frame`` (rows per run and epoch), in order of appearance."""
        runs, refusals = self.read_runs(frame)
        if refusals:
            raise Refusal(
                f"cannot answer {len(refusals)} of the {len(runs) + len(refusals)} runs of the "
                "request:\n" + "\n".join(refusals)
            )
        answers = []
        for k, window in self.windows.items():
            chosen = [run for run in runs if run["k"] == k]
            if chosen:
                answers += self.answer_window(window, chosen)
        order = {run["run_id"]: i for i, run in enumerate(runs)}
        answers.sort(key=lambda row: order[row[keys.RUN_ID]])
        kinds = {keys.ANSWER_K: "int64", keys.ANSWER_OOD: bool, keys.RUN_ID: object,
                 keys.ANSWER_OOD_REASONS: object}  # fmt: skip
        return pd.DataFrame(
            {
                name: np.array([row[name] for row in answers], dtype=kinds.get(name, float))
                for name in OUTPUT_COLUMNS
            }
        )

    def answer_window(self, window: Window, runs: list[dict]) -> list[dict]:
        """Predictions, intervals and distribution checks of the runs answered from ``window``."""
        # numbers as floats, categories as strings, the model's columns in its order: a numpy
        # array, not a frame, which CatBoost converts column by column (1 ms for one run, ten
        # times the prediction itself); the predictions are the same
        categorical = [c in CATEGORICAL_HPARAMS for c in window.columns]
        matrix = np.array(
            [run["features"] for run in runs], dtype=object if any(categorical) else float
        )
        numeric = matrix[:, [not is_category for is_category in categorical]].astype(float)
        reasons = window.reference.reasons([run["hparams"] for run in runs], numeric)
        widen = window.widening(np.array([bool(r) for r in reasons]))
        low, point, high = to_interval(self._models[window.k].predict(matrix), widen).T
        answers = []
        for i, run in enumerate(runs):
            answers.append(
                {
                    keys.RUN_ID: run["run_id"],
                    keys.ANSWER_K: window.k,
                    keys.ANSWER: float(point[i]),
                    keys.ANSWER_LOW: float(low[i]),
                    keys.ANSWER_HIGH: float(high[i]),
                    keys.ANSWER_OOD: bool(reasons[i]),
                    keys.ANSWER_OOD_REASONS: "; ".join(reasons[i]),
                }
            )
        return answers

    def read_runs(self, frame: pd.DataFrame) -> tuple[list[dict], list[str]]:
        """Each run's window, features and hparams; and why each refused run is refused."""
        if keys.RUN_ID not in frame or keys.EPOCH not in frame or not len(frame):
            raise Refusal(
                f"the request has no rows with {keys.RUN_ID!r} and {keys.EPOCH!r} columns: send "
                "one row per run and epoch (see the model's signature)"
            )
        metrics = [c for c in frame.columns if c not in (keys.RUN_ID, keys.EPOCH, *PARAM_KEYS)]
        values = frame[metrics].to_numpy(float)
        # column by column: a frame of pandas' arrow strings converts to objects 4x slower
        params = {key: frame[key].tolist() for key in PARAM_KEYS if key in frame}
        epochs = frame[keys.EPOCH].to_numpy()
        codes, names = pd.factorize(frame[keys.RUN_ID].to_numpy(object).astype(str), sort=False)
        rows_of = np.split(np.argsort(codes, kind="stable"), np.cumsum(np.bincount(codes))[:-1])
        runs, refusals = [], []
        for name, rows in zip(names, rows_of, strict=True):
            run_id = str(name)
            by_epoch = {int(epochs[row]): row for row in rows}
            run_params = {}
            for key, column in params.items():
                value = next((column[row] for row in rows if present(column[row])), None)
                if value is not None:
                    run_params[key] = str(value)
            try:
                runs.append(self.read_run(run_id, by_epoch, values, metrics, run_params))
            except ValueError as refusal:
                refusals.append(f"- run {run_id}: {refusal}")
        return runs, refusals

    def read_run(
        self,
        run_id: str,
        by_epoch: dict[int, int],
        values: np.ndarray,
        metrics: list[str],
        params: dict[str, str],
    ) -> dict:
        """One run's window, features and hparams; ValueError saying what it lacks.

        The largest window the run has in full answers: a run whose later epoch lacks a metric
        (a skipped graph capture) is answered from the window before it, not refused.
        """
        ks = [k for k in self.windows if all(e in by_epoch for e in range(k + 1))]
        if not ks:
            smallest = self.ks[0]
            lacking = [e for e in range(smallest + 1) if e not in by_epoch]
            raise ValueError(
                f"it has {epochs_text(sorted(by_epoch)) if by_epoch else 'no epochs'} but the "
                f"predictor needs epochs 0..{smallest} at least (its windows: k in {self.ks}); "
                f"missing {epochs_text(lacking)}. Ask again when the run has got further."
            )
        column = {metric: i for i, metric in enumerate(metrics)}

        def logged(metric: str, epoch: int) -> bool:
            return metric in column and not math.isnan(values[by_epoch[epoch], column[metric]])

        largest = None  # what the largest window lacks: the refusal, when none answers
        for k in sorted(ks, reverse=True):
            lacking = self.lacking(self.windows[k], logged, params)
            if not lacking:
                break
            largest = largest or (k, lacking)
        else:
            raise ValueError(
                f"it lacks what the model of window k={largest[0]} (epochs 0..{largest[0]}) "
                "reads: " + "; ".join(largest[1])
            )
        window = self.windows[k]
        history = [
            {keys.EPOCH: e}
            | {m: float(values[by_epoch[e], column[m]]) for m in window.metrics if logged(m, e)}
            for e in range(k + 1)
        ]
        features = run_features(history, params, k, window.sets, run_id)
        return {
            "run_id": run_id,
            "k": k,
            "features": [features[c] for c in window.columns],
            "hparams": hparam_features(params),
        }

    @staticmethod
    def lacking(
        window: Window, logged: Callable[[str, int], bool], params: dict[str, str]
    ) -> list[str]:
        """What of the window's metrics and params the run does not have, each with its setting."""
        lacking = []
        for metric, needed in window.metrics.items():
            have = [e for e in needed if logged(metric, e)]
            if len(have) < len(needed):
                missing = [e for e in needed if e not in have]
                text = f"metric {metric} at {epochs_text(missing)}, {how_to_log(metric)}"
                if have and keys.is_graph_metric(metric):
                    text += f" (it has {epochs_text(have)}; graph.every_n_epochs=1 logs each)"
                lacking.append(text)
        missing_params = [f"param {key}" for key in window.params if key not in params]
        if missing_params:
            lacking.append("; ".join(missing_params) + unseen_model_hint(window.reference, params))
        return lacking


def fitted_window(
    k: int,
    model: Any,
    matrix: pd.DataFrame,
    hparams: pd.DataFrame,
    widen: float = 0.0,
    groups: Sequence[str] | None = None,
    widen_outside: float = 0.0,
) -> Window:
    """The window of a CatBoost ensemble, from its training runs' rows and hparams features.

    ``matrix`` holds the training rows (any columns, the model's among them), ``hparams`` the
    same runs' ``hparam_features`` and ``groups`` their configurations, in the same order;
    ``widen`` calibrates the interval, ``widen_outside`` that of runs out of distribution.
    """
    columns = list(model.feature_names_)
    reference = Reference.of(hparams, matrix[columns], groups)
    return Window(k, columns, reference, widen, widen_outside)
