"""The torchrun harness accepts only the known exit-time abort after a finished run."""

from tests.conftest import _aborted_after_finishing

DONE = "[rank0] 13:04:09 step     10  loss 6.4\n[rank0] 13:04:09 done: raytitan at step 10\n"
ABORT = "terminate called without an active exception\n"
TORCHRUN = ("Traceback (most recent call last):\n  File \"run.py\"\n"
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
            "  exitcode  : {code} (pid: 1)\n  traceback : Signal 6 (SIGABRT)\n")


def test_accepts_a_sigabrt_at_exit_after_done():
    assert _aborted_after_finishing(DONE, ABORT + TORCHRUN.format(code=-6))


def test_rejects_everything_else():
    worker_error = "Traceback (most recent call last):\n  ValueError: boom\n"
    assert not _aborted_after_finishing("[rank0] 13:04 step 3\n", ABORT + TORCHRUN.format(code=-6))
    assert not _aborted_after_finishing(DONE, TORCHRUN.format(code=1))
    assert not _aborted_after_finishing(DONE, ABORT + TORCHRUN.format(code=-6)
                                        + TORCHRUN.format(code=1))
    assert not _aborted_after_finishing(DONE, worker_error + ABORT + TORCHRUN.format(code=-6))


def test_every_mutation_anchor_is_in_its_file_once():
    """A mutation whose text no longer matches would break nothing (tests/mutations)."""
    from tests.mutations.run import MUTATIONS, ROOT

    stale = [m.name for m in MUTATIONS if (ROOT / m.path).read_text().count(m.old) != 1]
    assert stale == []
