"""The predictor's answer for one run, as ``mlflow-tg predict`` logs and prints it.

Shared by both of its paths (MLflow's client, and plain HTTP in ``rest.py``); imports nothing
heavy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mlflow_tg import keys

KNOWN = f"final {keys.TARGET} of the diverged run (known, not predicted)"


def known_answer(
    run_id: str,
    tags: Mapping[str, str],
    metrics: Mapping[str, float],
    history: Sequence[Mapping[str, Any]] | None,
) -> dict[str, Any] | None:
    """The answer for a run tagged ``diverged`` that has its final accuracy: that accuracy.

    Training stops at the diverging epoch and goes to its test evaluation, so a diverged run
    with a final ``test_acc`` is done; one without it yet is asked about like any other.
    """
    if tags.get(keys.DIVERGED) != "true" or keys.TARGET not in metrics:
        return None
    accuracy = metrics[keys.TARGET]
    last = max((int(row[keys.EPOCH]) for row in history or []), default=0)
    return {
        keys.RUN_ID: run_id,
        keys.ANSWER_K: last,  # the step it is logged at: the run's last epoch
        keys.ANSWER: accuracy,
        keys.ANSWER_LOW: accuracy,
        keys.ANSWER_HIGH: accuracy,
        keys.ANSWER_OOD: False,
        keys.ANSWER_OOD_REASONS: "",
    }


def describe(run_id: str, answer: Mapping[str, Any], source: str) -> str:
    """The answer in two lines (one for a diverged run's known accuracy)."""
    point, low, high = answer[keys.ANSWER], answer[keys.ANSWER_LOW], answer[keys.ANSWER_HIGH]
    if source == KNOWN:
        return (
            f"run {run_id} diverged (tag {keys.DIVERGED}=true): its final test accuracy "
            f"{point:.4f} is known, so that is the answer (interval [{low:.4f}, {high:.4f}]); "
            f"logged as {keys.PREDICTED} at step {answer[keys.ANSWER_K]}"
        )
    flag = (
        f"out of distribution: {answer[keys.ANSWER_OOD_REASONS]}"
        if answer[keys.ANSWER_OOD]
        else "in distribution: configuration and features like the training runs'"
    )
    return (
        f"run {run_id}: predicted final test accuracy {point:.4f}, interval "
        f"[{low:.4f}, {high:.4f}], from epochs 0..{answer[keys.ANSWER_K]} ({source}; logged as "
        f"{keys.PREDICTED})\n{flag}"
    )
