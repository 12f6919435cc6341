"""Fault injection for the tests, loaded by every Python process of a run whose PYTHONPATH
starts with this folder (the torchrun agent, its ranks, DCP's persist process). Nothing
here is imported by raytitan itself.

    RAYTITAN_SLOW_STAGING_SEC=S       a background staging copy starts as late as the
                                      training lets it: once the training thread waits for
                                      it, or once an optimizer step ran without waiting (the
                                      bug this exposes, however slow a step is); a copy in
                                      the training thread itself sleeps S s first
    RAYTITAN_SLOW_PERSIST=step-N:S    the shard writes of step N sleep S s first
"""

import os

if os.environ.get("RAYTITAN_SLOW_STAGING_SEC") or os.environ.get("RAYTITAN_SLOW_PERSIST"):
    import time

    from torch.distributed.checkpoint.staging import DefaultStager

    from raytitan.checkpoint.storage import StepWriter

    if delay := float(os.environ.get("RAYTITAN_SLOW_STAGING_SEC") or 0):
        import threading

        from torch.optim.optimizer import register_optimizer_step_post_hook

        from raytitan.checkpoint.manager import CheckpointManager

        _go = threading.Event()  # the training thread can go no further without the copy
        register_optimizer_step_post_hook(lambda *args: _go.set())

        def _waits(method, only_if_waiting=False):
            def wrapper(self, *args, **kwargs):
                if not only_if_waiting or kwargs.get("wait"):
                    _go.set()
                return method(self, *args, **kwargs)
            return wrapper

        CheckpointManager.wait_for_staging = _waits(CheckpointManager.wait_for_staging)
        CheckpointManager.poll = _waits(CheckpointManager.poll, only_if_waiting=True)
        _stage_sync, _stage = DefaultStager.stage, DefaultStager._stage

        def _stage_later(self, state_dict, **kwargs):
            _go.clear()  # in the training thread, before the copy is handed to a thread
            return _stage_sync(self, state_dict, **kwargs)

        def _slow_stage(self, state_dict, **kwargs):
            if threading.current_thread() is threading.main_thread():
                time.sleep(delay)
            else:
                _go.wait(timeout=120)
            return _stage(self, state_dict, **kwargs)

        DefaultStager.stage, DefaultStager._stage = _stage_later, _slow_stage

    if slow := os.environ.get("RAYTITAN_SLOW_PERSIST"):
        step_dir, seconds = slow.split(":")
        _write_data = StepWriter.write_data

        def _slow_write_data(self, plan, planner):
            if str(self.path).rstrip("/").endswith(step_dir):
                time.sleep(float(seconds))
            return _write_data(self, plan, planner)

        StepWriter.write_data = _slow_write_data
