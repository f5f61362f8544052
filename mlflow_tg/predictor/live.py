"""Live prediction inside a training job: the registered predictor asked after each epoch.

From the smallest window the registered version knows (its ``ks``) on, the run's own history
in memory (the same rows ``history.parquet`` holds) goes through the same model input as
``mlflow-tg predict`` builds from the store, to the champion loaded in this process or to a
served endpoint. The prediction, its 80% interval and the out-of-distribution flag are added to
the epoch's metrics (``predicted/*``, step = epoch), where a pruning policy can read them.
Without a registry, a champion, or a reachable endpoint, the job warns once and trains on.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import pandas as pd
from omegaconf import DictConfig

from mlflow_tg import keys
from mlflow_tg.predictor.answering import model_input
from mlflow_tg.predictor.describe import note_line, predicted_metrics
from mlflow_tg.predictor.endpoint import ask_endpoint
from mlflow_tg.predictor.registry import FeatureSpec
from mlflow_tg.predictor.scoring import load_run_predictor, model_columns
from mlflow_tg.tracking.run import RunLogger
from mlflow_tg.train.hooks import Epoch

log = logging.getLogger(__name__)


class LivePrediction:
    """Asks the registered predictor about the running job after each epoch from k on."""

    def __init__(self, cfg: DictConfig, params: dict[str, str]) -> None:
        self.cfg = cfg
        self.params = params
        self.model: Any = None
        self.first_epoch: int | None = None  # None until the model is found; then min(ks)
        self.disabled = False
        self.last: Any = None  # the latest answer, for the run's description
        self.shown: str | None = None  # the latest answer printed

    def on_epoch(self, epoch: Epoch, run: RunLogger) -> None:
        """Predict from epochs 0..now and add the answer to the epoch's metrics."""
        if self.disabled or (epoch.number == 0 and not self.load()):
            return
        if epoch.number < self.first_epoch:
            return
        rows = [*epoch.history, {keys.EPOCH: epoch.number, **epoch.metrics}]
        try:
            answer = self.ask(model_input(rows, self.params, run.run_id)).iloc[0]
        except Exception as error:  # a prediction is advice: training goes on without it
            self.give_up(f"the predictor could not score this run ({error})")
            return
        line = note_line(answer).replace("**", "")  # the description's markdown, as plain text
        if line != self.shown:  # printed when it changes: past the last window it repeats
            log.info("epoch %d: %s", epoch.number, line)
            self.shown = line
        self.last = answer
        epoch.metrics |= predicted_metrics(answer)

    def load(self) -> bool:
        """Find the registered version (and load it, unless an endpoint serves it)."""
        uri = f"models:/{self.cfg.model}@{self.cfg.alias}"
        try:
            version = mlflow.MlflowClient().get_model_version_by_alias(
                self.cfg.model, self.cfg.alias
            )
            spec = FeatureSpec.of_version(version)
            self.first_epoch = min(spec.ks or (spec.k,))  # a version without windows: k alone
            if not self.cfg.endpoint:
                # by number: the alias may move to another version between the two reads. Not
                # MLflow's check of pip requirements: a second per job, and a warning in every
                # job of a sweep for a patch release (mlflow-tg predict --verbose makes it)
                number = f"models:/{self.cfg.model}/{version.version}"
                self.model = load_run_predictor(number, check_requirements=False)
        except Exception as error:
            self.give_up(f"no usable {uri} in the registry ({type(error).__name__}: {error})")
            return False
        return True

    def ask(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The model's answer, in this process or from the endpoint."""
        if self.cfg.endpoint:
            return ask_endpoint(self.cfg.endpoint, frame)
        return self.model.predict(model_columns(self.model, frame))

    def give_up(self, why: str) -> None:
        """Warn once; the run trains on without live predictions."""
        log.warning("live prediction is off for this run: %s; training goes on", why)
        self.disabled = True

    def on_end(self, run: RunLogger) -> None:
        """The latest prediction, in the run's description."""
        if self.last is not None:
            run.describe(note_line(self.last))
