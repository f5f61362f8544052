"""Train one network, tracked in MLflow: ``python train.py model=resnet width=16``."""

import logging
import os
import re
import signal
import sys
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.types import RunMode
from mlflow import get_tracking_uri
from omegaconf import DictConfig

from mlflow_tg.config import translate_error
from mlflow_tg.errors import InputError
from mlflow_tg.job import train
from mlflow_tg.tracking import stop, sweep
from mlflow_tg.tracking.health import refused_access
from mlflow_tg.tracking.run import Terminated

log = logging.getLogger("train")
UNDELIVERED = 75  # EX_TEMPFAIL: a scheduler sees that something is left to do (a replay)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Run the job; return the final test accuracy (the value a Hydra sweeper optimises).

    Bad input stops a single run with exit code 2. In a multirun the refused job fails alone
    (Hydra records it and launches the next one) and ``cli`` exits 2 once the sweep is over.
    """
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun:
        sweep.tally("job")
    try:
        result = stop.run_job(lambda: train(cfg))
    except InputError as error:  # bad input: no run was created
        refuse(error, multirun)
    except Exception as error:
        if (refused := refused_access(error)) is None:
            raise
        refuse(InputError(f"{get_tracking_uri()}: {refused}"), multirun)
    if result is None:  # SIGTERM stopped this worker's job
        return float("nan")
    if "left_in_spool" in result and not multirun:  # trained, but the store lacks part of it
        print(
            f"train.py: the run trained to its end, but the tracking store lacks part of it: "
            f"deliver it with mlflow-tg replay {result['left_in_spool']} (exit {UNDELIVERED})",
            file=sys.stderr,
        )
        sys.exit(UNDELIVERED)
    return result["test_acc"]


def refuse(error: InputError, multirun: bool) -> NoReturn:
    """Bad input: exit 2 with one paragraph; in a multirun, the job fails alone and is counted."""
    if not multirun:  # one paragraph, as the values Hydra refuses while composing
        print(error, file=sys.stderr)
        sys.exit(2)
    sweep.tally("refused")
    log.error("job %s refused, the multirun goes on: %s", HydraConfig.get().job.num, error)
    raise error


def cli() -> None:
    """``launch()`` in the process that launches the jobs (SIGTERM: ``tracking/stop.py``)."""
    os.environ["HYDRA_FULL_ERROR"] = "1"
    # workers killed mid-run leave semaphores that Python's resource tracker removes itself,
    # warning about them at exit: noise after the lines that say how the runs ended
    quiet = [os.environ.get("PYTHONWARNINGS"), "ignore:resource_tracker:UserWarning"]
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, quiet))
    stop.start_launcher()
    try:
        launch()
    finally:
        if lost := stop.end_launcher():
            print(
                f"train.py: {len(lost)} run(s) of this sweep were left unended by their "
                "worker, which joblib stopped or which died; each one, as the launching process "
                "left it:\n  " + "\n  ".join(lost),
                file=sys.stderr,
            )


def launch() -> None:
    """``main()``, where a value Hydra refuses while composing also exits 2 with one paragraph.

    Hydra composes (and type-checks) the config before ``main`` runs, and would print its own
    error and exit 1; with HYDRA_FULL_ERROR its errors reach this function instead. An unknown
    group option (``model=transformer``) keeps Hydra's message, which lists the options.
    A multirun with refused jobs exits 2 once its other jobs have run; SIGTERM exits 143.
    """
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as error:
        print(translate_error(error, sys.argv[1:]) or error, file=sys.stderr)
        sys.exit(2)
    except InputError as error:  # raised by Hydra once a multirun with refused jobs is over
        jobs = sweep.tallied()
        count = (
            f"{jobs.get('refused', 0)} of the {jobs['job']} jobs"
            if jobs.get("job")
            else "jobs"  # run on other machines (submitit's launchers): not counted here
        )
        print(
            f"multirun: {count} had bad input and did not run (no MLflow run; each error is "
            f"logged above); the other jobs ran. The first: {error}",
            file=sys.stderr,
        )
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: the run ended KILLED (tracked_run)
        print("train.py: interrupted (Ctrl-C); a run that was training ends KILLED",
              file=sys.stderr)  # fmt: skip
        sys.exit(130)
    except Terminated as terminated:  # SIGTERM: the run ended KILLED (tracked_run says how)
        print(f"train.py: {terminated}; {terminated.outcome}", file=sys.stderr)
        sys.exit(terminated.exit_code)
    except Exception as error:
        if not sweep.worker_died(error):
            raise
        if not stop.STOPPING.is_set():  # else SIGTERM killed it, as the others: said below
            report_worker_death(error)
    if stop.STOPPING.is_set():  # SIGTERM passed on to a launcher's workers
        stop.stop_workers()
        print(
            "train.py: terminated by SIGTERM, passed on to the jobs that were running (each "
            "one's log says how its run ended); no job started after it",
            file=sys.stderr,
        )
        sys.exit(128 + signal.SIGTERM)


def report_worker_death(error: Exception) -> NoReturn:
    """Exit 1 with one paragraph: joblib stopped the sweep because one of its workers died."""
    codes = re.search(r"exit codes of the workers are (\{.*?\})", str(error))
    print(
        f"train.py: a worker process of the joblib launcher died (exit code "
        f"{codes.group(1) if codes else 'unknown'}: the OOM killer, a signal, a crash), and "
        "joblib stopped the sweep's other workers with it; the jobs not started did not run",
        file=sys.stderr,
    )
    sys.exit(1)


if __name__ == "__main__":
    cli()
