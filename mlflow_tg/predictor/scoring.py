"""A registered predictor's answers for runs, loaded in this process.

The same pyfunc interface as ``mlflow models serve``: request rows per run and epoch
(``model.model_input``), one answer row per run. A registered version of the former kind (a bare
CatBoost model reading feature columns) cannot answer runs: ``require_run_predictor`` says so.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode
from mlflow.pyfunc import PyFuncModel

from mlflow_tg import keys
from mlflow_tg.predictor.registry import RegistryError

log = logging.getLogger(__name__)
REFUSED = ErrorCode.Name(INVALID_PARAMETER_VALUE)


def input_columns(model: PyFuncModel) -> list[str]:
    """The request columns a logged model's signature names."""
    signature = model.metadata.signature
    return signature.inputs.input_names() if signature is not None else []


def model_columns(model: PyFuncModel, frame: pd.DataFrame) -> pd.DataFrame:
    """The columns of ``frame`` that ``model`` reads: MLflow warns about every other one."""
    names = set(input_columns(model))
    return frame[[column for column in frame.columns if column in names]]


def require_run_predictor(model: PyFuncModel, what: str) -> None:
    """RegistryError unless ``model`` answers runs (request columns ``run_id`` and ``epoch``)."""
    columns = input_columns(model)
    if {keys.RUN_ID, keys.EPOCH} <= set(columns):
        return
    flavors = ", ".join(sorted(model.metadata.flavors)) or "none"
    raise RegistryError(
        f"{what} is a column-based model (flavors: {flavors}; it reads {len(columns)} feature "
        f"columns such as {columns[:3]}), not one that answers runs from their history and "
        f"params ({keys.RUN_ID!r}, {keys.EPOCH!r}, metrics, params): it cannot score runs. Fit a "
        "new version: python -m mlflow_tg.predictor"
    )


def load_run_predictor(model_uri: str, check_requirements: bool = True) -> PyFuncModel:
    """A registered version, loaded here; RegistryError if it cannot be loaded or answer runs.

    ``check_requirements``: compare the version's pip requirements with the installed packages
    and warn of mismatches, as MLflow does by default. It costs about a second (MLflow maps
    every installed distribution to its modules), so a quiet command line skips it.
    """
    try:
        model = mlflow.pyfunc.load_model(model_uri, suppress_warnings=not check_requirements)
    except Exception as error:  # a version whose files are gone, or that MLflow cannot read
        raise RegistryError(
            f"could not load {model_uri}: {type(error).__name__}: {error}"
        ) from error
    require_run_predictor(model, model_uri)
    return model


def answer_each(
    model: PyFuncModel, requests: Mapping[str, pd.DataFrame]
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Answers for the runs of ``requests`` (run id → its rows), and why any was refused.

    All in one call; when the model refuses one, each run is asked alone, so that one run the
    model cannot answer does not cost the others theirs.
    """
    if not requests:
        return pd.DataFrame(columns=[keys.RUN_ID, keys.ANSWER]), {}
    requests = {run_id: model_columns(model, frame) for run_id, frame in requests.items()}
    try:
        return model.predict(pd.concat(requests.values(), ignore_index=True)), {}
    except MlflowException as error:
        if error.error_code != REFUSED:
            raise
    answers, refused = [], {}
    for run_id, frame in requests.items():
        try:
            answers.append(model.predict(frame))
        except MlflowException as error:
            if error.error_code != REFUSED:
                raise
            refused[run_id] = error.message
    log.warning("the model refused %d of %d runs", len(refused), len(requests))
    if not answers:
        return pd.DataFrame(columns=[keys.RUN_ID, keys.ANSWER]), refused
    return pd.concat(answers, ignore_index=True), refused
