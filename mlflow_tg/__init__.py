"""Temporal graph summaries of neural-network training, tracked in MLflow."""

import os

from omegaconf import OmegaConf

__version__ = "0.1.0"

# ${mlflow_tg.pid:} in conf/config.yaml's output folders: jobs started in the same second on
# one machine get folders of their own. Cached like Hydra's ${now:}, so a multirun's launcher
# and its job processes resolve the sweep folder alike.
if not OmegaConf.has_resolver("mlflow_tg.pid"):
    OmegaConf.register_new_resolver("mlflow_tg.pid", os.getpid, use_cache=True)
# ${mlflow_tg.short_name:${._target_}}, the name of a model=custom run: my_pkg.MyNet runs as MyNet.
if not OmegaConf.has_resolver("mlflow_tg.short_name"):
    OmegaConf.register_new_resolver("mlflow_tg.short_name", lambda path: str(path).split(".")[-1])


def __getattr__(name: str):
    """``mlflow_tg.watch`` and ``mlflow_tg.Watcher``, imported when first used.

    Lazily, so that importing the package (the CLI, the config) does not load torch, MLflow
    and graph-tool.
    """
    if name in ("watch", "Watcher"):
        from mlflow_tg.integrations import watch as module

        return getattr(module, name)
    raise AttributeError(f"module 'mlflow_tg' has no attribute {name!r}")
