"""Every MLflow name the project writes or reads: metric keys, tags, artifact paths, models.

One place, so that a reader of runs (the predictor, ``mlflow-tg predict``, the UI guide in the
README) and their writer cannot drift apart.

Metric keys put a section name before their last ``/``: the MLflow UI groups a run's charts
into one section per such prefix, so ``tg.eigenvector/gini`` lands in the section
``tg.eigenvector`` beside the other summaries of that centrality, and the predictions in
``predicted``.
"""

from __future__ import annotations

# Training metrics, step = epoch (epoch 0: the untrained network).
VAL_LOSS, VAL_ACC = "val_loss", "val_acc"
TRAIN_LOSS, TRAIN_ACC = "train_loss", "train_acc"
TEST_LOSS, TEST_ACC = "test_loss", "test_acc"
EPOCH_TIME, LEARNING_RATE, CAPTURE_TIME = "epoch_time_s", "lr", "capture_time_s"
TARGET = TEST_ACC  # the final test accuracy: what a finished run is a training example of

# Graph summaries: tg.<centrality>/<statistic>, and tg.graph/{vertices,edges}.
GRAPH_PREFIX = "tg."
GRAPH_SIZE = "graph"  # the pseudo-centrality holding the graph's size


def graph_metric(centrality: str, statistic: str) -> str:
    """``tg.eigenvector/gini``: one chart section per centrality in the MLflow UI."""
    return f"{GRAPH_PREFIX}{centrality}/{statistic}"


def is_graph_metric(key: str) -> bool:
    """Whether a metric key (or a feature named after one) is a graph summary."""
    return key.startswith(GRAPH_PREFIX) and "/" in key


def upgrade_graph_key(key: str) -> str:
    """A graph summary key of older runs (``tg.eigenvector.gini``) in today's form.

    Runs logged before the keys took a ``/`` keep being readable by the predictor.
    """
    if not key.startswith(GRAPH_PREFIX) or "/" in key:
        return key
    centrality, dot, statistic = key[len(GRAPH_PREFIX) :].partition(".")
    return graph_metric(centrality, statistic) if dot and statistic else key


# Live and on-demand predictions of the final test accuracy, step = the epoch predicted from.
PREDICTED = "predicted/test_acc"
PREDICTED_LOW, PREDICTED_HIGH = "predicted/test_acc_low", "predicted/test_acc_high"
PREDICTED_OOD = "predicted/out_of_distribution"  # 1: outside what the model learned from

# Run tags.
TAG_PREFIX = "mlflow_tg."
OVERRIDES = "mlflow_tg.overrides"
SWEEP, SWEEP_JOB = "mlflow_tg.sweep", "mlflow_tg.sweep_job"
VERSION, GIT_COMMIT = "mlflow_tg.version", "mlflow_tg.git_commit"
CONFIG_ID = "mlflow_tg.config_id"  # a hash of the config without the seed: seed-twins share it
ERROR = "mlflow_tg.error"
KILLED_BY = "mlflow_tg.killed_by"  # SIGINT (Ctrl-C) or SIGTERM, on a run that ended KILLED
# A running run's last sign of life (UTC, ISO 8601 to the second), renewed every
# tracking.heartbeat_s; `mlflow-tg reap` ends runs whose heartbeat is stale KILLED and says why
# in REAPED.
HEARTBEAT, REAPED = "mlflow_tg.heartbeat", "mlflow_tg.reaped"
DIVERGED, DIVERGED_EPOCH = "diverged", "mlflow_tg.diverged_epoch"
CAPTURE_SKIPPED = "mlflow_tg.capture_skipped_epochs"
PREDICTED_BY = "mlflow_tg.predicted_by"
PRUNED = "pruned"  # "true" when a pruning policy stopped the run, "false" when it let it finish
PRUNED_EPOCH, PRUNED_BY = "mlflow_tg.pruned_epoch", "mlflow_tg.pruned_by"
NOTE = "mlflow.note.content"  # MLflow's run description, shown on the run page: markdown lines
NOTE_BREAK = "  \n"  # markdown: two spaces end a line
# The start of a prediction's line in a run's description; a description keeps one, the latest
# (training writes its live prediction there, `mlflow-tg predict` its answer).
NOTE_PREDICTION = "predicted test accuracy "
# MLflow's kind of an experiment: its runs view, not the GenAI one. The UI of MLflow 3.17.2 does
# not read it yet (its workflow switch decides): links add UI_RUNS_VIEW to open on the runs.
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"
UI_RUNS_VIEW = "?workflowType=machine_learning"

# Run artifacts.
HISTORY = "history.parquet"  # one row per epoch, one column per metric, rewritten every epoch
HYDRA_DIR = ".hydra"
GRAPH_FIGURE = "graph/dynamics.png"
GRAPH_FILES = "graph/graphs"


def node_table_path(epoch: int) -> str:
    """The per-vertex table of one capture."""
    return f"graph/nodes/epoch_{epoch:03d}.parquet"


def layer_table_path(epoch: int) -> str:
    """The per-layer table of one capture."""
    return f"graph/layers/epoch_{epoch:03d}.parquet"


# The predictor: its runs, registered model, aliases and version tags.
REGISTERED_MODEL = "tg-performance-predictor"
CHAMPION, CHALLENGER = "champion", "challenger"
K_TAG, SETS_TAG = "mlflow_tg.k", "mlflow_tg.feature_sets"
KS_TAG = "mlflow_tg.ks"  # the windows a version answers from, comma-separated ("1,2,3")
HOLDOUT_SEED_TAG, HOLDOUT_FRACTION_TAG = "mlflow_tg.holdout_seed", "mlflow_tg.holdout_fraction"
MODEL_VERSION, ALIAS = "mlflow_tg.model_version", "mlflow_tg.alias"
COMPARISON, WIDTH_TRANSFER = "mlflow_tg.comparison", "mlflow_tg.width_transfer"
SETS_CHOICE = "mlflow_tg.feature_sets_choice"  # why the registered version uses its feature set
# the comparison with the champion: both scores, and on how many held-out runs
COMPARED_CANDIDATE, COMPARED_CHAMPION = "comparison/candidate", "comparison/champion"
COMPARED_RUNS = "comparison/runs"
# The predictor run's artifacts: tables (parquet), figures, and its training set as a dataset.
QUALITY_TABLE, TRAINING_TABLE, IMPORTANCE_TABLE = "quality", "training_table", "feature_importance"
SCATTER_FIGURE, IMPORTANCE_FIGURE = "predicted_vs_actual.png", "feature_importance.png"
TRAINING_DATASET = "predictor-training-table"


def coverage_metric(nominal: float, k: int | None = None) -> str:
    """``holdout/coverage80``: share of held-out runs inside their 80% interval.

    Of the model of window ``k`` (``holdout/k2/coverage80``), or of window ``k`` of the config
    (the one the quality comparison uses) when ``k`` is None.
    """
    window = "" if k is None else f"k{k}/"
    return f"holdout/{window}coverage{round(100 * nominal)}"


def widening_metric(k: int, outside: bool = False) -> str:
    """``calibration/k2/widen``: how far window ``k`` moves each end of its interval out.

    ``calibration/k2/widen_outside``: the same for runs flagged out of distribution.
    """
    return f"calibration/k{k}/widen" + ("_outside" if outside else "")


# The registered predictor's request (one row per run and epoch: these two columns, the
# metrics as history.parquet names them, the params by their param key) and its answer
# (one row per run, in request order).
RUN_ID, EPOCH = "run_id", "epoch"
ANSWER_K = "k"  # the window the answer used: epochs 0..k
ANSWER, ANSWER_LOW, ANSWER_HIGH = (
    "predicted_test_acc",
    "predicted_test_acc_low",
    "predicted_test_acc_high",
)
ANSWER_OOD, ANSWER_OOD_REASONS = "out_of_distribution", "ood_reasons"
