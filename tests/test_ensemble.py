"""The predictor's ensemble: real CatBoost fits, averaged, saved and loaded."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from mlflow_tg.predictor.ensemble import Ensemble
from mlflow_tg.predictor.fit import ensemble, refit


def config(members: int):
    return OmegaConf.create(
        {"seed": 3, "ensemble": members,
         "catboost": {"iterations": 30, "depth": 3, "learning_rate": 0.2,
                      "loss_function": "MultiQuantile:alpha=0.1,0.5,0.9", "thread_count": 1}}
    )  # fmt: skip


@pytest.fixture(scope="module")
def table() -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(0)
    x = pd.DataFrame(rng.uniform(size=(60, 4)), columns=["a", "b", "c", "width"])
    x["model"] = np.array(["mlp", "lenet", "vgg"], dtype=object)[np.arange(60) % 3]
    y = 0.2 + 0.5 * x["a"].to_numpy() + 0.1 * (x["model"] == "vgg") + rng.normal(0, 0.05, 60)
    return x, y


@pytest.fixture(scope="module")
def fitted(table) -> Ensemble:
    return ensemble(*table, config(3))


def test_each_fit_reads_the_same_columns_in_its_own_order_with_its_own_seed(table, fitted):
    x, _ = table
    orders = [member.feature_names_ for member in fitted.members]
    seeds = [member.get_params()["random_seed"] for member in fitted.members]
    assert len(fitted.members) == 3 and seeds == [3, 4, 5]
    assert orders[0] == list(x.columns) == fitted.feature_names_  # the first: the table's order
    assert all(sorted(order) == sorted(x.columns) for order in orders)
    assert len({tuple(order) for order in orders}) == 3  # the others shuffled, differently


def test_the_ensemble_predicts_the_mean_of_its_fits_from_a_frame_or_an_array(table, fitted):
    x, _ = table
    one_by_one = [member.predict(x[member.feature_names_]) for member in fitted.members]
    expected = np.mean(one_by_one, axis=0)
    assert expected.shape == (len(x), 3)
    assert not np.allclose(one_by_one[0], one_by_one[1])  # fits that differ: a mean that says more
    np.testing.assert_allclose(fitted.predict(x), expected)
    np.testing.assert_allclose(fitted.predict(x[fitted.feature_names_].to_numpy(object)), expected)
    shuffled = x[["model", "width", "c", "a", "b"]]  # a frame is read by name
    np.testing.assert_allclose(fitted.predict(shuffled), expected)


def test_a_refit_keeps_each_fits_columns_order_and_seed(table, fitted):
    x, y = table
    again = refit(fitted, x, y, config(3))
    assert [m.feature_names_ for m in again.members] == [m.feature_names_ for m in fitted.members]
    np.testing.assert_allclose(again.predict(x), fitted.predict(x))  # same rows: the same fits
    fewer = refit(fitted, x.iloc[:40], y[:40], config(3))
    assert not np.allclose(fewer.predict(x), fitted.predict(x))


def test_importances_are_the_fits_mean_by_column(fitted):
    by_column = {}
    for member in fitted.members:
        for column, value in zip(member.feature_names_, member.get_feature_importance(),
                                 strict=True):  # fmt: skip
            by_column[column] = by_column.get(column, 0.0) + value / len(fitted.members)
    expected = [by_column[column] for column in fitted.feature_names_]
    np.testing.assert_allclose(fitted.get_feature_importance(), expected)


def test_saved_fits_load_as_the_same_ensemble_and_one_file_as_one_fit(tmp_path, table, fitted):
    x, y = table
    paths = fitted.save(tmp_path, "catboost_k2")
    assert sorted(paths) == ["catboost_k2", "catboost_k2_1", "catboost_k2_2"]
    loaded = Ensemble.load(paths, "catboost_k2")
    np.testing.assert_allclose(loaded.predict(x), fitted.predict(x))
    single = ensemble(x, y, config(1))
    assert len(single.members) == 1
    (path,) = single.save(tmp_path, "catboost_k1").values()  # a version with one model per window
    alone = Ensemble.load({"catboost_k1": path, "answerer": "elsewhere"}, "catboost_k1")
    np.testing.assert_allclose(alone.predict(x), single.members[0].predict(x))
    with pytest.raises(KeyError, match="no artifact 'catboost_k3' among"):
        Ensemble.load(paths, "catboost_k3")


def test_fits_reading_other_columns_do_not_make_an_ensemble(table):
    x, y = table
    one = ensemble(x, y, config(1)).members[0]
    other = ensemble(x[["a", "b", "model"]], y, config(1)).members[0]
    with pytest.raises(ValueError, match="the same columns"):
        Ensemble([one, other])
    with pytest.raises(ValueError, match="at least one"):
        Ensemble([])
