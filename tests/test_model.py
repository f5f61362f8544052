"""The registered predictor's pyfunc model on hand-made runs: request, answer, checks, refusals.

Its CatBoost models are replaced by fixed answers, so every number here is known in advance.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import cloudpickle
import numpy as np
import pandas as pd
import polars as pl
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode
from sklearn.metrics.pairwise import nan_euclidean_distances

from mlflow_tg import keys
from mlflow_tg.predictor.answering import (
    PARAM_KEYS,
    fitted_window,
    model_input,
    nan_distances,
    quantiles_of,
    to_interval,
)
from mlflow_tg.predictor.features import (
    design_matrix,
    hparam_features,
    metric_reads,
    run_features,
)
from mlflow_tg.predictor.model import RunPredictor

COLUMNS = {  # what each window's "model" reads
    1: ["tg.katz/gini@1", "val_acc.change", "width", "model"],
    2: ["tg.katz/gini.slope", "val_acc@2", "train_loss.sum", "log10_lr", "model"],
}


def history(epochs: int, gini: float = 0.5, acc: float = 0.1) -> list[dict]:
    """A run's history.parquet rows, epochs 0..epochs."""
    return [
        {"epoch": e, "val_loss": 2.0 - 0.1 * e, "val_acc": acc + 0.1 * e,
         "tg.katz/gini": gini + 0.01 * e, "tg.katz/mean": 1.0}
        | ({"train_loss": 1.5 - 0.1 * e, "train_acc": 0.2 * e} if e else {})
        for e in range(epochs + 1)
    ]  # fmt: skip


def params(**changed: str) -> dict[str, str]:
    """A run's params (MLflow strings), some changed; ``momentum=None`` leaves it out."""
    base = {
        "model.name": "mlp", "optimizer.name": "sgd", "lr_schedule": "constant",
        "data.name": "digits", "width": "2", "optimizer.lr": "0.05",
        "optimizer.weight_decay": "0.0", "optimizer.momentum": "0.9", "batch_size": "32",
        "epochs": "4", "model.dropout": "0.0", "seed": "0",
    }  # fmt: skip
    aliases = {"width": "width", "lr": "optimizer.lr", "model": "model.name"}
    for name, value in changed.items():
        key = aliases.get(name, f"optimizer.{name}")
        if value is None:
            base.pop(key)
        else:
            base[key] = value
    return base


TRAINING = [  # 8 runs: widths 2..4, lr 0.01..0.1, lenet and mlp
    (history(4, 0.4 + 0.02 * i, 0.1 + 0.01 * i),
     params(width=str(2 + i % 3), lr=str([0.01, 0.05, 0.1][i % 3]),
            model=["mlp", "lenet"][i % 2]))
    for i in range(8)
]  # fmt: skip


class Fixed:
    """A stand-in for a CatBoost model: the same (unsorted, out-of-range) quantiles per row."""

    def __init__(self, columns: list[str], answer: list[float]):
        self.feature_names_, self.answer, self.seen = columns, answer, []

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        self.seen.append(pd.DataFrame(matrix, columns=self.feature_names_))
        return np.tile(self.answer, (len(matrix), 1))


def predictor(training=TRAINING, answer=(0.9, -0.2, 1.3)) -> RunPredictor:
    windows, models = [], {}
    hparams = pd.DataFrame([hparam_features(p) for _, p in training])
    for k, columns in COLUMNS.items():
        rows = [run_features(h, p, k, "graph+curve+hparams") for h, p in training]
        matrix = design_matrix(pl.DataFrame(rows), columns)
        models[k] = Fixed(columns, list(answer))
        windows.append(fitted_window(k, models[k], matrix, hparams))
    return RunPredictor(windows, (0.1, 0.5, 0.9), models)


def ask(model: RunPredictor, *runs: tuple[list[dict], dict[str, str], str]) -> pd.DataFrame:
    return model.predict(None, pd.concat([model_input(*run) for run in runs], ignore_index=True))


def refusal(model: RunPredictor, *runs) -> str:
    with pytest.raises(MlflowException) as error:
        ask(model, *runs)
    assert error.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)
    return error.value.message


def test_model_input_is_one_row_per_epoch_with_the_params_the_features_read():
    rows = history(2)
    rows[0]["tg.strength.gini"] = 0.3  # an older run's graph key
    frame = model_input(rows[::-1], params() | {"seed": "3"}, "r1")
    assert frame[keys.EPOCH].tolist() == [0, 1, 2] and frame[keys.EPOCH].dtype == "int64"
    assert (frame[keys.RUN_ID] == "r1").all() and (frame["width"] == "2").all()
    assert "seed" not in frame and set(PARAM_KEYS) - set(frame) == {"model.batch_norm"}
    assert frame["tg.strength/gini"].tolist()[0] == 0.3
    assert math.isnan(frame["tg.strength/gini"][1]) and math.isnan(frame["train_loss"][0])
    assert frame["val_acc"].dtype == "float64"


def test_columns_read_the_epochs_they_are_built_from():
    assert metric_reads("tg.katz/depth1.gini@2", 3) == ("tg.katz/depth1.gini", [2])
    assert metric_reads("tg.katz/depth1.gini.slope", 3) == ("tg.katz/depth1.gini", [0, 1, 2, 3])
    assert metric_reads("val_acc.relchange", 3) == ("val_acc", [0, 3])
    assert metric_reads("train_acc.change", 3) == ("train_acc", [1, 3])
    assert metric_reads("train_loss.sum", 2) == ("train_loss", [1, 2])


def test_each_run_is_answered_from_its_largest_window_in_request_order():
    model = predictor()
    answer = ask(model, (history(3), params(), "c"), (history(1), params(), "a"),
                 (history(2), params(), "b"))  # fmt: skip
    assert answer[keys.RUN_ID].tolist() == ["c", "a", "b"]
    assert answer[keys.ANSWER_K].tolist() == [2, 1, 2]
    assert list(answer.columns) == [
        keys.RUN_ID,
        keys.ANSWER_K,
        keys.ANSWER,
        keys.ANSWER_LOW,
        keys.ANSWER_HIGH,
        keys.ANSWER_OOD,
        keys.ANSWER_OOD_REASONS,
    ]
    # quantiles (0.9, -0.2, 1.3) sorted and clipped: low 0, point 0.9, high 1
    assert answer[keys.ANSWER_LOW].tolist() == [0.0] * 3
    assert answer[keys.ANSWER].tolist() == [0.9] * 3
    assert answer[keys.ANSWER_HIGH].tolist() == [1.0] * 3


def test_the_model_reads_the_features_run_features_builds_from_the_whole_history():
    model = predictor()
    run = history(3, gini=0.47, acc=0.2)
    ask(model, (run, params(width="3", lr="0.1"), "r"))
    (seen,) = model._models[2].seen
    expected = run_features(run, params(width="3", lr="0.1"), 2, "graph+curve+hparams")
    assert seen.iloc[0].to_dict() == pytest.approx({c: expected[c] for c in COLUMNS[2]})
    assert seen["model"].tolist() == ["mlp"] and isinstance(seen["val_acc@2"][0], float)


def test_a_run_like_the_training_runs_is_in_distribution():
    history_, params_ = TRAINING[3]
    answer = ask(predictor(), (history_, params_, "t"))
    assert not answer[keys.ANSWER_OOD][0] and answer[keys.ANSWER_OOD_REASONS][0] == ""


def test_unseen_categories_and_hyperparameters_out_of_range_are_named():
    answer = ask(predictor(), (history(2, 0.45), params(width="12", lr="3", model="vgg"), "o"))
    assert answer[keys.ANSWER_OOD][0]
    reasons = answer[keys.ANSWER_OOD_REASONS][0].split("; ")
    assert "model 'vgg' not seen in training (lenet, mlp)" in reasons
    assert "width 12 outside trained range [2, 4]" in reasons
    assert "lr 3 outside trained range [0.01, 0.1]" in reasons


def test_features_far_from_every_training_row_are_flagged_with_the_unusual_columns():
    answer = ask(predictor(), (history(2, acc=5.0), params(), "far"))
    (reasons,) = answer[keys.ANSWER_OOD_REASONS]
    assert answer[keys.ANSWER_OOD][0]
    assert reasons.startswith("features far from the training runs: nearest-neighbour distance")
    assert "the 99th percentile of the training runs' own" in reasons
    assert "(most unusual: val_acc@2 z=+" in reasons
    assert "val_acc.change" not in reasons  # window 2 answered: its columns only


def test_a_run_without_the_smallest_window_is_refused_naming_it():
    message = refusal(predictor(), (history(0), params(), "young"), (history(2), params(), "ok"))
    assert message.startswith("cannot answer 1 of the 2 runs of the request:")
    assert "- run young: it has epoch 0 but the predictor needs epochs 0..1 at least" in message
    assert "run ok" not in message


def test_a_missing_graph_metric_is_refused_naming_the_setting_that_logs_it():
    no_katz = [{k: v for k, v in row.items() if not k.startswith("tg.")} for row in history(2)]
    message = refusal(predictor(), (no_katz, params(), "nograph"))
    assert "- run nograph: it lacks what the model of window k=2 (epochs 0..2) reads:" in message
    assert ("metric tg.katz/gini at epochs 0..2, logged with graph.enabled=true and "
            "graph.centralities including katz") in message  # fmt: skip


def test_a_graph_metric_of_some_epochs_only_names_every_n_epochs():
    gappy = history(2)
    del gappy[1]["tg.katz/gini"]
    message = refusal(predictor(), (gappy, params(), "gappy"))  # inside every window: refused
    assert "it lacks what the model of window k=2 (epochs 0..2) reads:" in message
    assert "metric tg.katz/gini at epoch 1," in message
    assert "(it has epochs 0, 2; graph.every_n_epochs=1 logs each)" in message


def test_a_skipped_capture_at_the_last_epoch_is_answered_from_the_window_before():
    skipped = history(2)
    del skipped[2]["tg.katz/gini"]  # epoch 2's graph capture failed; epochs 0..1 are whole
    model = predictor()
    answer = ask(model, (skipped, params(), "skipped"))
    assert answer[keys.ANSWER_K].tolist() == [1]
    (seen,) = model._models[1].seen
    expected = run_features(history(1), params(), 1, "graph+curve+hparams")
    assert seen.iloc[0].to_dict() == pytest.approx({c: expected[c] for c in COLUMNS[1]})
    assert not model._models[2].seen  # window 2 is not asked


def test_a_missing_param_is_refused_unless_training_runs_lacked_it_too():
    message = refusal(predictor(), (history(2), params(lr=None), "nolr"))
    assert "- run nolr: it lacks what the model of window k=2 (epochs 0..2) reads: param " \
           "optimizer.lr" in message  # fmt: skip
    assert "momentum" not in message
    lacking = [(h, params(momentum=None) if i == 0 else p) for i, (h, p) in enumerate(TRAINING)]
    answer = ask(predictor(lacking), (history(2), params(momentum=None), "adam-like"))
    assert answer[keys.ANSWER_K].tolist() == [2]
    assert "momentum" in refusal(predictor(), (history(2), params(momentum=None), "x"))


def test_a_param_lacked_by_an_architecture_never_trained_on_says_so():
    # training runs all log momentum; a "resnet" run (unseen architecture) does not
    message = refusal(predictor(), (history(2), params(momentum=None, model="resnet"), "res"))
    assert "param optimizer.momentum (this version was fitted on runs of model lenet, mlp only, " \
           "and model 'resnet' has no such setting" in message  # fmt: skip
    seen_model = refusal(predictor(), (history(2), params(momentum=None, model="mlp"), "m"))
    assert "param optimizer.momentum" in seen_model and "fitted on runs of" not in seen_model
    # a metric it lacks is a setting of its own run: no word about the architecture
    no_katz = [{k: v for k, v in row.items() if not k.startswith("tg.")} for row in history(2)]
    metric_only = refusal(predictor(), (no_katz, params(model="resnet"), "r"))
    assert "metric tg.katz/gini" in metric_only and "fitted on runs of" not in metric_only


def test_the_signature_requires_run_and_epoch_and_declares_what_the_models_read():
    signature = predictor().signature()
    specs = {column.name: column for column in signature.inputs.inputs}
    assert specs[keys.RUN_ID].required and specs[keys.RUN_ID].type.name == "string"
    assert specs[keys.EPOCH].required and specs[keys.EPOCH].type.name == "long"
    metrics = {"tg.katz/gini", "val_acc", "train_loss"}
    assert set(specs) == {keys.RUN_ID, keys.EPOCH, *metrics, *PARAM_KEYS}
    assert all(not specs[m].required and specs[m].type.name == "double" for m in metrics)
    assert all(not specs[p].required and specs[p].type.name == "string" for p in PARAM_KEYS)
    assert signature.outputs.input_names()[-2:] == [keys.ANSWER_OOD, keys.ANSWER_OOD_REASONS]


def test_the_pickled_model_leaves_its_catboost_models_to_the_artifacts():
    model = predictor()
    copy = cloudpickle.loads(cloudpickle.dumps(model))
    assert copy._models == {} and copy.ks == [1, 2] and copy.windows[2].columns == COLUMNS[2]
    assert model._models  # the original keeps them


def test_a_versions_answerer_loads_without_mlflow_and_answers_as_the_model(tmp_path):
    from omegaconf import OmegaConf

    from mlflow_tg.predictor.fit import ensemble

    hparams = pd.DataFrame([hparam_features(p) for _, p in TRAINING])
    windows, models = [], {}
    for k, columns in COLUMNS.items():
        cfg = OmegaConf.create(
            {"seed": 0, "ensemble": 3 if k == 1 else 1,  # one fit: the layout of older versions
             "catboost": {"iterations": 20, "depth": 2, "learning_rate": 0.3,
                          "loss_function": "MultiQuantile:alpha=0.1,0.5,0.9", "thread_count": 1}}
        )  # fmt: skip
        rows = [run_features(h, p, k, "graph+curve+hparams") for h, p in TRAINING]
        matrix = design_matrix(pl.DataFrame(rows), columns)
        models[k] = ensemble(matrix, np.linspace(0.1, 0.9, len(TRAINING)), cfg)
        windows.append(fitted_window(k, models[k], matrix, hparams))
    model = RunPredictor(windows, (0.1, 0.5, 0.9), models)
    artifacts = model.save_models(tmp_path)
    assert sorted(artifacts) == ["answerer", "catboost_k1", "catboost_k1_1", "catboost_k1_2",
                                 "catboost_k2"]  # fmt: skip
    runs = [(history(4, 0.45), params(width="3"), "four"), (history(1), params(), "one")]
    frame = pd.concat([model_input(*run) for run in runs], ignore_index=True)
    frame.to_pickle(tmp_path / "request.pkl")
    script = f"""
import json, sys
import pandas as pd
from mlflow_tg.predictor.answering import RunAnswerer
answerer = RunAnswerer.load({json.dumps(artifacts)})
answer = answerer.answer(pd.read_pickle({str(tmp_path / "request.pkl")!r}))
assert type(answerer) is RunAnswerer and "mlflow" not in sys.modules, sorted(sys.modules)
answer.to_pickle({str(tmp_path / "answer.pkl")!r})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    expected = model.predict(None, frame)
    pd.testing.assert_frame_equal(pd.read_pickle(tmp_path / "answer.pkl"), expected)
    assert expected[keys.ANSWER_K].tolist() == [2, 1]


def test_nan_distances_are_scikit_learns_nan_euclidean():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(7, 4))
    a[a > 1] = np.nan
    b[b > 1.2] = np.nan
    assert nan_distances(a, b) == pytest.approx(nan_euclidean_distances(a, b), nan_ok=True)


@pytest.mark.parametrize(
    ("loss", "ok"),
    [("MultiQuantile:alpha=0.1,0.5,0.9", True), ("MultiQuantile:alpha=0.05,0.5,0.95", True),
     ("RMSE", False), ("MultiQuantile:alpha=0.1,0.4,0.9", False),
     ("MultiQuantile:alpha=0.5,0.9", False)],
)  # fmt: skip
def test_the_loss_must_give_a_median_and_an_interval(loss, ok):
    if ok:
        assert quantiles_of(loss)[1] == 0.5
    else:
        with pytest.raises(ValueError, match=r"MultiQuantile:alpha=LOW,0\.5,HIGH"):
            quantiles_of(loss)


def test_the_interval_is_widened_by_its_calibration_and_stays_in_0_1():
    model = predictor(answer=(0.5, 0.4, 0.6))
    model.windows[2].widen = 0.15
    (answer,) = ask(model, (history(2), params(), "r")).to_dict("records")
    assert (answer[keys.ANSWER_LOW], answer[keys.ANSWER], answer[keys.ANSWER_HIGH]) == (
        pytest.approx(0.25),
        0.5,
        pytest.approx(0.75),
    )
    model.windows[2].widen = 0.7
    (answer,) = ask(model, (history(2), params(), "r")).to_dict("records")
    assert (answer[keys.ANSWER_LOW], answer[keys.ANSWER_HIGH]) == (0.0, 1.0)


def small_catboost(ensemble: int):
    """A predictor config of small, quick quantile fits."""
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {"seed": 0, "ensemble": ensemble, "catboost": {"iterations": 60, "depth": 4,
         "learning_rate": 0.1, "loss_function": "MultiQuantile:alpha=0.1,0.5,0.9",
         "thread_count": 1}}
    )  # fmt: skip


def test_a_run_out_of_distribution_gets_the_wider_outside_calibration():
    model = predictor(answer=(0.5, 0.4, 0.6))
    model.windows[2].widen, model.windows[2].widen_outside = 0.05, 0.2
    inside, outside = ask(
        model, (history(2), params(), "in"), (history(2), params(width="9"), "wide")
    ).to_dict("records")
    assert not inside[keys.ANSWER_OOD] and outside[keys.ANSWER_OOD]
    assert (inside[keys.ANSWER_LOW], inside[keys.ANSWER_HIGH]) == (
        pytest.approx(0.35),
        pytest.approx(0.65),
    )
    assert (outside[keys.ANSWER_LOW], outside[keys.ANSWER_HIGH]) == (
        pytest.approx(0.2),
        pytest.approx(0.8),
    )
    assert inside[keys.ANSWER] == outside[keys.ANSWER] == 0.5  # the point does not move
    model.windows[2].widen_outside = 0.01  # never narrower than the run's own calibration
    (outside,) = ask(model, (history(2), params(width="9"), "wide")).to_dict("records")
    assert outside[keys.ANSWER_HIGH] == pytest.approx(0.65)


def test_a_version_pickled_before_the_outside_calibration_answers_as_it_did():
    window = predictor().windows[2]
    del window.__dict__["widen_outside"]  # as unpickled from an older version
    assert window.widen_outside == 0.0
    assert window.widening(np.array([True, False])).tolist() == [window.widen] * 2


def test_outside_calibration_covers_runs_beyond_the_trained_width_better():
    """A tree cannot follow a trend past the widths it saw: folds at each end of the trained
    range measure that error, folds of configurations do not."""
    from mlflow_tg.predictor.calibrate import outside_widening, widening
    from mlflow_tg.predictor.fit import ensemble

    cfg = small_catboost(ensemble=1)
    rng = np.random.default_rng(0)

    def sample(widths: list[int], n: int) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
        width = rng.choice(widths, n).astype(float)
        lr = rng.choice([-2.0, -1.0], n)
        x = pd.DataFrame({"width": width, "log10_lr": lr})
        y = 0.2 + 0.06 * width + 0.05 * lr + rng.normal(0, 0.02, n)
        return x, y, x.copy()

    x, y, hparams = sample([2, 3, 4, 5, 6], 200)
    model = ensemble(x, y, cfg)
    inside = widening(model, x, y, [f"config-{i}" for i in range(200)], cfg, 0.8)
    outside = outside_widening(model, x, y, hparams, cfg, 0.8)
    wide_x, wide_y, _ = sample([7], 500)  # one step past the range, as the folds are
    raw = model.predict(wide_x)

    def coverage(extra: float) -> float:
        low, _, high = to_interval(raw, extra).T
        return float(np.mean((low <= wide_y) & (wide_y <= high)))

    assert outside > inside
    assert coverage(inside) < 0.5 < coverage(outside)


def test_outside_calibration_is_zero_when_no_width_or_learning_rate_varies():
    from omegaconf import OmegaConf

    from mlflow_tg.predictor.calibrate import outside_widening

    cfg = OmegaConf.create({"seed": 0})
    hparams = pd.DataFrame({"width": [4.0] * 6, "log10_lr": [math.nan] * 6})
    assert outside_widening(None, pd.DataFrame(index=range(6)), np.zeros(6), hparams, cfg, 0.8) == 0


def test_calibration_brings_new_samples_into_the_interval_at_the_nominal_rate():
    from mlflow_tg.predictor.calibrate import widening
    from mlflow_tg.predictor.fit import ensemble

    cfg = small_catboost(ensemble=2)
    rng = np.random.default_rng(0)

    def sample(n: int) -> tuple[pd.DataFrame, np.ndarray]:
        x = pd.DataFrame(rng.uniform(size=(n, 3)), columns=["a", "b", "c"])
        return x, 0.3 + 0.4 * x["a"].to_numpy() + rng.normal(0, 0.08, n)

    x, y = sample(150)
    model = ensemble(x, y, cfg)
    widen = widening(model, x, y, [f"config-{i}" for i in range(150)], cfg, 0.8)
    fresh_x, fresh_y = sample(1000)
    raw = model.predict(fresh_x)

    def coverage(extra: float) -> float:
        low, _, high = to_interval(raw, extra).T
        return float(np.mean((low <= fresh_y) & (fresh_y <= high)))

    assert widen > 0 and coverage(0.0) < 0.75  # fitted quantiles: too narrow for new samples
    assert 0.75 <= coverage(widen) <= 0.9


def test_the_runs_description_keeps_one_prediction_line_the_latest():
    from mlflow_tg.predictor.describe import note_line, with_note

    answer = {keys.ANSWER: 0.5, keys.ANSWER_LOW: 0.4, keys.ANSWER_HIGH: 0.6, keys.ANSWER_K: 3,
              keys.ANSWER_OOD: False}  # fmt: skip
    note = "**mlp** width 2  \ntest accuracy **0.900**"
    once = with_note(note, answer)
    assert once == f"{note}  \npredicted test accuracy **0.500** [0.400, 0.600] from epochs 0..3"
    again = answer | {keys.ANSWER: 0.7, keys.ANSWER_OOD: True, keys.ANSWER_OOD_REASONS: "lr"}
    assert with_note(with_note(once, answer), again) == f"{note}  \n{note_line(again)}"
    assert note_line(again).endswith(", out of distribution: lr")
    assert with_note(None, answer) == with_note("", answer) == note_line(answer)


def test_the_input_example_is_the_first_training_run_the_predictor_answers():
    from mlflow_tg.predictor.job import input_example
    from mlflow_tg.tracking.records import RunRecord

    young = RunRecord("young", params(), {}, {}, history(4)[:1])  # epoch 0 only: refused
    grown = RunRecord("grown", params(), {}, {}, history(4))
    example = input_example(predictor(), [young, grown], ["young", "grown"])
    assert set(example[keys.RUN_ID]) == {"grown"} and example[keys.EPOCH].tolist() == [0, 1, 2]


def test_a_version_pickled_while_its_classes_lived_in_model_py_still_loads():
    import pickle

    from mlflow_tg.predictor.answering import Reference, Window

    data = pickle.dumps(predictor(), protocol=2)  # protocol 2 names classes as "module\nname"
    for name in (b"Window", b"Reference"):
        new = b"mlflow_tg.predictor.answering\n" + name
        assert data.count(new) == 1
        data = data.replace(new, b"mlflow_tg.predictor.model\n" + name)
    old = pickle.loads(data)
    assert type(old) is RunPredictor and old.ks == [1, 2] and old.windows[2].columns == COLUMNS[2]
    assert isinstance(old.windows[1], Window) and isinstance(old.windows[1].reference, Reference)
