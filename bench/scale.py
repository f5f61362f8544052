"""Load and fault benchmark: many training jobs at once on one tracking store, nothing lost.

    python bench/scale.py [--jobs 8 16] [--epochs 5] [--restart-jobs 16] [--no-server]
                          [--speedup-sweep lenet|population|none] [--speedup-jobs 4]
                          [--speedup-epochs 3]

1. ``--jobs`` concurrent ``train.py`` jobs (lenet, width 4, graph capture on, one thread
   each, ``--epochs`` epochs on digits) against the PostgreSQL-backed tracking server of
   ``make server-start`` (``mlflow_tg/tracking/server.py`` on a throwaway PostgreSQL cluster:
   needs root and Debian's PostgreSQL), then against the embedded SQLite store. Every job
   imports first and all are released at once (``tests/start_together.py``). The sweep of
   ``--restart-jobs`` jobs on the server has the server stopped and started again once every
   run has logged its first epoch: the runs go on, their writes wait in their spools.
2. Each sweep counts its runs FINISHED and every metric of every epoch on the store
   (``val_*`` for epochs 0..E, ``train_*``, ``epoch_time_s``, ``lr`` for 1..E, ``test_*``,
   and every other key a job wrote by its spool journal: the graph summaries), and reports
   metric values written per second of the sweep's wall time (from the release to the last
   job's exit: training is most of it).
3. One sweep run sequentially, by the joblib launcher with 2 jobs, and as two sequential
   halves in two processes at once (what two cores give with no launcher: the ceiling),
   one after the other: the speed-up. ``--speedup-sweep lenet`` (default): ``--speedup-jobs``
   lenet jobs of ``--speedup-epochs`` epochs; ``population``: 16 jobs of the predictor's
   population (``+experiment=population model=vgg,resnet width=6,8 optimizer.lr=0.016,0.063
   optimizer.weight_decay=0 seed=0,1``, about 6 minutes sequentially).

Prints one line per sweep; the machine's load average before and after, since the cores may
be shared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlflow_tg import keys  # noqa: E402
from mlflow_tg.tracking import server  # noqa: E402
from mlflow_tg.tracking.spool import JOURNAL, read_journal  # noqa: E402
from tests.servers import can_run_postgres, free_port, throwaway_postgres  # noqa: E402

# Graph capture on (its 65 summaries per epoch and parquet tables are most of a run's writes)
JOB = ["model=lenet", "width=4", "graph.threads=1", "device=cpu", "num_threads=1"]
EVERY_EPOCH = (keys.VAL_LOSS, keys.VAL_ACC)  # epochs 0..E
TRAINING = (keys.TRAIN_LOSS, keys.TRAIN_ACC, keys.EPOCH_TIME, keys.LEARNING_RATE)  # 1..E
FINAL = (keys.TEST_LOSS, keys.TEST_ACC)  # at epoch E


@dataclass
class Tally:
    """What one sweep left in the store."""

    jobs: int
    exit_codes: list[int]
    finished: int
    metrics: int  # metric values found
    expected: int  # metric values every epoch of every job should have left
    missing: list[str]
    wall_s: float
    restart_s: float | None = None  # server down time, when it was restarted

    def line(self, store: str) -> str:
        """One line of the report."""
        restart = (
            "" if self.restart_s is None else f", server restarted ({self.restart_s:.0f} s down)"
        )
        ok = "nothing lost" if not self.missing and self.metrics == self.expected else "LOST"
        return (
            f"{store:<22} {self.jobs:>2} jobs: {self.finished}/{self.jobs} FINISHED, "
            f"{self.metrics}/{self.expected} metric values ({ok}), {self.wall_s:.1f} s, "
            f"{self.metrics / self.wall_s:.0f} metric values/s{restart}; exit codes "
            f"{sorted(set(self.exit_codes))}"
        )


def launch(folder: Path, jobs: int, epochs: int, uri: str) -> list[subprocess.Popen]:
    """``jobs`` train.py processes, imports done, released at the same instant."""
    folder.mkdir(parents=True, exist_ok=True)
    go = folder / "go"
    helper = str(ROOT / "tests" / "start_together.py")
    processes = []
    for seed in range(jobs):
        log = open(folder / f"job{seed}.log", "w")  # noqa: SIM115  the process owns it
        command = [sys.executable, helper, str(go), str(ROOT / "train.py"), *JOB,
                   f"epochs={epochs}", f"seed={seed}", f"tracking.uri={uri}"]  # fmt: skip
        processes.append(
            subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
        )
    ready = [folder / f"ready.{p.pid}" for p in processes]
    while not all(path.exists() for path in ready):
        if any(p.poll() is not None for p in processes):
            raise RuntimeError(f"a job exited before the start; see {folder}/job*.log")
        time.sleep(0.2)
    go.touch()
    return processes


def runs_of(uri: str) -> list:
    """The sweep's runs (the default experiment of train.py)."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name("mlflow_tg")
    return [] if found is None else client.search_runs([found.experiment_id], max_results=1000)


def produced(folder: Path) -> dict[str, dict[str, set[int]]]:
    """Every metric step each job wrote, by run id, from the jobs' spool journals."""
    written: dict[str, dict[str, set[int]]] = {}
    for journal in folder.glob(f"outputs/*/*/spool/{JOURNAL}"):
        header, records, _ = read_journal(journal.parent)
        steps = written.setdefault(header["run_id"], {})
        for record in records:
            for key in record.get("values", {}) if record["op"] == "metrics" else ():
                steps.setdefault(key, set()).add(record["step"])
    return written


def tally(folder: Path, uri: str, jobs: int, epochs: int, codes: list[int], wall_s: float) -> Tally:
    """Count FINISHED runs and every metric value of every epoch, against what the jobs wrote.

    Each job's journal lists what it wrote; the training metrics must be there for every
    epoch in any case (a journal cannot hide a lost epoch).
    """
    client, runs = MlflowClient(uri), runs_of(uri)
    wanted = {key: set(range(epochs + 1)) for key in EVERY_EPOCH}
    wanted |= {key: set(range(1, epochs + 1)) for key in TRAINING}
    wanted |= {key: {epochs} for key in FINAL}
    written = produced(folder)
    found, expected, missing = 0, 0, []
    for run in runs:
        keys_steps = {**written.get(run.info.run_id, {})}
        for key, steps in wanted.items():
            keys_steps[key] = keys_steps.get(key, set()) | steps
        for key, steps in keys_steps.items():
            have = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            found += len(have)
            expected += len(steps)
            if have != sorted(steps):
                missing.append(f"{run.info.run_id} {key} has steps {have}")
    missing += [f"{jobs - len(runs)} runs missing"] if len(runs) < jobs else []
    finished = sum(r.info.status == "FINISHED" for r in runs)
    return Tally(jobs, codes, finished, found, expected, missing, wall_s)


def first_epochs_logged(uri: str, jobs: int) -> bool:
    """Whether every job's run exists and has logged epoch 0."""
    try:
        runs = runs_of(uri)
    except Exception:  # the server is busy starting: not yet
        return False
    return len(runs) == jobs and all(keys.VAL_ACC in r.data.metrics for r in runs)


def sweep(folder: Path, jobs: int, epochs: int, uri: str, settings=None) -> Tally:
    """Run one sweep; with ``settings``, restart that server once every run has begun."""
    processes = launch(folder, jobs, epochs, uri)
    started = time.monotonic()  # from the release: the imports before it are not the store's
    restart_s = None
    if settings is not None:
        while not first_epochs_logged(uri, jobs):
            if all(p.poll() is not None for p in processes):
                break
            time.sleep(0.2)
        down = time.monotonic()
        server.stop_mlflow(settings)
        running = sum(p.poll() is None for p in processes)
        server.start_mlflow(settings)
        restart_s = time.monotonic() - down
        print(f"  server restarted with {running} of {jobs} jobs running", flush=True)
    codes = [p.wait() for p in processes]
    result = tally(folder, uri, jobs, epochs, codes, time.monotonic() - started)
    result.restart_s = restart_s
    for problem in result.missing[:5]:
        print(f"  missing: {problem}")
    return result


def server_sweeps(folder: Path, sizes: list[int], epochs: int, restart_jobs: int) -> None:
    """The sweeps on the PostgreSQL-backed tracking server, one database each."""
    with throwaway_postgres() as (pg_port, socket_dir):
        for jobs in sizes:
            settings = server.Settings(
                port=free_port(), state_dir=folder / f"server{jobs}", cluster="",
                db_port=pg_port, admin_socket_dir=str(socket_dir),
                db_name=f"scale{jobs}", timeout_s=300,
            )  # fmt: skip
            server.ensure_database(settings)
            server.start_mlflow(settings)
            try:
                restarted = settings if jobs == restart_jobs else None
                result = sweep(folder / f"pg{jobs}", jobs, epochs, settings.url, restarted)
            finally:
                server.stop_mlflow(settings)
            print(result.line("PostgreSQL server"), flush=True)


def new_store(folder: Path) -> str:
    """A SQLite store in ``folder``, its tables made before any job or timer starts."""
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def sqlite_sweeps(folder: Path, sizes: list[int], epochs: int) -> None:
    """The sweeps on the embedded SQLite store, one file each (made before the jobs)."""
    for jobs in sizes:
        store = folder / f"sqlite{jobs}"
        print(sweep(store, jobs, epochs, new_store(store)).line("embedded SQLite"), flush=True)


# 16 jobs of the predictor's population, about 25 s each: jobs long enough to pay a worker's
# imports back (--speedup-sweep population)
POPULATION_JOBS = ["+experiment=population", "model=vgg,resnet", "width=6,8",
                   "optimizer.lr=0.016,0.063", "optimizer.weight_decay=0"]  # fmt: skip


def multirun(uri: str, folder: Path, overrides: list[str], launcher: list[str]) -> subprocess.Popen:
    """Start one ``train.py -m`` sweep in ``folder``, logging to ``uri``."""
    command = [sys.executable, str(ROOT / "train.py"), "-m", *launcher, *overrides,
               f"tracking.uri={uri}", f"hydra.sweep.dir={folder / 'multirun'}"]  # fmt: skip
    return subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def timed(*sweeps: subprocess.Popen) -> float:
    """Seconds until every sweep, started just now, has ended; raises if one failed."""
    started = time.monotonic()
    for sweep in sweeps:
        _, errors = sweep.communicate()
        if sweep.returncode:
            raise RuntimeError(f"sweep failed:\n{errors.decode()[-2000:]}")
    return time.monotonic() - started


def speedup(folder: Path, overrides: list[str], seeds: list[int], label: str) -> None:
    """One sweep sequentially, with joblib on 2 workers, and as two sequential halves at once.

    The halves (each seed of half the sweep, in its own process and store) are what two cores
    give with no launcher at all: the machine's own ceiling for the joblib speed-up.
    """

    def with_seeds(some: list[int]) -> list[str]:
        return [*overrides, f"seed={','.join(map(str, some))}"]

    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    stores = {arm: new_store(folder / arm) for arm in ("sequential", "joblib", "half0", "half1")}

    def start(arm: str, some: list[int], launcher: list[str]) -> subprocess.Popen:
        return multirun(stores[arm], folder / arm, with_seeds(some), launcher)

    sequential = timed(start("sequential", seeds, []))
    parallel = timed(start("joblib", seeds, joblib))
    side_by_side = timed(start("half0", seeds[::2], []), start("half1", seeds[1::2], []))
    print(f"{label}: sequential {sequential:.1f} s, joblib n_jobs=2 {parallel:.1f} s "
          f"(speed-up {sequential / parallel:.2f}x), two sequential halves side by side "
          f"{side_by_side:.1f} s (the machine's ceiling, {sequential / side_by_side:.2f}x)",
          flush=True)  # fmt: skip


def main() -> None:
    """Parse the arguments and run the sweeps."""
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--jobs", type=int, nargs="+", default=[8, 16])
    cli.add_argument("--epochs", type=int, default=5)
    cli.add_argument("--restart-jobs", type=int, default=16, help="the sweep with a restart")
    cli.add_argument("--speedup-sweep", choices=["lenet", "population", "none"], default="lenet")
    cli.add_argument("--speedup-jobs", type=int, default=4, help="jobs of the speed-up sweep")
    cli.add_argument("--speedup-epochs", type=int, default=3)
    cli.add_argument("--no-server", action="store_true", help="skip the PostgreSQL sweeps")
    args = cli.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="mlflow_tg-scale."))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start; "
          f"files in {folder}", flush=True)  # fmt: skip
    try:
        if not args.no_server:
            if not can_run_postgres():
                sys.exit("the server sweeps need root and Debian's PostgreSQL; --no-server")
            server_sweeps(folder, args.jobs, args.epochs, args.restart_jobs)
        sqlite_sweeps(folder, args.jobs, args.epochs)
        if args.speedup_sweep == "population":
            speedup(folder / "population", POPULATION_JOBS, [0, 1], "16 population jobs")
        elif args.speedup_sweep == "lenet":
            lenet = [*JOB, f"epochs={args.speedup_epochs}"]
            seeds = list(range(args.speedup_jobs))
            label = f"{args.speedup_jobs} lenet jobs of {args.speedup_epochs} epochs"
            speedup(folder / "lenet", lenet, seeds, label)
    finally:
        print(f"load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
