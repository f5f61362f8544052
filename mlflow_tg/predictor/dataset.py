"""The training table of the predictor: one feature row per usable run, and its target."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import polars as pl

from mlflow_tg import keys
from mlflow_tg.predictor.features import NotEnoughEpochsError, design_matrix, run_features
from mlflow_tg.tracking.runs import TARGET, RunRecord

# distinct from every feature name ("width" is a feature of the hparams set)
META_COLUMNS = ("run_id", "group", "seed", "run_width", TARGET)


@dataclass
class Dataset:
    """One row per usable run: identifiers, the target, and the features of every set."""

    frame: pl.DataFrame
    left_out: dict[str, int] = field(default_factory=dict)

    @property
    def feature_columns(self) -> list[str]:
        """Every feature column, in table order."""
        return [column for column in self.frame.columns if column not in META_COLUMNS]

    @property
    def groups(self) -> list[str]:
        """Training configuration of each row."""
        return self.frame["group"].to_list() if self.frame.height else []

    def matrix(self, columns: list[str], rows: np.ndarray | None = None) -> pd.DataFrame:
        """Model input: numbers as float64, categories as strings."""
        frame = self.frame if rows is None else self.frame.filter(pl.Series(rows))
        return design_matrix(frame, columns)

    def column(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """One column (the target by default) of the (selected) runs."""
        values = self.frame[name].to_numpy()
        return values if rows is None else values[rows]

    def run_ids(self, rows: np.ndarray) -> list[str]:
        """The run ids of the selected rows."""
        return self.frame["run_id"].filter(pl.Series(rows)).to_list()


def build_dataset(records: list[RunRecord], k: int, sets: str) -> Dataset:
    """Feature rows of every run with a final accuracy and epochs 0..k.

    Runs tagged ``pruned`` are left out (and counted): a pruning policy stopped them, so their
    final accuracy is not the full budget's a prediction is about.
    """
    rows, left_out = [], Counter()
    for run in records:
        if run.tags.get(keys.PRUNED) == "true":  # its final accuracy is not the full budget's
            left_out["pruned"] += 1
            continue
        if TARGET not in run.metrics:
            left_out[f"no {TARGET}"] += 1
            continue
        if run.history is None:
            left_out[f"{'unreadable' if run.history_error else 'no'} {keys.HISTORY}"] += 1
            continue
        try:
            features = run_features(run.history, run.params, k, sets, run.run_id)
        except NotEnoughEpochsError:
            left_out[f"fewer than {k + 1} epochs or no graph summaries"] += 1
            continue
        meta = {
            "run_id": run.run_id,
            "group": run.group,
            "seed": run.params.get("seed", ""),
            "run_width": float(run.params.get("width", "nan")),
            TARGET: run.metrics[TARGET],
        }
        rows.append(meta | features)
    frame = pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()
    return Dataset(frame, dict(left_out))
