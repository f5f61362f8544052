"""Run ``train.py`` in this process once a file appears: ``start_together.py GO TRAIN ARGS…``.

Everything heavy is imported first and ``ready.<pid>`` is written beside ``GO`` (in the
working folder); then the process waits for ``GO`` and runs the real ``train.py`` as
``__main__``. Several of them released by one file reach Hydra and MLflow within milliseconds
of each other, as jobs started at once do on a machine with cores to spare.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

import mlflow_tg.job  # noqa: F401  (torch, MLflow, Hydra: the slow imports, before the wait)

go, train = Path(sys.argv[1]), sys.argv[2]
(go.parent / f"ready.{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.005)
sys.argv = [train, *sys.argv[3:]]
runpy.run_path(train, run_name="__main__")
