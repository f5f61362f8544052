"""A prediction in words, for the run's MLflow description (its note on the Overview page)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlflow_tg import keys


def predicted_metrics(answer: Mapping[str, Any]) -> dict[str, float]:
    """The metrics logged to the run (at step = the window used, or the epoch when live)."""
    return {
        keys.PREDICTED: float(answer[keys.ANSWER]),
        keys.PREDICTED_LOW: float(answer[keys.ANSWER_LOW]),
        keys.PREDICTED_HIGH: float(answer[keys.ANSWER_HIGH]),
        keys.PREDICTED_OOD: float(bool(answer[keys.ANSWER_OOD])),
    }


def note_line(answer: Mapping[str, Any]) -> str:
    """The prediction in one line of the run's MLflow description."""
    line = (
        f"{keys.NOTE_PREDICTION}**{float(answer[keys.ANSWER]):.3f}** "
        f"[{float(answer[keys.ANSWER_LOW]):.3f}, {float(answer[keys.ANSWER_HIGH]):.3f}] "
        f"from epochs 0..{int(answer[keys.ANSWER_K])}"
    )
    if bool(answer[keys.ANSWER_OOD]):
        line += f", out of distribution: {answer.get(keys.ANSWER_OOD_REASONS, '')}"
    return line


def with_note(note: str | None, answer: Mapping[str, Any]) -> str:
    """A run's description with the prediction's line in place of any earlier prediction's.

    One line, the latest: a run asked about at every epoch, or again and again, keeps a short
    description, within MLflow's limit on a tag's length.
    """
    lines = (note or "").split(keys.NOTE_BREAK)
    kept = [line for line in lines if line and not line.startswith(keys.NOTE_PREDICTION)]
    return keys.NOTE_BREAK.join([*kept, note_line(answer)])
