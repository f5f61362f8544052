"""A run's writes, journaled on local disk and delivered to the tracking store in order.

Training never waits for the store. ``RunLogger`` appends each write (an epoch's metrics, a
tag, an artifact file) to an append-only journal in the run's spool folder and goes on; a
courier thread delivers the journal in order, several epochs per request when they piled up,
and keeps the run's heartbeat (the ``mlflow_tg.heartbeat`` tag, see ``reap.py``). A tracking
server that stops answering for longer than MLflow's own HTTP retries only delays delivery:
the courier waits for ``/health`` and goes on where it stopped. At the run's end the journal
is drained before the run is ended; what could not be delivered stays in the folder, and
``mlflow-tg replay FOLDER`` delivers it (and ends the run) once the server is back.

The folder: ``journal.jsonl`` (a header naming the run and store, then one record per line),
``delivered`` (how many records the store has), ``files/<seq>/`` (artifact copies, removed
once delivered). Records carry their own timestamps, so delivering one twice stores nothing
twice: MLflow skips a metric identical to one it has, and tags and artifacts are overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    INVALID_STATE,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)

from mlflow_tg import keys
from mlflow_tg.tracking.health import store_unreachable, unanswered

log = logging.getLogger(__name__)
JOURNAL, DELIVERED, FILES = "journal.jsonl", "delivered", "files"
MAX_METRICS, MAX_TAGS = 1000, 100  # MLflow's limits on one log_batch request
MAX_TAG_LENGTH = 5000  # the longest tag value every MLflow backend accepts
ATTEMPTS = 5  # a store that answers but refuses a write this often has refused it for good
MAX_BACKOFF_S = 10.0
REFUSALS = {ErrorCode.Name(c) for c in (INVALID_PARAMETER_VALUE, INVALID_STATE,
                                        RESOURCE_DOES_NOT_EXIST)}  # fmt: skip


class SpoolError(RuntimeError):
    """A spool folder that cannot be replayed; the message says why."""


def now_iso() -> str:
    """The current UTC time, to the second, as the heartbeat tag writes it."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Hurry:
    """When a wait for the store should be cut short (``now()``), and to how many seconds."""

    now: Callable[[], bool]
    seconds: float


def server_answers(uri: str) -> bool:
    """Whether the store can be reached: a local store always, a server when ``/health`` is up."""
    if not uri.startswith(("http://", "https://")):
        return True
    return unanswered(uri, timeout_s=2) is None


def refused(error: BaseException) -> bool:
    """Whether the store refused the write itself (no retry can help), not failed to answer."""
    return isinstance(error, MlflowException) and error.error_code in REFUSALS


def batches(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Consecutive records grouped into what one request carries.

    Metrics and tags of consecutive records share a ``log_batch`` call within MLflow's limits;
    an artifact or the run's end is a request of its own.
    """
    groups: list[list[dict[str, Any]]] = []
    metrics = tags = 0
    for record in records:
        size = len(record.get("values", {}))
        batchable = record["op"] in ("metrics", "tag")
        last = groups[-1] if groups else None
        fits = metrics + size <= MAX_METRICS and tags + (record["op"] == "tag") <= MAX_TAGS
        if batchable and last and last[0]["op"] in ("metrics", "tag") and fits:
            last.append(record)
        else:
            groups.append([record])
            metrics = tags = 0
        metrics += size
        tags += record["op"] == "tag"
    return groups


def target(record: dict[str, Any]) -> tuple[str | None, str]:
    """Where an artifact record lands in the run's artifacts: (folder, name)."""
    return record["dir"], Path(record["file"]).name


def deliver(client: MlflowClient, run_id: str, group: list[dict[str, Any]], folder: Path,
            later: list[dict[str, Any]] = (), heartbeat: bool = False) -> None:  # fmt: skip
    """Send one group of records (see ``batches``) to the store.

    An artifact that a ``later`` record replaces (``history.parquet``, rewritten each epoch,
    after an outage) is not sent: only its last version is.
    """
    first = group[0]
    if first["op"] == "artifact":
        replaced = any(r["op"] == "artifact" and target(r) == target(first) for r in later)
        path = folder / first["file"]
        if not replaced and path.exists():
            client.log_artifact(run_id, str(path), first["dir"])
        elif not replaced:  # removed once delivered, before the count of delivered was written
            log.warning("%s is gone from the spool: delivered before, not sent again", path)
        shutil.rmtree(path.parent, ignore_errors=True)
        return
    if first["op"] == "end":
        client.set_terminated(run_id, first["status"], end_time=first["time"])
        return
    metrics = [
        Metric(key, value, record["time"], record["step"])
        for record in group
        if record["op"] == "metrics"
        for key, value in record["values"].items()
    ]
    tags = {r["key"]: r["value"] for r in group if r["op"] == "tag"}  # the last value wins
    if keys.NOTE in tags:
        tags[keys.NOTE] = merged_note(
            tags[keys.NOTE], client.get_run(run_id).data.tags.get(keys.NOTE)
        )
    if heartbeat:
        tags[keys.HEARTBEAT] = now_iso()
    client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])


def merged_note(own: str, current: str | None) -> str:
    """The run's own description, with the lines others wrote there since kept after it.

    Training rewrites its description whole; a prediction that ``mlflow-tg predict`` added to
    it meanwhile would be lost. The run's own lines only grow, so a line of ``current`` that
    is not among them was written by someone else. One prediction's line is kept, the run's
    own when it has one (written at its end, it is the latest).
    """
    lines = own.split(keys.NOTE_BREAK)
    others = [line for line in (current or "").split(keys.NOTE_BREAK) if line and line not in lines]
    if any(line.startswith(keys.NOTE_PREDICTION) for line in lines):
        others = [line for line in others if not line.startswith(keys.NOTE_PREDICTION)]
    return keys.NOTE_BREAK.join([*lines, *others])[:MAX_TAG_LENGTH]


def set_aside(folder: Path) -> None:
    """Clear ``folder`` of an earlier run's spool (a fixed ``hydra.run.dir``, a requeued job).

    Appending to its journal would send this run's writes to that run. A delivered one is
    removed; one the store lacks part of is moved, whole, to ``<folder>.<its run id>`` for
    ``mlflow-tg replay``.
    """
    if not (folder / JOURNAL).exists():
        return
    try:
        header, records, delivered = read_journal(folder)
        earlier = header["run_id"]
    except (OSError, ValueError, KeyError, SpoolError):
        earlier, records, delivered = f"unknown-{time.time_ns()}", [None], 0
    if delivered >= len(records):
        shutil.rmtree(folder)
        return
    kept = folder.with_name(f"{folder.name}.{earlier}")
    if kept.exists():
        kept = folder.with_name(f"{kept.name}-{time.time_ns()}")
    folder.rename(kept)
    log.warning("%s held an earlier run's spool: moved to %s (mlflow-tg replay reads it there)",
                folder, kept)  # fmt: skip


class Spool:
    """The journal of one run and its courier thread (``start`` it, ``close`` it at the end)."""

    def __init__(self, folder: Path, run_id: str, uri: str, heartbeat_s: float = 60.0) -> None:
        self.folder, self.run_id, self.uri = folder, run_id, uri
        self.heartbeat_s = heartbeat_s
        self.client = MlflowClient(uri)
        set_aside(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.journal = open(folder / JOURNAL, "a")  # noqa: SIM115  closed by close()
        self.write({"op": "run", "run_id": run_id, "uri": uri})
        self.seq = 0
        self.pending: deque[dict[str, Any]] = deque()
        self.delivered = 0
        self.cond = threading.Condition()
        self.closing = False
        self.error: BaseException | None = None  # a write the store refused: raised in training
        self.outage_since: float | None = None
        self.last_beat = 0.0
        self.stopping = threading.Event()  # set by close(): no more waiting out an outage
        self.thread = threading.Thread(target=self.courier, name="mlflow_tg-courier", daemon=True)

    # --- the training thread's side --------------------------------------------------------

    def start(self) -> Spool:
        """Start the courier (it sends a first heartbeat at once)."""
        self.thread.start()
        return self

    def write(self, record: dict[str, Any]) -> None:
        """One line of the journal, flushed to the OS (it survives the process being killed)."""
        self.journal.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.journal.flush()

    def append(self, op: str, **fields: Any) -> None:
        """Journal a write and hand it to the courier; raise what the store refused earlier."""
        self.raise_refusal()
        self.seq += 1
        record = {"op": op, "seq": self.seq, "time": int(time.time() * 1000), **fields}
        self.write(record)
        with self.cond:
            self.pending.append(record)
            self.cond.notify_all()

    def add_file(self, source: Path, artifact_dir: str | None) -> None:
        """Journal an artifact: a copy of ``source`` is kept until it is delivered."""
        relative = Path(FILES) / str(self.seq + 1) / source.name
        (self.folder / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, self.folder / relative)
        self.append("artifact", file=str(relative), dir=artifact_dir)

    def raise_refusal(self) -> None:
        """Raise, in training, the error of a write the store refused for good."""
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def drain(self, timeout_s: float, hurry: Hurry | None = None) -> bool:
        """Wait until everything journaled is delivered; False after ``timeout_s`` without.

        Once ``hurry`` says so (a SIGTERM came: a SIGKILL may follow), the wait is cut to its
        seconds, so that the run's end is journaled in time for ``mlflow-tg replay``.
        """
        deadline = time.monotonic() + timeout_s
        with self.cond:
            self.cond.notify_all()
            while self.pending and self.error is None and self.thread.is_alive():
                if hurry is not None and hurry.now():
                    deadline = min(deadline, time.monotonic() + hurry.seconds)
                    hurry = None
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 1.0))
        self.raise_refusal()
        return not self.pending

    def close(self, status: RunStatus, timeout_s: float, hurry: Hurry | None = None) -> bool:
        """Drain (see ``drain``), stop the courier; True when the store has every record.

        Otherwise the run's end is journaled too, for ``mlflow-tg replay`` to deliver. True also
        when the courier delivered the rest while it was being stopped: the run's end, also in
        the journal then, is the caller's to send.
        """
        try:
            delivered = self.drain(timeout_s, hurry)
            if not delivered:  # before the courier is waited for: a SIGKILL may be near
                self.seq += 1
                self.write({"op": "end", "seq": self.seq, "time": int(time.time() * 1000),
                            "status": RunStatus.to_string(status)})  # fmt: skip
        finally:
            with self.cond:
                self.closing = True
                self.cond.notify_all()
            self.stopping.set()
            if self.thread.ident is not None:
                self.thread.join(timeout=5)
            self.journal.close()
        # the courier may have delivered the rest while it was waited for: then only the end,
        # which the caller sends, is missing
        return delivered or (not self.pending and self.error is None)

    # --- the courier -----------------------------------------------------------------------

    def courier(self) -> None:
        """Deliver the journal in order, wait out outages, keep the heartbeat."""
        failures = 0
        while True:
            with self.cond:
                while not self.pending and not self.closing and not self.beat_due():
                    self.cond.wait(max(0.05, self.last_beat + self.heartbeat_s - time.time()))
                if self.closing and (not self.pending or self.outage_since is not None):
                    return
                records = list(self.pending)
            if self.outage_since is not None and not server_answers(self.uri):
                self.stopping.wait(MAX_BACKOFF_S / 4)  # not a whole MLflow retry cycle per try
                continue
            beat = {"op": "tag", "key": keys.HEARTBEAT, "value": now_iso()}
            group = batches(records)[0] if records else [beat]
            try:
                later = records[len(group) :]
                deliver(self.client, self.run_id, group, self.folder, later, heartbeat=True)
            except Exception as error:
                failures += 1
                if self.giving_up(error, failures):
                    return
                continue
            failures = 0
            self.delivered_up_to(group if records else [])

    def beat_due(self) -> bool:
        """Whether the heartbeat should be sent now."""
        return time.time() >= self.last_beat + self.heartbeat_s

    def delivered_up_to(self, group: list[dict[str, Any]]) -> None:
        """Drop the delivered records from the queue and note how far the store has them."""
        self.last_beat = time.time()
        if self.outage_since is not None:
            log.warning("the tracking store answers again after %.0f s; delivering %d records",
                        time.monotonic() - self.outage_since, len(self.pending))  # fmt: skip
            self.outage_since = None
        with self.cond:
            for _ in group:
                self.pending.popleft()
            self.delivered += len(group)
            self.cond.notify_all()
        if group:
            try:
                note_delivered(self.folder, self.delivered)
            except OSError as error:  # a full disk: delivery goes on; a replay may send twice
                log.warning("cannot note the delivered count in %s: %s", self.folder, error)

    def giving_up(self, error: BaseException, failures: int) -> bool:
        """After a failed delivery: wait to retry (True: the store refused it for good)."""
        if not refused(error) and not server_answers(self.uri):
            if self.outage_since is None:
                self.outage_since = time.monotonic()
                log.warning(
                    "the tracking server %s does not answer (%s); training goes on and its "
                    "writes wait in %s until it is back",
                    self.uri, str(error).splitlines()[0][:200], self.folder,
                )  # fmt: skip
            return False
        if refused(error) or failures >= ATTEMPTS:
            log.error("the tracking store refused a write of run %s: %s", self.run_id, error)
            with self.cond:
                self.error = error
                self.cond.notify_all()
            return True
        self.stopping.wait(min(MAX_BACKOFF_S, 0.5 * 2**failures))  # a busy store: back off
        return False


# --- replay ---------------------------------------------------------------------------------


def read_journal(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """A spool folder's header, records, and how many of them the store has."""
    journal = folder / JOURNAL
    if not journal.is_file():
        raise SpoolError(
            f"{str(folder)!r} is not a run's spool folder: it has no {JOURNAL}. A training run "
            "keeps one in its output folder (outputs/<date>/<time>/spool)."
        )
    lines = []
    for number, line in enumerate(journal.read_text().splitlines(keepends=True)):
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            if line.endswith("\n"):  # not the last line, cut by SIGKILL while written
                raise SpoolError(
                    f"{journal} line {number + 1} is not a record: {line[:200]!r}"
                ) from None
            log.warning("%s: its last line was cut while written; it is left out", journal)
    if not lines or lines[0].get("op") != "run":
        raise SpoolError(f"{journal} does not start with its run's header: not a spool journal.")
    return lines[0], lines[1:], read_delivered(folder)


def note_delivered(folder: Path, count: int) -> None:
    """Note how many records the store has: whole, or not at all (a SIGKILL may come)."""
    partial = folder / f"{DELIVERED}.tmp"
    partial.write_text(str(count))
    partial.replace(folder / DELIVERED)


def read_delivered(folder: Path) -> int:
    """How many records the store has, as noted; 0 when unknown (delivering twice is harmless)."""
    try:
        return int((folder / DELIVERED).read_text())
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as error:
        log.warning("%s: delivered count unreadable (%s); delivering from the start", folder, error)
        return 0


def journal_end(folder: Path, status: RunStatus, tags: dict[str, str] | None = None) -> bool:
    """Journal ``tags`` and the run's end, for ``replay`` to deliver.

    False, and nothing journaled, when the journal has an end already.
    """
    _, records, _ = read_journal(folder)
    if records and records[-1]["op"] == "end":
        return False
    now, seq = int(time.time() * 1000), len(records)
    lines = [
        {"op": "tag", "seq": seq + number, "time": now, "key": key, "value": value}
        for number, (key, value) in enumerate((tags or {}).items(), start=1)
    ]
    end = {"op": "end", "seq": seq + len(lines) + 1, "time": now}
    lines.append(end | {"status": RunStatus.to_string(status)})
    with open(folder / JOURNAL, "rb+") as journal:
        text = journal.read()
        last = text[text.rfind(b"\n") + 1 :]
        if last:  # no line break at the end: a last line cut while written goes, a whole one stays
            try:
                json.loads(last)
                journal.write(b"\n")
            except json.JSONDecodeError:
                journal.truncate(len(text) - len(last))
                journal.seek(0, os.SEEK_END)
        for line in lines:
            journal.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
    return True


def replay(folder: Path, uri: str | None = None) -> tuple[str, int]:
    """Deliver what a spool folder's store does not have yet; (run id, records delivered)."""
    header, records, delivered = read_journal(folder)
    uri = uri or header["uri"]
    if (why := store_unreachable(uri)) is not None:
        raise SpoolError(f"{why}: start the server, or give the store the run was logged to "
                         f"with --tracking-uri, then replay {folder} again.")  # fmt: skip
    client = MlflowClient(uri)
    left = records[delivered:]
    done = 0
    for group in batches(left):
        done += len(group)
        try:
            deliver(client, header["run_id"], group, folder, left[done:])
        except MlflowException as error:
            raise SpoolError(
                f"the store {uri} refused record {group[0]['seq']} ({group[0]['op']}) of run "
                f"{header['run_id']}: {error.message[:500]}. {delivered} of the journal's "
                f"{len(records)} records are delivered; replay {folder} again once the store "
                "accepts it."
            ) from None
        delivered += len(group)
        note_delivered(folder, delivered)
    return header["run_id"], len(left)
