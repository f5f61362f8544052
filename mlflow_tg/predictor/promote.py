"""Champion or challenger: a new version against the champion, on runs neither has seen."""

from __future__ import annotations

import logging

import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from mlflow_tg import keys
from mlflow_tg.errors import RegistryError
from mlflow_tg.predictor.answering import model_input
from mlflow_tg.predictor.dataset import Dataset
from mlflow_tg.predictor.evaluate import quality
from mlflow_tg.predictor.registry import FeatureSpec, Holdout
from mlflow_tg.predictor.scoring import answer_each, load_run_predictor
from mlflow_tg.tracking.runs import TARGET, RunRecord

log = logging.getLogger(__name__)
MIN_COMPARED = 3  # held-out runs below which a comparison with the champion means nothing


def champion_predictions(
    name: str, champion: ModelVersion, spec: FeatureSpec, records: list[RunRecord]
) -> tuple[dict[str, float], dict[str, str]]:
    """The champion's predictions for ``records`` by run id (as it serves), and why it refused any.

    Each run's history is cut after epoch ``k`` of the champion's spec, so that it answers from
    the window its comparison is about (the largest of its windows ≤ k). A champion that cannot
    answer runs (a bare CatBoost model of the former kind) raises a RegistryError; runs it
    refuses (lacking what it reads) are left out of the comparison.
    """
    model = load_run_predictor(f"models:/{name}/{champion.version}")
    requests = {
        run.run_id: model_input(
            [row for row in run.history if row[keys.EPOCH] <= spec.k], run.params, run.run_id
        )
        for run in records
        if run.history is not None
    }
    answers, refused = answer_each(model, requests)
    if refused:
        log.warning("champion v%s refused %d runs: %s", champion.version, len(refused), refused)
    predicted = zip(answers[keys.RUN_ID], answers[keys.ANSWER].astype(float), strict=True)
    return dict(predicted), refused


def shared_holdout(
    dataset: Dataset, holdout: np.ndarray, current: Holdout, spec: FeatureSpec, version: str
) -> tuple[set[str], str]:
    """Run ids held out under both this fit's split and the champion's, and the two in words.

    The champion's split is in its tags; a version registered without them is assumed to have
    used this fit's.
    """
    theirs = spec.holdout or current
    words = f"this fit's split ({current}) and champion v{version}'s " + (
        f"({theirs})" if spec.holdout else "(assumed the same: the version has no holdout tags)"
    )
    return set(dataset.run_ids(holdout & theirs.rows(dataset.groups))), words


def versus_champion(
    cfg: DictConfig,
    champion: ModelVersion | None,
    dataset: Dataset,
    holdout: np.ndarray,
    candidate: np.ndarray,
    records: list[RunRecord],
) -> tuple[bool, dict[str, float], str]:
    """Whether the new version beats the champion on runs held out from both fits.

    ``candidate`` predicts the ``holdout`` rows. The champion was fitted without its own split,
    which differs from this one when the seed or the fraction changed since.
    """
    if champion is None:
        return True, {}, "first version: no champion yet"
    try:
        spec = FeatureSpec.of_version(champion)
        current = Holdout(cfg.holdout_fraction, cfg.seed)
        shared, split = shared_holdout(dataset, holdout, current, spec, champion.version)
        held = [run for run in records if run.run_id in shared]
        # loaded even when too few runs are shared: one that cannot answer runs is replaced
        incumbent, refused = champion_predictions(cfg.registered_model, champion, spec, held)
    except (RegistryError, MlflowException) as error:  # one that cannot load cannot serve
        log.warning("champion v%s cannot score runs: %s", champion.version, error)
        verdict = (
            f"champion v{champion.version} cannot be used ({type(error).__name__}: {error}); a "
            "champion that cannot be loaded or cannot answer runs cannot serve either, so the "
            "new version replaces it"
        )
        return True, {}, verdict
    if len(refused) >= MIN_COMPARED and not incumbent:
        reason = next(iter(refused.values()))
        verdict = (
            f"champion v{champion.version} refused all {len(refused)} runs held out under both "
            f"{split} (for example: {reason}); a champion that cannot answer the runs this "
            "store holds cannot serve them, so the new version replaces it"
        )
        return True, {}, verdict
    ids = dataset.run_ids(holdout)
    predicted = dict(zip(ids, candidate, strict=True))
    actual = dict(zip(ids, dataset.column(TARGET, holdout), strict=True))
    return score_against(cfg, champion.version, predicted, incumbent, actual, split)


def score_against(
    cfg: DictConfig,
    version: str,
    candidate: dict[str, float],
    incumbent: dict[str, float],
    actual: dict[str, float],
    split: str,
) -> tuple[bool, dict[str, float], str]:
    """Compare both models' predictions, by run id, on the runs both scored."""
    common = sorted(set(candidate) & set(incumbent))
    if len(common) < MIN_COMPARED:
        verdict = (
            f"not compared: only {len(common)} runs held out under both {split} can be scored "
            f"by both (at least {MIN_COMPARED} needed); the champion stays"
        )
        return False, {keys.COMPARED_RUNS: float(len(common))}, verdict
    y = np.array([actual[run] for run in common])
    new = quality(y, np.array([candidate[run] for run in common]))[cfg.selection_metric]
    old = quality(y, np.array([incumbent[run] for run in common]))[cfg.selection_metric]
    scores = {
        keys.COMPARED_CANDIDATE: new,
        keys.COMPARED_CHAMPION: old,
        keys.COMPARED_RUNS: float(len(common)),
    }
    verdict = (
        f"{cfg.selection_metric} {new:.4f} vs champion v{version} {old:.4f} on the "
        f"{len(common)} runs held out under both {split}"
    )
    # NaN (constant predictions have no rank correlation) counts as the worst score
    wins = np.nan_to_num(new, nan=-np.inf) > np.nan_to_num(old, nan=-np.inf)
    return bool(wins), scores, verdict
