"""Train one network, tracked in MLflow: ``python train.py model=resnet width=16``."""

import logging
import sys

import hydra
from omegaconf import DictConfig

from mlflow_tg.errors import InputError
from mlflow_tg.job import train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Run the job; return the final test accuracy (the value a Hydra sweeper optimises)."""
    try:
        return train(cfg)["test_acc"]
    except InputError as error:  # bad input: no run was created
        logging.getLogger("train").error("%s", error)
        sys.exit(2)


if __name__ == "__main__":
    main()
