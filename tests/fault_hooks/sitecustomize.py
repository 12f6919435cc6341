"""Fault injection for the tests, loaded by every Python process of a run whose PYTHONPATH
starts with this folder (the torchrun agent, its ranks, DCP's persist process). Nothing
here is imported by raytitan itself.

    RAYTITAN_SLOW_STAGING_SEC=S       each background staging copy sleeps S s first
    RAYTITAN_SLOW_PERSIST=step-N:S    the shard writes of step N sleep S s first
"""

import os

if os.environ.get("RAYTITAN_SLOW_STAGING_SEC") or os.environ.get("RAYTITAN_SLOW_PERSIST"):
    import time

    from torch.distributed.checkpoint.staging import DefaultStager

    from raytitan.checkpoint.storage import StepWriter

    if delay := float(os.environ.get("RAYTITAN_SLOW_STAGING_SEC") or 0):
        _stage = DefaultStager._stage

        def _slow_stage(self, state_dict, **kwargs):
            time.sleep(delay)
            return _stage(self, state_dict, **kwargs)

        DefaultStager._stage = _slow_stage

    if slow := os.environ.get("RAYTITAN_SLOW_PERSIST"):
        step_dir, seconds = slow.split(":")
        _write_data = StepWriter.write_data

        def _slow_write_data(self, plan, planner):
            if str(self.path).rstrip("/").endswith(step_dir):
                time.sleep(float(seconds))
            return _write_data(self, plan, planner)

        StepWriter.write_data = _slow_write_data
