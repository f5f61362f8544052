"""Graph capture in loops of one's own: ``mlflow_tg.watch`` and the Lightning callback.

The README's two examples run here as written, against a store in a temporary folder; their
runs must look like ``train.py`` runs to every reader of runs (same ``tg.*`` metrics, tables and
``history.parquet`` columns, features the predictor can build).
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from torch import nn

import mlflow_tg
from mlflow_tg import keys
from mlflow_tg.errors import InputError
from mlflow_tg.job import train
from mlflow_tg.predictor.features import run_features
from mlflow_tg.train.models import build_model
from tests.conftest import CONF_DIR

README = CONF_DIR.parent / "README.md"
HAS_LIGHTNING = importlib.util.find_spec("lightning") is not None
SECTION = "## Your own model, your own loop"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def store(tracking_uri: str, tmp_path, monkeypatch) -> MlflowClient:
    """The temporary store as MLflow's current one, the working folder beside it."""
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("tests")  # not the id an earlier test's store gave its experiment
    yield MlflowClient(tracking_uri)
    while mlflow.active_run() is not None:
        mlflow.end_run()


def readme_examples() -> list[str]:
    """The python blocks of the README's section on one's own loop, in order."""
    text = README.read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```", section, re.DOTALL | re.MULTILINE)


def only_run(client: MlflowClient, experiment: str):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def history(client: MlflowClient, run_id: str) -> pl.DataFrame:
    return pl.read_parquet(client.download_artifacts(run_id, keys.HISTORY))


def artifact_paths(client: MlflowClient, run_id: str, folder: str) -> set[str]:
    return {item.path for item in client.list_artifacts(run_id, folder)}


def graph_metric_keys(run) -> set[str]:
    return {key for key in run.data.metrics if keys.is_graph_metric(key)}


def check_like_a_train_run(client: MlflowClient, run, epochs: int) -> pl.DataFrame:
    """What every watched run must have: the graph's metrics, tables, figure and history."""
    run_id = run.info.run_id
    table = history(client, run_id)
    assert table["epoch"].to_list() == list(range(epochs + 1))
    assert {keys.TEST_LOSS, keys.TEST_ACC} <= set(run.data.metrics)
    steps = [m.step for m in client.get_metric_history(run_id, "tg.eigenvector/gini")]
    assert sorted(steps) == list(range(epochs + 1))
    assert len(graph_metric_keys(run)) > 20
    assert artifact_paths(client, run_id, "graph/nodes") == {
        keys.node_table_path(epoch) for epoch in range(epochs + 1)
    }
    assert keys.GRAPH_FIGURE in artifact_paths(client, run_id, "graph")
    return table


def test_readme_plain_pytorch_example_makes_a_run_like_train_py(store):
    plain, _ = readme_examples()
    exec(compile(plain, "README.md", "exec"), {"__name__": "readme"})
    run = only_run(store, "my-loop")
    table = check_like_a_train_run(store, run, epochs=2)
    row = table.row(2, named=True)
    assert row[keys.LEARNING_RATE] == 0.05 and row[keys.EPOCH_TIME] > 0
    assert table[keys.TRAIN_LOSS][0] is None  # epoch 0 is the untrained network
    features = run_features(table.to_dicts(), {}, k=2, sets="graph+curve+hparams")
    assert "tg.eigenvector/gini@2" in features and "val_acc.slope" in features


@pytest.mark.skipif(not HAS_LIGHTNING, reason="needs the lightning extra")
def test_readme_lightning_example_makes_a_run_like_train_py(store):
    _, lightning = readme_examples()
    exec(compile(lightning, "README.md", "exec"), {"__name__": "readme"})
    run = only_run(store, "my-lightning-loop")
    table = check_like_a_train_run(store, run, epochs=2)
    assert table[keys.VAL_ACC].null_count() == 0  # epoch 0 too: the whole sanity check
    assert table[keys.TRAIN_ACC].null_count() == 1 and table[keys.LEARNING_RATE][1] == 0.05
    assert 0.3 < run.data.metrics[keys.TEST_ACC] <= 1
    features = run_features(table.to_dicts(), {}, k=2, sets="graph+curve")
    assert "train_loss.sum" in features and "tg.pagerank/q90@1" in features


def digits_like(count: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images the shape of train.py's digits (1×32×32), ten classes."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(count, 1, 32, 32, generator=generator)
    return images, torch.randint(0, 10, (count,), generator=generator)


def watched_mlp_run(epochs: int) -> str:
    """train.py's mlp of width 2 trained by a loop of one's own, watched; its run id."""
    torch.manual_seed(0)
    model = build_model("mlp", 2, 1, 32, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = digits_like()
    with mlflow.start_run() as run:
        watcher = mlflow_tg.watch(model, x[:8], optimizer=optimizer, threads=1)
        watcher.log_epoch(0, **evaluated(model, x, y, "val"))
        for epoch in range(1, epochs + 1):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            metrics = evaluated(model, x, y, "train") | evaluated(model, x, y, "val")
            watcher.log_epoch(epoch, metrics)
        watcher.log_test(evaluated(model, x, y, "test"))
        watcher.finish()
    return run.info.run_id


def evaluated(model: nn.Module, x: torch.Tensor, y: torch.Tensor, split: str) -> dict:
    with torch.no_grad():
        logits = model(x)
    accuracy = (logits.argmax(1) == y).float().mean().item()
    return {f"{split}_loss": F.cross_entropy(logits, y).item(), f"{split}_acc": accuracy}


def test_a_watched_run_has_the_metrics_and_history_columns_of_a_train_py_run(store, make_cfg):
    watched = store.get_run(watched_mlp_run(epochs=2))
    result = train(make_cfg("model=mlp", "epochs=2"))
    trained = store.get_run(result["run_id"])
    assert graph_metric_keys(watched) == graph_metric_keys(trained)
    assert set(watched.data.metrics) == set(trained.data.metrics)
    watched_table = history(store, watched.info.run_id)
    trained_table = history(store, trained.info.run_id)
    assert set(watched_table.columns) == set(trained_table.columns)
    for epoch in (0, 1, 2):  # every epoch's row holds what train.py's holds
        present = {c for c, v in watched_table.row(epoch, named=True).items() if v is not None}
        expected = {c for c, v in trained_table.row(epoch, named=True).items() if v is not None}
        assert present == expected, epoch
    assert artifact_paths(store, watched.info.run_id, "graph/layers") == artifact_paths(
        store, trained.info.run_id, "graph/layers"
    )


def test_the_predictors_features_of_a_watched_run_are_those_of_a_train_py_run(store, make_cfg):
    watched = history(store, watched_mlp_run(epochs=2)).to_dicts()
    trained_id = train(make_cfg("model=mlp", "epochs=2"))["run_id"]
    trained = history(store, trained_id).to_dicts()
    params = store.get_run(trained_id).data.params  # a watched run logs these itself
    for k in (1, 2):
        from_watched = run_features(watched, params, k, "graph+curve+hparams", "watched")
        from_trained = run_features(trained, params, k, "graph+curve+hparams", "trained")
        assert set(from_watched) == set(from_trained)
        assert from_watched["tg.graph/vertices@0"] == from_trained["tg.graph/vertices@0"]


def test_capture_alone_then_log_epoch_share_one_history_row(store):
    model = build_model("mlp", 2, 1, 8, 10)
    with mlflow.start_run() as run:
        watcher = mlflow_tg.watch(model, torch.zeros(4, 1, 8, 8), threads=1)
        summaries = watcher.capture(0)
        assert summaries and all(key in summaries for key in ("tg.strength/mean",))
        assert watcher.capture(0) == {}  # once per epoch
        logged = watcher.log_epoch(0, val_loss=2.3, val_acc=0.1)
        assert "tg.strength/mean" not in logged  # captured already
        watcher.capture(1)
        watcher.log_epoch(1, train_loss=2.0, train_acc=0.2, val_loss=2.1, val_acc=0.2)
        with pytest.raises(InputError, match="epoch 0 was logged after epoch 1"):
            watcher.log_epoch(0, val_loss=1.0)
    table = history(store, run.info.run_id)
    assert table["epoch"].to_list() == [0, 1]
    assert table["val_acc"].to_list() == [0.1, 0.2]
    assert table["tg.strength/mean"].null_count() == 0
    steps = [m.step for m in store.get_metric_history(run.info.run_id, "tg.strength/mean")]
    assert steps == [0, 1]


def test_every_n_epochs_and_centralities_are_train_py_settings(store):
    model = build_model("mlp", 2, 1, 8, 10)
    with mlflow.start_run() as run:
        watcher = mlflow_tg.watch(
            model, torch.zeros(4, 1, 8, 8), centralities=["strength"], every_n_epochs=2, threads=1
        )
        for epoch in range(4):
            watcher.log_epoch(epoch, val_loss=1.0, val_acc=0.5)
    steps = [m.step for m in store.get_metric_history(run.info.run_id, "tg.strength/gini")]
    assert steps == [0, 2]
    assert not [key for key in store.get_run(run.info.run_id).data.metrics if "pagerank" in key]


class DataDependent(nn.Module):
    """A network whose forward pass branches on the data: no rolled graph for it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


@pytest.mark.parametrize(
    ("model", "settings", "message"),
    [
        (DataDependent(), {}, "DataDependent|control flow"),
        (build_model("mlp", 2, 1, 8, 10), {"centralities": ["nope"]}, "centralities"),
        (build_model("mlp", 2, 1, 8, 10), {"every_n_epoch": 2}, "no graph setting every_n_epoch"),
    ],
)
def test_bad_input_is_refused_before_anything_is_logged(store, model, settings, message):
    example = torch.zeros(2, 4) if isinstance(model, DataDependent) else torch.zeros(2, 1, 8, 8)
    with mlflow.start_run() as run, pytest.raises(InputError, match=message):
        mlflow_tg.watch(model, example, **settings)
    assert not store.get_run(run.info.run_id).data.metrics
    assert not store.list_artifacts(run.info.run_id)


def test_watch_needs_an_active_run_or_a_run_id(store):
    with pytest.raises(InputError, match=r"mlflow\.start_run"):
        mlflow_tg.watch(build_model("mlp", 2, 1, 8, 10), torch.zeros(2, 1, 8, 8))


def test_only_the_lightning_callback_imports_lightning():
    package = CONF_DIR.parent / "mlflow_tg"
    importers = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name.split(".")[0] in ("lightning", "pytorch_lightning") for name in names):
                importers.add(path.relative_to(package).as_posix())
    assert importers == {"integrations/lightning.py"}
    assert mlflow_tg.watch is mlflow_tg.integrations.watch.watch  # the package's own name


@pytest.mark.slow
def test_mlflow_tg_predict_answers_for_a_watched_run(population, champion, tmp_path, monkeypatch):
    from mlflow_tg.tracking.run import run_params
    from mlflow_tg.train.data import batches, load_data
    from mlflow_tg.train.loop import evaluate
    from tests.conftest import store_job

    cfg = store_job(population, "watched", "model=mlp", "width=3")
    data, cpu = load_data(cfg.data), torch.device("cpu")
    torch.manual_seed(0)
    model = build_model("mlp", 3, data.in_channels, data.image_size, data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(population["uri"])
    mlflow.set_experiment("watched")
    with mlflow.start_run() as run:
        mlflow.log_params(run_params(cfg))  # the params the predictor reads, as train.py logs
        watcher = mlflow_tg.watch(model, torch.zeros(2, *data.input_shape()), optimizer=optimizer)
        val = evaluate(model, data.val, data, 32, cpu)
        watcher.log_epoch(0, val_loss=val.loss, val_acc=val.accuracy)
        for epoch in range(1, 5):
            model.train()
            for x, y in batches(data.train, data, 32, cpu, train=True):
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
            fitted = evaluate(model, data.train, data, 32, cpu)
            val = evaluate(model, data.val, data, 32, cpu)
            metrics = {"train_loss": fitted.loss, "train_acc": fitted.accuracy}
            watcher.log_epoch(epoch, metrics, val_loss=val.loss, val_acc=val.accuracy)
        watcher.finish()
    cli = Path(sys.executable).parent / "mlflow-tg"
    result = subprocess.run(
        [str(cli), "predict", "--run-id", run.info.run_id, "--tracking-uri", population["uri"]],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert run.info.run_id in result.stdout
    answer = MlflowClient(population["uri"]).get_run(run.info.run_id).data.metrics
    assert 0 <= answer[keys.PREDICTED] <= 1


@pytest.mark.skipif(not HAS_LIGHTNING, reason="needs the lightning extra")
def test_the_lightning_callback_logs_to_an_mlflow_logger_run_under_other_names(store, tracking_uri):
    import lightning as L
    from lightning.pytorch.loggers import MLFlowLogger
    from torch.utils.data import DataLoader, TensorDataset

    from mlflow_tg.integrations.lightning import GraphCaptureCallback

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_model("mlp", 2, 1, 8, 10)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, index):
            loss = F.cross_entropy(self(batch[0]), batch[1])
            self.log("loss/train", loss, on_epoch=True, on_step=True)  # as loss/train_epoch
            return loss

        def validation_step(self, batch, index):
            self.log("loss/val", F.cross_entropy(self(batch[0]), batch[1]), on_epoch=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    data = DataLoader(TensorDataset(x, y), batch_size=32)
    callback = GraphCaptureCallback(
        example_input=x[:4], names={"train_loss": "loss/train", "val_loss": "loss/val"}, threads=1
    )
    logger = MLFlowLogger(experiment_name="lightning-logger", tracking_uri=tracking_uri)
    trainer = L.Trainer(
        max_epochs=2,
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Classifier(), data, data)
    table = history(store, logger.run_id)
    assert table["epoch"].to_list() == [0, 1, 2]
    assert table[keys.TRAIN_LOSS].null_count() == 1 and table[keys.VAL_LOSS].null_count() == 0
    assert table["tg.strength/mean"].null_count() == 0
    # validated every other epoch: the epochs without validation get no val_loss, not a stale one
    logger = MLFlowLogger(experiment_name="lightning-every-2", tracking_uri=tracking_uri)
    callback = GraphCaptureCallback(example_input=x[:4], names=callback.names, threads=1)
    trainer = L.Trainer(
        max_epochs=3, check_val_every_n_epoch=2, logger=logger, callbacks=[callback],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Classifier(), data, data)
    val_loss = history(store, logger.run_id)[keys.VAL_LOSS].to_list()
    assert [value is not None for value in val_loss] == [True, False, True, False]


@pytest.mark.skipif(not HAS_LIGHTNING, reason="needs the lightning extra")
def test_the_lightning_callback_needs_a_run(store):
    import lightning as L

    from mlflow_tg.integrations.lightning import GraphCaptureCallback

    trainer = L.Trainer(logger=False)
    with pytest.raises(InputError, match="MLFlowLogger"):
        GraphCaptureCallback(torch.zeros(2, 4)).on_fit_start(trainer, L.LightningModule())
