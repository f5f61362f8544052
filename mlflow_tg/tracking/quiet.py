"""MLflow, quiet: the command lines print their own answer and nothing of MLflow's."""

from __future__ import annotations

import logging
import os
import warnings


def quiet(verbose: bool) -> None:
    """MLflow's progress bars, logs and warnings off, unless ``verbose``."""
    if verbose:
        return
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
