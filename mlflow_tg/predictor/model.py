"""The registered performance predictor: ``RunAnswerer`` as an MLflow pyfunc model.

What it reads, answers and refuses is ``answering.py``'s. This wrapper gives MLflow the
signature (request and answer columns, for the model page and the scoring server), loads the
CatBoost models from the version's artifacts, and turns a refusal into MLflow's
``INVALID_PARAMETER_VALUE`` (HTTP 400 from ``mlflow models serve``). The ``mlflow_tg`` package
travels with each version (``code_paths``), so a served version keeps the feature code it was
fitted with.
"""

from __future__ import annotations

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema

from mlflow_tg import keys
from mlflow_tg.errors import Refusal
from mlflow_tg.predictor import answering
from mlflow_tg.predictor.answering import OUTPUT_COLUMNS, PARAM_KEYS, RunAnswerer

OUTPUT_SCHEMA = Schema([ColSpec(kind, name) for name, kind in OUTPUT_COLUMNS.items()])
# Versions pickled while these classes lived in this module name them here: the aliases keep
# those versions loadable in this process.
Reference, Window = answering.Reference, answering.Window


class RunPredictor(RunAnswerer, PythonModel):
    """A ``RunAnswerer`` that MLflow logs, registers and serves."""

    def load_context(self, context) -> None:
        """Load each window's CatBoost fits from the logged artifacts."""
        self.load_models(context.artifacts)

    def signature(self) -> ModelSignature:
        """Request and answer columns, as MLflow's model page and scoring server show them.

        Metrics and params are optional, so that a request lacking one reaches the model,
        which refuses it saying what is missing.
        """
        inputs = [
            ColSpec("string", keys.RUN_ID),
            ColSpec("long", keys.EPOCH),
            *(ColSpec("double", metric, required=False) for metric in self.metrics_read()),
            *(ColSpec("string", key, required=False) for key in PARAM_KEYS),
        ]
        return ModelSignature(inputs=Schema(inputs), outputs=OUTPUT_SCHEMA)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """The answer for every run of the request (pyfunc entry point).

        Annotated with DataFrame, which MLflow takes as "no type-hint schema": the explicit
        signature stays the one the scoring server checks (``dataframe_split`` requests).
        """
        try:
            return self.answer(model_input)
        except Refusal as refusal:
            raise MlflowException(str(refusal), error_code=INVALID_PARAMETER_VALUE) from None
