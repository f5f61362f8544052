"""Log a tiny scikit-learn model and register it with the alias ``champion``.

Run as a script by ``tests/test_ui.py`` so that the UI has a registered model page to show:
``python tests/ui/register_model.py TRACKING_URI ARTIFACT_ROOT MODEL_NAME``. It prints the
registered version. Kept out of the test process: MLflow's fluent API holds global state.
"""

from __future__ import annotations

import sys

import mlflow
import numpy as np
from mlflow.models import infer_signature
from sklearn.linear_model import LinearRegression

EXPERIMENT_KIND = "mlflow.experimentKind"
ALIAS = "champion"


def main(tracking_uri: str, artifact_root: str, model_name: str) -> str:
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("ui-predictor")
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(
            "ui-predictor",
            artifact_location=artifact_root,
            tags={EXPERIMENT_KIND: "custom_model_development"},
        )
    )
    features = np.array([[0.1, 0.2], [0.3, 0.1], [0.5, 0.9], [0.7, 0.4]], dtype=np.float64)
    target = np.array([0.2, 0.3, 0.8, 0.6])
    model = LinearRegression().fit(features, target)
    with mlflow.start_run(experiment_id=experiment_id, run_name="ui-predictor"):
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(features, model.predict(features)),
        )
    version = mlflow.register_model(info.model_uri, model_name).version
    client.set_registered_model_alias(model_name, ALIAS, version)
    return str(version)


if __name__ == "__main__":
    print(main(*sys.argv[1:4]))
