"""The performance predictor in the MLflow Model Registry: versions, aliases, version spec.

Each version is a ``RunPredictor`` (``model.py``): it takes runs (history rows and params) and
builds its own features. It carries as tags its windows ``ks``, the window ``k`` its quality and
the champion comparison use, the feature sets it was fitted on, and the held-out split it was
fitted without, so a new fit compares itself with it only on runs neither has seen. Aliases,
not stages: ``champion`` is what ``models:/NAME@champion`` serves; a new version that does not
beat it gets ``challenger``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)

from mlflow_tg.errors import RegistryError
from mlflow_tg.keys import (
    CHALLENGER,
    CHAMPION,
    HOLDOUT_FRACTION_TAG,
    HOLDOUT_SEED_TAG,
    K_TAG,
    KS_TAG,
    SETS_TAG,
)

if TYPE_CHECKING:  # model.py and evaluate.py import CatBoost: not on mlflow-tg predict's path
    from mlflow_tg.predictor.model import RunPredictor

NOT_FOUND = ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)
INVALID = ErrorCode.Name(INVALID_PARAMETER_VALUE)


@dataclass(frozen=True)
class Holdout:
    """A held-out share of training configurations, chosen by hashing them with a seed."""

    fraction: float
    seed: int

    def rows(self, groups: Sequence[str]) -> np.ndarray:
        """Which runs (by training configuration) this split holds out."""
        from mlflow_tg.predictor.evaluate import in_holdout

        return in_holdout(groups, self.fraction, self.seed)

    def __str__(self) -> str:
        return f"seed {self.seed}, fraction {self.fraction:g}"


@dataclass(frozen=True)
class FeatureSpec:
    """What a registered version reads, and the held-out split it was fitted without."""

    k: int  # features of epochs 0..k: the window of its quality and champion comparison
    sets: str  # canonical "graph+curve+hparams"
    holdout: Holdout | None = None  # None: registered before versions recorded it
    ks: tuple[int, ...] = ()  # the windows it answers from; () before versions took runs

    def tags(self) -> dict[str, str]:
        """The version tags that record this spec."""
        tags = {K_TAG: str(self.k), SETS_TAG: self.sets}
        if self.ks:
            tags[KS_TAG] = ",".join(map(str, self.ks))
        if self.holdout is not None:
            tags |= {
                HOLDOUT_SEED_TAG: str(self.holdout.seed),
                HOLDOUT_FRACTION_TAG: str(self.holdout.fraction),
            }
        return tags

    @classmethod
    def of_version(cls, version: ModelVersion) -> FeatureSpec:
        """The spec a version was registered with; RegistryError when its tags lack it."""
        tags = version.tags
        try:
            holdout = None
            if HOLDOUT_SEED_TAG in tags and HOLDOUT_FRACTION_TAG in tags:
                holdout = Holdout(float(tags[HOLDOUT_FRACTION_TAG]), int(tags[HOLDOUT_SEED_TAG]))
            ks = tuple(int(k) for k in tags[KS_TAG].split(",")) if KS_TAG in tags else ()
            return cls(int(tags[K_TAG]), tags[SETS_TAG], holdout, ks)
        except (KeyError, ValueError) as error:
            raise RegistryError(
                f"model {version.name!r} version {version.version} has no usable feature spec "
                f"in its tags ({error!r}; its tags: {dict(tags)}): mlflow_tg needs {K_TAG} (the "
                f"window: features of epochs 0..k, a whole number) and {SETS_TAG} (for example "
                "graph+curve+hparams) to build the features it reads. Versions registered by "
                "python -m mlflow_tg.predictor carry them; set them on this version, or fit a "
                "new one."
            ) from None


def log_and_register(
    predictor: RunPredictor, example: pd.DataFrame, name: str, spec: FeatureSpec
) -> ModelVersion:
    """Log ``predictor`` to the active run as a pyfunc model and register it as a new version.

    ``example`` holds request rows (``model_input``) of one run: the model page's input
    example, scored once by MLflow as a check that it serves. The CatBoost models go as
    artifacts, the ``mlflow_tg`` package as code (the model's own copy of ``run_features``).
    Requirements are given, not inferred: inferring them loads the model in a subprocess.
    Call before logging many metrics: MLflow attaches every metric's history of the run to the
    logged model.
    """
    import catboost
    import polars

    import mlflow_tg

    signature = predictor.signature()
    declared = [column for column in signature.inputs.input_names() if column in example]
    with tempfile.TemporaryDirectory() as folder:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=predictor,
            artifacts=predictor.save_models(Path(folder)),
            code_paths=[str(Path(mlflow_tg.__file__).parent)],
            signature=signature,
            input_example=example[declared],
            pip_requirements=[
                f"mlflow=={mlflow.__version__}",
                f"catboost=={catboost.__version__}",
                f"pandas=={pd.__version__}",
                f"numpy=={np.__version__}",
                f"polars=={polars.__version__}",
            ],
        )
    version = mlflow.register_model(info.model_uri, name, tags=spec.tags())
    return MlflowClient().get_model_version(name, version.version)


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding ``alias``; None when the model or the alias does not exist yet.

    Any other failure (an unreachable server, for one) is a RegistryError, not "none".
    MLflow reports a missing alias as INVALID_PARAMETER_VALUE, the code of a malformed name or
    alias too, so only then are the model's aliases read to tell the two apart.
    """
    try:
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException as error:
            if error.error_code != INVALID or alias in client.get_registered_model(name).aliases:
                raise
            return None
    except MlflowException as error:
        if error.error_code == NOT_FOUND:
            return None
        raise RegistryError(
            f"could not read the alias {alias!r} of model {name!r} from the registry at "
            f"{client.tracking_uri}: {error.message}"
        ) from error


def settle_aliases(
    client: MlflowClient,
    name: str,
    version: ModelVersion,
    beats_champion: bool,
    compared: ModelVersion | None,
) -> tuple[str, str]:
    """``champion`` for the new version if it beat ``compared`` (or is the first), else challenger.

    Returns the alias, and why the champion's was not taken ("" when it was). The champion is
    read again first: another predictor job may have moved the alias while this one fitted, and
    a version compared with an older champion must not demote the newer one unseen. (MLflow has
    no compare-and-set on aliases: a move between this read and the write is not caught.)
    """
    why = ""
    if beats_champion:
        now = version_by_alias(client, name, CHAMPION)
        if now is not None and (compared is None or now.version != compared.version):
            beats_champion = False
            why = (
                f"; not promoted: the champion moved to v{now.version} while this version was "
                "fitted, and it was not compared with that one (fit again to compare)"
            )
    alias = CHAMPION if beats_champion else CHALLENGER
    client.set_registered_model_alias(name, alias, version.version)
    return alias, why
