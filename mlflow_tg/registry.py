"""The performance predictor in the MLflow Model Registry: versions, aliases, feature spec.

Each version carries the window ``k`` and the feature sets it was fitted on as tags, so any
client (``mlflow-tg predict``, a new fit comparing itself with the champion) builds exactly the
features that version expects. Aliases, not stages: ``champion`` is what ``models:/NAME@champion``
serves; a new version that does not beat it gets ``challenger``.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import pandas as pd
from catboost import CatBoostRegressor
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

CHAMPION, CHALLENGER = "champion", "challenger"
K_TAG, SETS_TAG = "mlflow_tg.k", "mlflow_tg.feature_sets"


@dataclass
class FeatureSpec:
    """What a registered version needs: features of epochs 0..k from these sets."""

    k: int
    sets: str  # canonical "graph+curve+hparams"

    @classmethod
    def of_version(cls, version: ModelVersion) -> FeatureSpec:
        """The spec a version was registered with."""
        return cls(int(version.tags[K_TAG]), version.tags[SETS_TAG])


def log_and_register(
    model: CatBoostRegressor, example: pd.DataFrame, name: str, spec: FeatureSpec
) -> ModelVersion:
    """Log ``model`` to the active run and register it as a new version of ``name``.

    ``example`` holds feature rows; the signature names the columns the model reads.

    Numeric columns are declared float64 (an integer column would reject NaN or a float at
    serving time); categories are strings. Call before logging many metrics: MLflow attaches
    every metric's history of the run to the logged model.
    """
    example = example[model.feature_names_]  # the columns it kept, in its order
    predictions = model.predict(example)
    info = mlflow.catboost.log_model(
        model,
        name="model",
        signature=infer_signature(example, predictions),
        input_example=example.head(1),
    )
    version = mlflow.register_model(info.model_uri, name, tags={K_TAG: spec.k, SETS_TAG: spec.sets})
    return MlflowClient().get_model_version(name, version.version)


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding ``alias``, or None (no such model or alias yet)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def settle_aliases(
    client: MlflowClient, name: str, version: ModelVersion, beats_champion: bool
) -> str:
    """Give the new version ``champion`` when it wins (or is the first), else ``challenger``."""
    alias = CHAMPION if beats_champion else CHALLENGER
    client.set_registered_model_alias(name, alias, version.version)
    return alias
