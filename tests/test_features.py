"""Features of a run's first epochs, computed by hand on a small history."""

from __future__ import annotations

import math
import re

import numpy as np
import polars as pl
import pytest

from mlflow_tg.predictor.features import (
    FEATURE_SETS,
    NotEnoughEpochsError,
    columns_of,
    design_matrix,
    missing_value,
    parse_sets,
    run_features,
    set_name,
)

HISTORY = [
    {"epoch": 0, "val_loss": 2.3, "val_acc": 0.1, "tg.strength/mean": 2.0},
    {"epoch": 1, "val_loss": 1.0, "val_acc": 0.5, "train_loss": 1.5, "train_acc": 0.4,
     "tg.strength/mean": 3.0},
    {"epoch": 2, "val_loss": 0.5, "val_acc": 0.8, "train_loss": 0.7, "train_acc": 0.7,
     "tg.strength/mean": 5.0},
    {"epoch": 3, "val_loss": 0.4, "val_acc": 0.9, "train_loss": 0.4, "train_acc": 0.9},
]  # fmt: skip
PARAMS = {
    "width": "8",
    "optimizer.lr": "0.01",
    "optimizer.weight_decay": "0.001",
    "optimizer.momentum": "0.9",
    "optimizer.name": "sgd",
    "batch_size": "128",
    "epochs": "12",
    "model.name": "vgg",
    "model.batch_norm": "True",
    "model.dropout": "0.0",
    "lr_schedule": "constant",
    "data.name": "digits",
}


def test_graph_features_are_values_change_slope_and_relative_change():
    features = run_features(HISTORY, PARAMS, k=2, sets="graph")
    assert features == pytest.approx(
        {
            "tg.strength/mean@0": 2.0,
            "tg.strength/mean@1": 3.0,
            "tg.strength/mean@2": 5.0,
            "tg.strength/mean.change": 3.0,
            "tg.strength/mean.slope": 1.5,  # least squares through (0, 2), (1, 3), (2, 5)
            "tg.strength/mean.relchange": 1.5,
        }
    )


def test_curve_features_use_validation_from_epoch_zero_and_training_from_epoch_one():
    features = run_features(HISTORY, PARAMS, k=2, sets="curve")
    assert features["val_acc@0"] == 0.1 and features["val_acc@2"] == 0.8
    assert "train_loss@0" not in features and features["train_loss@1"] == 1.5
    assert features["train_loss.sum"] == pytest.approx(2.2)
    assert features["train_acc.slope"] == pytest.approx(0.3)  # two points: their difference
    assert features["val_loss.change"] == pytest.approx(-1.8)


def test_hparams_are_numbers_and_categories():
    features = run_features(HISTORY, PARAMS, k=1, sets="hparams")
    assert features["log10_lr"] == pytest.approx(-2.0) and features["width"] == 8.0
    assert features["batch_norm"] == 1.0 and features["model"] == "vgg"
    adam = run_features(HISTORY, {**PARAMS, "optimizer.momentum": "None"}, 1, "hparams")
    assert math.isnan(adam["momentum"])
    assert run_features(HISTORY, {"width": "2"}, 1, "hparams")["optimizer"] == "none"


def test_a_metric_missing_at_an_epoch_is_nan():
    features = run_features(HISTORY, PARAMS, k=3, sets="graph")
    assert math.isnan(features["tg.strength/mean@3"])
    assert features["tg.strength/mean.slope"] == pytest.approx(1.5)  # from the epochs it has


def test_too_few_epochs_say_how_many_there_are_and_are_needed():
    with pytest.raises(NotEnoughEpochsError) as error:
        run_features(HISTORY[:2], PARAMS, k=3, sets="curve", run="abc")
    message = str(error.value)
    assert "run abc has 2 epochs logged (0, 1)" in message
    assert "needs epochs 0..3 (4 epochs" in message and "missing [2, 3]" in message


def test_graph_set_of_a_run_without_capture_is_refused():
    history = [{k: v for k, v in row.items() if not k.startswith("tg.")} for row in HISTORY]
    with pytest.raises(NotEnoughEpochsError, match=re.escape("graph.enabled=false")):
        run_features(history, PARAMS, k=1, sets="graph+curve")


@pytest.mark.parametrize("spec", ["graph", "curve+hparams", "graph+curve", "hparams+graph"])
def test_columns_of_a_full_row_are_the_columns_of_the_set(spec):
    everything = run_features(HISTORY, PARAMS, k=2, sets="+".join(FEATURE_SETS))
    assert columns_of(everything, spec) == list(run_features(HISTORY, PARAMS, 2, spec))


def test_set_names_are_checked_and_canonical():
    assert parse_sets("hparams+graph") == ("graph", "hparams")
    assert set_name("hparams+graph") == set_name(["graph", "hparams"]) == "graph+hparams"
    with pytest.raises(ValueError, match=re.escape("'graph+weights' is not allowed")):
        parse_sets("graph+weights")


def test_design_matrix_types_numbers_as_float64_and_categories_as_strings():
    frame = pl.DataFrame([{"width": 2, "model": "mlp"}, {"width": None, "model": None}])
    matrix = design_matrix(frame, ["width", "model"])
    assert matrix["width"].dtype == np.float64 and math.isnan(matrix["width"][1])
    assert matrix["model"].tolist() == ["mlp", "none"]


def test_design_matrix_gives_a_column_the_frame_lacks_the_value_of_a_run_without_it():
    full = pl.DataFrame({"width": [2.0, None], "model": ["mlp", None]})
    lacking = pl.DataFrame({"run_id": ["a", "b"]})  # neither feature column
    filled = design_matrix(lacking, ["width", "model"])
    assert filled.dtypes.tolist() == design_matrix(full, ["width", "model"]).dtypes.tolist()
    assert filled["width"].isna().all() and filled["model"].tolist() == ["none", "none"]
    assert missing_value("model") == "none" and math.isnan(missing_value("val_acc@2"))


def test_runs_logged_with_the_older_dotted_graph_keys_give_the_same_features():
    older = [
        {key.replace("tg.strength/", "tg.strength."): value for key, value in row.items()}
        for row in HISTORY
    ]
    assert "tg.strength.mean" in older[0]
    assert run_features(older, {}, 2, "graph+curve") == run_features(HISTORY, {}, 2, "graph+curve")
