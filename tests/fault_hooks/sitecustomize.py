"""Fault injection for the tests, loaded by every Python process of a run whose PYTHONPATH
starts with this folder (the torchrun agent, its ranks, DCP's persist process). Nothing
here is imported by raytitan itself.

    RAYTITAN_SLOW_STAGING_SEC=S       a background staging copy starts as late as the
                                      training lets it: once the training thread waits for
                                      it, or once an optimizer step ran without waiting (the
                                      bug this exposes, however slow a step is); a copy in
                                      the training thread itself sleeps S s first
    RAYTITAN_SLOW_PERSIST=step-N:S    the shard writes of step N sleep S s first
    RAYTITAN_KILL_AT=R:N[:DIR]        rank R SIGKILLs itself as step N starts, in the first
                                      torchrun attempt and warm generation only; DIR
                                      (its node's local storage) is deleted first, as if
                                      the node were lost
    RAYTITAN_STALL_AT=R:N             rank R sleeps 600 s as step N starts (no collective:
                                      it would not notice a dead peer), same attempt and
                                      generation rule as RAYTITAN_KILL_AT
    RAYTITAN_SLOW_STEP_SEC=S          every training step sleeps S s first
    RAYTITAN_HOLD_FILE=PATH           a step does not start while PATH exists
    RAYTITAN_PRINT_STEP_STARTS=1      rank 0 prints "RAYTITAN_STEP_START <step> <time> <run>"
                                      (<run>: torchrun attempt.warm generation, e.g. 0.1)
    RAYTITAN_SAMPLE_LOG=DIR           every rank appends each step's sample ids to
                                      DIR/samples-<pid>.jsonl (also in Ray workers)
"""

import os

if os.environ.get("RAYTITAN_SLOW_STAGING_SEC") or os.environ.get("RAYTITAN_SLOW_PERSIST"):
    import time

    from torch.distributed.checkpoint.staging import DefaultStager

    from raytitan.checkpoint.shards import StepWriter

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

# Step hooks patch TokenStream.next_batch, called once as each step starts (the Trainer
# itself runs as __main__ under `-m raytitan.train`, a copy a patch here would not reach).
_kill = os.environ.get("RAYTITAN_KILL_AT")
_stall = os.environ.get("RAYTITAN_STALL_AT")
_slow_step = float(os.environ.get("RAYTITAN_SLOW_STEP_SEC") or 0)
_sample_log = os.environ.get("RAYTITAN_SAMPLE_LOG")
_hold = os.environ.get("RAYTITAN_HOLD_FILE")
_print_starts = os.environ.get("RAYTITAN_PRINT_STEP_STARTS")
if _kill or _stall or _slow_step or _sample_log or _hold or _print_starts:
    import json
    import shutil
    import signal
    import time

    from raytitan.data.stream import TokenStream

    _next_batch = TokenStream.next_batch
    _steps = [0]
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        _kill = _stall = None  # the restarted attempt runs on undisturbed

    def _hooked_next_batch(self):
        _steps[0] += 1
        # Not in a warm restart's trainer (forked with this module already imported).
        first = "RANK" in os.environ and os.environ.get("RAYTITAN_GENERATION", "0") == "0"
        if _stall and first and _stall.split(":") == [os.environ["RANK"], str(_steps[0])]:
            time.sleep(600)
        if _kill and first:
            rank, step, *lost_dir = _kill.split(":", 2)
            # A fresh run's first attempt: the n-th batch is step n.
            if os.environ["RANK"] == rank and _steps[0] == int(step):
                if lost_dir:
                    shutil.rmtree(lost_dir[0], ignore_errors=True)
                print(f"RAYTITAN_KILLED_AT {time.time():.3f}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        if _slow_step:
            time.sleep(_slow_step)
        for _ in range(3000):
            if not (_hold and os.path.exists(_hold)):
                break
            time.sleep(0.1)
        step = self.samples_consumed // self.global_batch_size + 1
        if _print_starts and os.environ.get("RANK") == "0":
            run = (f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}."
                   f"{os.environ.get('RAYTITAN_GENERATION', '0')}")
            print(f"RAYTITAN_STEP_START {step} {time.time():.3f} {run}", flush=True)
        batch = _next_batch(self)
        if _sample_log:
            with open(os.path.join(_sample_log, f"samples-{os.getpid()}.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "dp_rank": self.dp_rank,
                                    "dp_degree": self.dp_degree,
                                    "ids": batch.sample_ids.tolist()}) + "\n")
        return batch

    TokenStream.next_batch = _hooked_next_batch
