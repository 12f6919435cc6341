"""Warm restarts under torchrun (`training.warm_restarts`): a failed rank is back in
training in about a second instead of a full torchrun restart (docs/checkpointing.md
"Warm restarts").

The process torchrun starts for a rank becomes its keeper: it has imported torch and
raytitan once, and forks the trainer from itself. When a trainer dies (a crash, a SIGKILL,
a lost peer), its keeper tells the others through torchrun's store, every keeper ends its
own trainer and forks a new one, and the new trainers meet in a new process group (a
generation of their own in the store) and resume like any restart: from the fast tier,
else the persistent tier. What a full restart spends on starting Python, importing and
torchrun's restart round is not spent. After `warm_restarts` of them, or if the keeper
itself dies, torchrun's own restarts (`--max-restarts`) take over.

    RAYTITAN_GENERATION   the trainer's generation (0, 1, ...), set in each fork
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable

import torch.distributed as dist

from raytitan.metrics import init_logging

logger = logging.getLogger("raytitan")

GENERATION_ENV = "RAYTITAN_GENERATION"
_POLL_SEC = 0.02


def generation() -> int:
    return int(os.environ.get(GENERATION_ENV, "0"))


def _attempt() -> str:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")


def store_prefix() -> str:
    """The trainer's key prefix in torchrun's store: one per torchrun attempt and
    generation (the store outlives both; reused keys would name a dead rank's address)."""
    return f"attempt-{_attempt()}" + (f"-gen-{generation()}" if generation() else "")


def _exit_code(run: Callable[[], None]) -> int:
    """Run the trainer as `python -m` would, and return its exit code."""
    try:
        run()
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


def keep(run: Callable[[], None], warm_restarts: int, on_done: list[Callable[[], None]]
         ) -> int:
    """Run `run` in forked trainers, restarting them warm up to `warm_restarts` times;
    returns the exit code for torchrun. `on_done` gets a callback the trainer calls once
    every rank has finished (then a failure while exiting is not restarted)."""
    rank = int(os.environ["RANK"])
    init_logging(rank)
    store = dist.PrefixStore(
        f"raytitan-warm/attempt-{_attempt()}",
        dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                      is_master=False))
    signalled: list[int] = []
    child = [0]

    def forward(signum, frame) -> None:  # torchrun stopping the run: not a failure
        signalled.append(signum)
        if child[0]:
            _kill_group(child[0], signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    os.environ["RAYTITAN_TORCHRUN_AGENT"] = str(os.getppid())  # the lease's holder
    code = 1
    for gen in range(warm_restarts + 1):
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            # A process group of its own: torchrun signals the keeper's, the keeper this one
            # (the trainer and what it started, e.g. DCP's persist process) exactly once.
            os.setpgid(0, 0)
            os.close(done_r)
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_DFL)
            os.environ[GENERATION_ENV] = str(gen)
            on_done.append(functools.partial(os.write, done_w, b"1"))
            code = _exit_code(run)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        os.close(done_w)
        os.setpgid(pid, pid)  # also here: a signal may come before the child has run
        child[0] = pid
        started = time.monotonic()
        code, peer = _wait(pid, store, gen)
        child[0] = 0
        _kill_group(pid)  # what the trainer left running
        finished = os.read(done_r, 1) == b"1"
        os.close(done_r)
        if code == 0 or signalled:
            return code
        if finished:
            logger.warning("rank %d: the trainer failed (exit %d) after every rank had "
                           "finished: the run is done", rank, code)
            return 0
        store.set(f"failed/{gen}", str(rank))
        cause = (f"rank {peer}'s trainer failed" if peer is not None
                 else f"its trainer exited with {code}")
        if gen == warm_restarts:
            logger.error("rank %d: %s; no warm restart left (training.warm_restarts = %d): "
                         "leaving it to torchrun", rank, cause, warm_restarts)
            return code
        logger.warning("rank %d: %s after %.1f s: warm restart %d of %d", rank, cause,
                       time.monotonic() - started, gen + 1, warm_restarts)
    return code


def _wait(pid: int, store: dist.Store, gen: int) -> tuple[int, int | None]:
    """Wait for the trainer to end, or for another rank's to fail (then end this one):
    (exit code, the failed peer or None)."""
    key = f"failed/{gen}"
    peer = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), peer
        if peer is None and store.check([key]):
            peer = int(store.get(key))
            _kill_group(pid)  # its state is stale now; the new one resumes
        time.sleep(_POLL_SEC)


def _kill_group(pgid: int, signum: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
