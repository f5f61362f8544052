"""A registered predictor's answer for feature rows, loaded in this process."""

from __future__ import annotations

import math
import sys
from collections.abc import Collection, Mapping

import mlflow
import numpy as np
import polars as pl
from mlflow.pyfunc import PyFuncModel

from mlflow_tg.predictor.features import MISSING_CATEGORY, design_matrix, missing_value

WARN_NAMES = 5  # columns named in a warning about missing ones


def warn_missing(columns: list[str], available: Collection[str], what: str) -> None:
    """Tell stderr how many (and which first few) of a model's columns ``what`` lacks."""
    missing = [column for column in columns if column not in available]
    if missing:
        named = ", ".join(missing[:WARN_NAMES]) + (", …" if len(missing) > WARN_NAMES else "")
        print(
            f"warning: {what} lacks {len(missing)} of the model's {len(columns)} feature "
            f"columns ({named}); they count as not logged (NaN, or '{MISSING_CATEGORY}' for a "
            "category), as for such a run in the fitting table.",
            file=sys.stderr,
        )


def model_row(features: Mapping[str, float | str], columns: list[str]) -> dict[str, float | str]:
    """The row a model reads, its columns in order: the endpoint's request and in-process input.

    At fit time a run without some column has it missing (the table holds the union of the
    runs' columns); a served run without it gets the same missing value, not an error.
    """
    warn_missing(columns, features, "the run")
    return {column: features.get(column, missing_value(column)) for column in columns}


def model_columns(model: str | PyFuncModel) -> list[str]:
    """The feature columns a logged model's signature names, in its order."""
    metadata = mlflow.models.get_model_info(model) if isinstance(model, str) else model.metadata
    return metadata.signature.inputs.input_names()


def predict_frame(model: str | PyFuncModel, frame: pl.DataFrame) -> np.ndarray:
    """A logged model's predictions (by URI, or loaded) for feature rows, schema checked.

    A column of the model that the frame lacks is missing in every row, as in ``model_row``.
    """
    loaded = mlflow.pyfunc.load_model(model) if isinstance(model, str) else model
    columns = model_columns(loaded)
    warn_missing(columns, frame.columns, "the feature table")
    return np.ravel(loaded.predict(design_matrix(frame, columns))).astype(float)


def predict_in_process(model_uri: str, features: Mapping[str, float | str]) -> float:
    """The prediction of a registered model loaded here, from the row an endpoint would get."""
    model = mlflow.pyfunc.load_model(model_uri)
    row = model_row(features, model_columns(model))
    prediction = float(predict_frame(model, pl.DataFrame([row]))[0])
    return prediction if math.isfinite(prediction) else math.nan
