"""Temporal graph summaries of neural-network training, tracked in MLflow."""

import os

from omegaconf import OmegaConf

__version__ = "0.1.0"

# ${mlflow_tg.pid:} in conf/config.yaml's output folders: jobs started in the same second on
# one machine get folders of their own. Cached like Hydra's ${now:}, so a multirun's launcher
# and its job processes resolve the sweep folder alike.
if not OmegaConf.has_resolver("mlflow_tg.pid"):
    OmegaConf.register_new_resolver("mlflow_tg.pid", os.getpid, use_cache=True)
