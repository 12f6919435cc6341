"""One writer per checkpoint folder: a lease (<root>/LEASE.json) and the folder's run id.

A run takes the lease before it writes or deletes anything in its folder, renews it from a
background thread (a heartbeat), checks it before every commit, and releases it at the end.
A second run finds a live lease held by someone else and stops before it touches anything,
with an error naming the holder. A lease whose heartbeat is older than `timeout` seconds, or
whose holder process is gone from this host, is stale and may be taken over (with a warning).

Who counts as "the same holder" (a restart that may take over at once):
    Ray:      $RAYTITAN_RUN_ID, set by the launcher once per `raytitan train` (worker-group
              restarts keep it, a second launch gets a new one);
    torchrun: the host and the agent's pid (its --max-restarts keep it);
    else:     the host and this process.

Local disk and object stores alike: a whole-file write (atomic rename / one PUT). Two runs
starting within the same instant can both see no lease; the later writer wins and the other
stops at its first commit (the check before every commit).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime

from raytitan.checkpoint.storage import CheckpointError, CheckpointStorage, write_bytes

logger = logging.getLogger("raytitan")

LEASE_FILE = "LEASE.json"


def holder_id() -> str:
    """Who this process writes for (see the module docstring)."""
    if run_id := os.environ.get("RAYTITAN_RUN_ID"):
        return f"ray:{run_id}"
    host = socket.gethostname()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # The agent: it outlives restarts of its ranks (a warm restart's keeper names it).
        agent = os.environ.get("RAYTITAN_TORCHRUN_AGENT") or os.getppid()
        return f"torchrun:{host}:{agent}"
    return f"process:{host}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLease:
    """The lease on one checkpoint folder, held by rank 0 of a run.

    Args:
        storage: the run's checkpoint folder.
        job: the job name, for messages.
        timeout: seconds without a heartbeat after which the lease is stale.
        holder: who holds it (holder_id() by default).
    """

    def __init__(self, storage: CheckpointStorage, *, job: str, timeout: float,
                 holder: str | None = None) -> None:
        self.storage = storage
        self.job = job
        self.timeout = timeout
        self.holder = holder or holder_id()
        self.path = f"{storage.root}/{LEASE_FILE}"
        self.lost: str = ""
        """Set when another run took the lease (the heartbeat saw it)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._acquired = ""

    def read(self) -> dict | None:
        # One GET (cat_file), not open() + read(): s3fs's open() pins the ETag it saw and its
        # read fails with FileExpired when the heartbeat rewrote the lease in between.
        try:
            return json.loads(self.storage.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"holder": "?", "unreadable": True}

    def _write(self, released: bool = False) -> None:
        now = time.time()
        lease = {"holder": self.holder, "job": self.job, "host": socket.gethostname(),
                 "pid": os.getpid(), "acquired": self._acquired, "heartbeat": now,
                 "heartbeat_utc": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
                 "timeout": self.timeout, "released": released}
        write_bytes(self.storage.fs, self.path, json.dumps(lease, indent=1).encode())

    def describe(self, lease: dict) -> str:
        age = time.time() - float(lease.get("heartbeat", 0))
        return (f"run {lease.get('holder')} (job {lease.get('job')}, host {lease.get('host')}, "
                f"pid {lease.get('pid')}, last heartbeat {age:.0f} s ago)")

    def acquire(self) -> None:
        """Take the lease, or raise CheckpointError naming the run that holds it."""
        current = self.read()
        if current and not current.get("released") and current.get("holder") != self.holder:
            age = time.time() - float(current.get("heartbeat", 0))
            same_host = current.get("host") == socket.gethostname()
            dead = same_host and not _pid_alive(int(current.get("pid", 0)))
            if age < float(current.get("timeout", self.timeout)) and not dead:
                raise CheckpointError(
                    f"checkpoint folder {self.storage.url} is in use by {self.describe(current)}"
                    ". Two runs must not write one folder: stop the other run, or give this "
                    "one another job.name or checkpoint.folder. A dead run's lease expires "
                    f"{current.get('timeout', self.timeout)} s after its last heartbeat "
                    "(checkpoint.lease_timeout)")
            logger.warning("checkpoint: taking over the stale lease of %s on %s (%s)",
                           self.describe(current), self.storage.url,
                           "its process is gone" if dead else "no heartbeat")
        self._acquired = datetime.now(UTC).isoformat(timespec="seconds")
        self._write()
        self._thread = threading.Thread(target=self._heartbeat, name="raytitan-lease",
                                        daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.timeout / 4):
            try:
                current = self.read()
                if current is None:  # deleted (with the folder?): the next check() says so
                    return
                if current.get("holder") != self.holder:
                    self.lost = self.describe(current)
                    logger.error("checkpoint: %s took the lease on %s: this run stops saving",
                                 self.lost, self.storage.url)
                    return
                self._write()
            except FileNotFoundError:  # the folder went away under us: check() says so
                return
            except Exception as e:  # a storage hiccup: try again at the next beat
                logger.warning("checkpoint: lease heartbeat on %s failed: %s: %s",
                               self.storage.url, type(e).__name__, e)

    def check(self) -> None:
        """Raise unless this run still holds the lease (called before every commit)."""
        current = self.read()
        if self.lost or not current or current.get("holder") != self.holder:
            who = self.lost or (self.describe(current) if current else "nobody (deleted)")
            raise CheckpointError(
                f"this run lost the lease on {self.storage.url} to {who}: another run writes "
                "this folder now, so this run stops saving (nothing of the other run was "
                "touched)")

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        current = self.read()
        if current and current.get("holder") == self.holder and not self.lost:
            self._write(released=True)


def folder_lineage(storage: CheckpointStorage) -> tuple[str, bool]:
    """The folder's run id from RUN.json, creating it in a new folder. Returns (lineage,
    created). Steps committed before run ids existed count as this lineage's own."""
    run = storage.read_run()
    if run is not None:
        return run["lineage"], False
    lineage = uuid.uuid4().hex[:16]
    storage.write_run({"lineage": lineage,
                       "created": datetime.now(UTC).isoformat(timespec="seconds")})
    return lineage, True
