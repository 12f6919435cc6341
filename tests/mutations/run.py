"""Mutation check: every test suite must fail when the feature it tests is broken.

Each mutation below is a deliberate breakage (one exact text replacement in one file). For
each, a temp copy of the repo is made, the breakage applied, the tests named with it run,
and the mutation is CAUGHT when they fail, SURVIVED when they pass. None may survive.
Run on demand (not in CI, it takes ~30 min on 2 cores):

    python -m tests.mutations.run            # all, then a table; exit 1 if any survived
    python -m tests.mutations.run --list
    python -m tests.mutations.run --only staging-wait-removed,tp-not-applied

The list is documented in docs/testing.md; results go there too.
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

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: list[str]


U, D = "tests/unit/", "tests/distributed/"
RESUME = f"{D}test_checkpoint.py::test_resume_is_bitwise_exact"
MUTATIONS = [
    Mutation("resume-loads-nothing", "raytitan/checkpoint/manager.py",
             '        url, step, commit, model_only, others = self._on_rank0(self._choose)\n',
             '        url, step, commit, model_only, others = self._on_rank0(self._choose)\n'
             '        return None\n',
             [f"{U}test_checkpoint.py::test_resume_restores_everything_bitwise", RESUME]),
    Mutation("data-position-not-restored", "raytitan/data/stream.py",
             'self.samples_consumed = int(state["samples_consumed"])',
             'self.samples_consumed = self.samples_consumed',
             [RESUME]),
    Mutation("rng-not-restored", "raytitan/checkpoint/state.py",
             '    if "torch" in state:\n        torch.set_rng_state(state["torch"])',
             '    if False:\n        torch.set_rng_state(state["torch"])',
             [f"{U}test_checkpoint.py::test_resume_restores_everything_bitwise"]),
    Mutation("optimizer-not-restored", "raytitan/checkpoint/loading.py",
             'groups = ["model"] if model_only else ["model", "optimizer", *self.states]',
             'groups = ["model"] if model_only else ["model", *self.states]',
             [RESUME, f"{U}test_checkpoint.py::test_resume_restores_everything_bitwise"]),
    Mutation("tp-not-applied", "raytitan/models/llama3/parallelize.py",
             '        apply_tp(model, mesh["tp"])', '        pass',
             [f"{D}test_placements.py::test_tp_shards_attention_and_mlp"]),
    Mutation("ac-not-applied", "raytitan/models/llama3/parallelize.py",
             '        apply_ac(model, activation_checkpoint.mode)', '        pass',
             [f"{D}test_placements.py::test_activation_checkpointing_wraps_every_block"]),
    Mutation("bf16-not-applied", "raytitan/models/llama3/parallelize.py",
             'param_dtype=getattr(torch, training.mixed_precision_param)',
             'param_dtype=torch.float32',
             [f"{D}test_placements.py::test_bf16_fsdp_forward_runs_in_bf16"]),
    Mutation("compile-not-applied", "raytitan/models/llama3/parallelize.py",
             '        apply_compile(model, clone_embedding_output=parallel_dims.tp_enabled)',
             '        pass',
             [f"{D}test_placements.py::test_compile_wraps_every_block"]),
    Mutation("staging-wait-removed", "raytitan/train.py",
             '            self.checkpointer.wait_for_staging()  # a background copy must not',
             '            pass  # self.checkpointer.wait_for_staging()  # a background copy must not',
             [f"{D}test_faults.py::test_sigkill_of_every_process_mid_persist_loses_nothing"
              "[async_with_pinned_mem]"]),
    Mutation("staging-wait-returns-early", "raytitan/checkpoint/manager.py",
             '        pending = self._pending\n        if pending is not None and (pending.begun',
             '        pending = None\n        if pending is not None and (pending.begun',
             [f"{U}test_reliability.py::test_the_optimizer_waits_for_the_background_copy"]),
    Mutation("save-begun-not-joined-before-optimizer", "raytitan/checkpoint/manager.py",
             "            self._joined(pending)\n            if pending.staging is not None:",
             "            if pending.staging is not None:",
             [f"{U}test_reliability.py::test_the_optimizer_waits_for_the_background_copy"]),
    Mutation("state-dict-survey-every-save", "raytitan/checkpoint/state.py",
             "info = self._infos[(group, index)] = verify(",
             "info = verify(",
             [f"{U}test_checkpoint.py::test_state_dicts_survey_the_model_once_and_follow_replaced_parameters"]),
    Mutation("fast-tier-keeps-non-finite", "raytitan/checkpoint/fast.py",
             'return None, (f"rank {self.rank}: {bad} model tensor(s)',
             'pass; (f"rank {self.rank}: {bad} model tensor(s)',
             [f"{U}test_tiers.py::test_non_finite_weights_are_never_kept_by_the_fast_tier"]),
    Mutation("commit-before-shards", "raytitan/checkpoint/manager.py",
             '            try:\n                dcp.save(state, storage_writer=writer, '
             'planner=planner, process_group=self.pg)',
             '            self._commit(step, model_only, dtype, 0.0)\n            try:\n'
             '                dcp.save(state, storage_writer=writer, planner=planner, '
             'process_group=self.pg)',
             [f"{U}test_checkpoint.py::test_crash_during_save_keeps_previous_step_latest"]),
    Mutation("commit-without-file-check", "raytitan/checkpoint/storage.py",
             '        if problems := self.check_sizes(step, {"files": entries}):',
             '        if problems := []:',
             [f"{U}test_reliability.py::test_commit_checks_every_listed_file_exists"]),
    Mutation("retention-deletes-the-newest", "raytitan/checkpoint/manager.py",
             'for info in in_commit_order(steps, lineage)[:-k]:',
             'for info in in_commit_order(steps, lineage)[k:]:',
             [f"{U}test_checkpoint.py::test_keep_latest_k_deletes_oldest_committed_only"]),
    Mutation("grad-norm-not-reduced-over-shards", "raytitan/parallel/utils.py",
             '                    dist.all_reduce(sq, group=mesh.get_group(dim))',
             '                    pass',
             [f"{D}test_parallelisms.py::test_losses_and_grad_norms_match_single_process"
              "[tp2_sp]"]),
    Mutation("grad-norm-not-reduced-over-pp", "raytitan/parallel/utils.py",
             '        dist.all_reduce(total_sq, group=pp_mesh.get_group())', '        pass',
             [f"{D}test_parallelisms.py::test_gradient_clipping_matches_single_process"
              "[pp2_1f1b]"]),
    Mutation("damaged-step-deleted", "raytitan/checkpoint/selection.py",
             'choice.remove = [s.step for s in steps if s.state == INTERRUPTED and '
             's.lineage == lineage]',
             'choice.remove = [s.step for s in steps if not s.committed]',
             [f"{U}test_reliability.py"]),
    Mutation("foreign-steps-resumed", "raytitan/checkpoint/selection.py",
             '        chosen = latest_full(own, lineage)',
             '        chosen = latest_full([*own, *foreign])',
             [f"{U}test_reliability.py::test_another_runs_step_is_never_resumed_implicitly"]),
    Mutation("lease-never-checked", "raytitan/checkpoint/lease.py",
             '        current = self.read()\n        if self.lost or not current',
             '        return\n        current = self.read()\n        if self.lost or not current',
             [f"{U}test_reliability.py::test_a_run_that_lost_its_lease_stops_saving"]),
    Mutation("second-writer-allowed", "raytitan/checkpoint/lease.py",
             '            if age < float(current.get("timeout", self.timeout)) and not dead:',
             '            if False:',
             [f"{U}test_reliability.py::"
              "test_a_second_live_writer_is_refused_and_a_stale_lease_taken_over"]),
    Mutation("item-crc-not-checked", "raytitan/checkpoint/shards.py",
             '        checked = expected is not None and expected[0] == sinfo.length',
             '        checked = False',
             [f"{U}test_reliability.py::test_a_flipped_byte_fails_the_load_naming_file_and_key"]),
    Mutation("nan-weights-saved", "raytitan/checkpoint/manager.py",
             '        if int(flags[0]):\n            raise CheckpointError(\n'
             '                f"step {step}: the model holds non-finite',
             '        if False:\n            raise CheckpointError(\n'
             '                f"step {step}: the model holds non-finite',
             [f"{U}test_reliability.py::test_non_finite_weights_are_never_saved"]),
    Mutation("orphans-keep-running", "raytitan/train.py",
             '    if "TORCHELASTIC_RUN_ID" in os.environ:\n        _exit_when_orphaned()',
             '    if False:\n        _exit_when_orphaned()',
             [f"{D}test_faults.py::test_second_writer_refused_and_orphaned_ranks_stop"]),
    Mutation("global-batch-not-kept", "raytitan/resume.py",
             '    if cfg.training.global_batch_size == -1 and plan.global_batch_size != saved_batch:',
             '    if False:',
             [f"{U}test_reliability.py::"
              "test_minus_one_global_batch_keeps_the_checkpoints_on_fewer_ranks"]),
    Mutation("process-rng-not-seeded", "raytitan/train.py",
             '        torch.manual_seed(rank_seed)\n', '',
             [f"{D}test_trainer.py::test_two_runs_are_bitwise_identical"]),
    # Issue 10: the fast tier, preemption, retries.
    Mutation("fast-tier-not-loaded", "raytitan/checkpoint/manager.py",
             '        fast = self.fast\n        if self.cfg.load_step >= 0:',
             '        fast = self.fast\n        return None\n        if self.cfg.load_step >= 0:',
             [f"{U}test_tiers.py::test_fast_tier_step_is_resumed_when_newest",
              f"{D}test_recovery.py::test_killed_worker_resumes_from_its_own_node"]),
    Mutation("replicas-not-sent", "raytitan/checkpoint/fast.py",
             '                self._exchange(step, sizes)\n', '                pass\n',
             [f"{D}test_recovery.py::test_lost_node_resumes_from_peer_replicas"]),
    Mutation("replicated-shards-not-broadcast", "raytitan/checkpoint/fast.py",
             '            _broadcast_replicas(request, saved)\n', '            pass\n',
             [f"{D}test_recovery.py::test_lost_node_resumes_from_peer_replicas"]),
    Mutation("foreign-fast-steps-used", "raytitan/checkpoint/fast.py",
             'if marker["lineage"] != self.lineage:', 'if False:',
             [f"{U}test_tiers.py::test_fast_step_of_another_run_or_mesh_is_not_used"]),
    Mutation("in-memory-clones-first", "raytitan/checkpoint/fast.py",
             "_write_raw(self._path(step, self.rank), state)",
             "_write_raw(self._path(step, self.rank), _clone_tensors(state))",
             [f"{U}test_tiers.py::"
              "test_in_memory_step_is_the_tensors_bytes_copied_once_and_taken_only_by_in_memory"]),
    Mutation("in-memory-tensors-misplaced", "raytitan/checkpoint/fast.py",
             "        offset = head + value.offset\n", "        offset = head\n",
             [f"{U}test_tiers.py::test_fast_tier_step_is_resumed_when_newest",
              f"{D}test_recovery.py::test_lost_node_resumes_from_peer_replicas"]),
    Mutation("fast-tier-type-not-checked", "raytitan/checkpoint/fast.py",
             '!= self.cfg.non_persistent_ckpt_type:\n', '== "never":\n',
             [f"{U}test_tiers.py::"
              "test_in_memory_step_is_the_tensors_bytes_copied_once_and_taken_only_by_in_memory"]),
    Mutation("warm-restart-not-forked", "raytitan/restart.py",
             "for gen in range(warm_restarts + 1):", "for gen in range(1):",
             [f"{D}test_recovery.py::test_warm_restart_resumes_in_the_same_torchrun_attempt"]),
    Mutation("warm-restart-peer-left-running", "raytitan/restart.py",
             "            _kill_group(pid)  # its state", "            pass  # its state",
             [f"{D}test_recovery.py::test_warm_restart_resumes_in_the_same_torchrun_attempt"]),
    Mutation("sigterm-ignored", "raytitan/train.py", '        got[0] = 1\n', '',
             [f"{D}test_recovery.py::test_sigterm_saves_a_step_and_the_resumed_run_repeats_none"]),
    Mutation("restart-store-not-prefixed", "raytitan/train.py",
             'if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":', 'if False:',
             [f"{D}test_recovery.py::test_killed_worker_resumes_from_its_own_node"]),
    Mutation("storage-retries-off", "raytitan/checkpoint/retry.py",
             'if not is_transient(e) or elapsed + delay > budget_sec:', 'if True:',
             [f"{U}test_tiers.py::test_transient_errors_are_retried_and_others_are_not",
              "tests/integration/test_s3.py::test_s3_outage_during_saves_is_retried"]),
    Mutation("lease-read-pins-etag", "raytitan/checkpoint/lease.py",
             "return json.loads(self.storage.fs.cat_file(self.path))",
             'return json.loads(self.storage.fs.open(self.path, "rb").read())',
             ["tests/integration/test_s3.py::test_the_lease_reads_while_its_heartbeat_rewrites_it"]),
    # Issue 11: who writes, who reads, plan reuse, S3 I/O.
    Mutation("s3-parts-in-turn", "raytitan/checkpoint/objectstore.py",
             'concurrency = concurrency or getattr(fs, "max_concurrency", 8)', "concurrency = 1",
             ["tests/integration/test_s3.py::test_shard_files_go_up_as_parallel_parts_and_items_come_back_in_few_gets"]),
    Mutation("s3-upload-not-used", "raytitan/checkpoint/shards.py",
             "if is_s3(self.fs):  # parts", "if False:  # parts",
             ["tests/integration/test_s3.py::test_shard_files_go_up_as_parallel_parts_and_items_come_back_in_few_gets"]),
    Mutation("s3-items-read-ahead", "raytitan/checkpoint/shards.py",
             "data = self._ranges.take(self.fs.concat_path(self.path, sinfo.relative_path),\n"
             "                                     sinfo.offset, sinfo.length)",
             "file.seek(sinfo.offset); data = file.read(sinfo.length)",
             ["tests/integration/test_s3.py::test_shard_files_go_up_as_parallel_parts_and_items_come_back_in_few_gets"]),
    Mutation("s3-one-get-per-item", "raytitan/checkpoint/objectstore.py",
             "            if (last is not None and last[0] == path",
             "            if (False and last is not None and last[0] == path",
             ["tests/integration/test_s3.py::"
              "test_shard_files_go_up_as_parallel_parts_and_items_come_back_in_few_gets"]),
    Mutation("torch-zip-crc32-kept", "raytitan/checkpoint/shards.py",
             "        save.compute_crc32 = False", "        pass",
             [f"{U}test_checkpoint.py::test_torchs_zip_crc32_is_off_only_while_our_item_crc32s_are_recorded"]),
    Mutation("torch-zip-crc32-off-without-ours", "raytitan/checkpoint/shards.py",
             "with _zip_crc32_off(self.fs.with_crc):", "with _zip_crc32_off(True):",
             [f"{U}test_checkpoint.py::test_torchs_zip_crc32_is_off_only_while_our_item_crc32s_are_recorded"]),
    Mutation("s3-upload-not-aborted", "raytitan/checkpoint/objectstore.py",
             'self._call("abort_multipart_upload", UploadId=self._upload_id)', "pass",
             ["tests/integration/test_s3.py::test_a_failed_upload_leaves_no_object_and_no_pending_parts"]),
    Mutation("save-not-balanced", "raytitan/checkpoint/planning.py",
             "dedup_save_to_lowest_rank=not balanced", "dedup_save_to_lowest_rank=True",
             [f"{D}test_checkpoint.py::test_fully_parallel_save_balances_replicas_and_writes_the_same_state"]),
    Mutation("save-always-balanced", "raytitan/checkpoint/planning.py",
             "dedup_save_to_lowest_rank=not balanced", "dedup_save_to_lowest_rank=False",
             [f"{D}test_checkpoint.py::test_fully_parallel_save_balances_replicas_and_writes_the_same_state"]),
    Mutation("every-replica-reads", "raytitan/checkpoint/planning.py",
             "            skip.add(fqn)", "            pass",
             [f"{D}test_checkpoint.py::test_fully_parallel_load_reads_each_replica_once_and_resumes_bitwise"]),
    Mutation("replicas-not-broadcast", "raytitan/checkpoint/loading.py",
             "            broadcast_replicas(shares)", "            pass",
             [f"{D}test_checkpoint.py::test_fully_parallel_load_reads_each_replica_once_and_resumes_bitwise"]),
    Mutation("plans-never-cached", "raytitan/checkpoint/planning.py",
             "enable_plan_caching=cache_kind is not None", "enable_plan_caching=False",
             [f"{U}test_checkpoint.py::test_cached_save_plans_write_identical_files_and_replan_on_a_new_structure"]),
    Mutation("one-plan-cache-for-every-kind", "raytitan/checkpoint/planning.py",
             'f"raytitan:{cache_kind}"', '"raytitan:full-float32"',
             [f"{U}test_checkpoint.py::test_cached_save_plans_write_identical_files_and_replan_on_a_new_structure"]),
    Mutation("resume-reinitializes-weights", "raytitan/train.py",
             'if loaded is not None and "model" in loaded.keys:', "if False:",
             [f"{U}test_resume_init.py::test_a_resume_initializes_no_weight_and_loads_them_all"]),
    Mutation("partial-load-initializes-nothing", "raytitan/train.py",
             'if key.startswith("model.")}', "if False}",
             [f"{U}test_resume_init.py::test_only_what_the_load_left_out_is_initialized"]),
    Mutation("adam-state-by-dummy-step", "raytitan/checkpoint/state.py",
             "            init_adam_state(optimizer)\n", "            pass\n",
             [f"{U}test_resume_init.py::test_a_resume_initializes_no_weight_and_loads_them_all"]),
    Mutation("fast-fill-not-strict", "raytitan/checkpoint/fast.py",
             "    if absent:\n", "    if False:\n",
             [f"{U}test_resume_init.py::test_a_fast_tier_file_lacking_a_tensor_fails_the_load"]),
    Mutation("fast-staging-not-waited", "raytitan/checkpoint/manager.py",
             "            self.fast.wait_for_staging()\n", "            pass\n",
             [f"{U}test_tiers.py::test_the_optimizer_waits_for_the_fast_tier_copy"]),
]


def copy_repo(dest: Path) -> None:
    """The tracked and untracked-but-not-ignored files, as in the working tree."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_one(mutation: Mutation, timeout: float) -> tuple[str, float, str]:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name}-") as tmp:
        repo = Path(tmp)
        copy_repo(repo)
        target = repo / mutation.path
        text = target.read_text()
        if text.count(mutation.old) != 1:
            return "ANCHOR NOT FOUND", 0.0, f"{mutation.path}: {mutation.old!r}"
        target.write_text(text.replace(mutation.old, mutation.new))
        # The copy's raytitan must win over the installed (editable) one, in the tests and
        # in every process they start (torchrun runs `-m raytitan.train` from the copy).
        env = {**os.environ, "PYTHONPATH": str(repo)}
        env.pop("PYTEST_ADDOPTS", None)
        start = time.time()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                 *mutation.tests], cwd=repo, env=env, capture_output=True, text=True,
                timeout=timeout)
        except subprocess.TimeoutExpired:
            return "CAUGHT (timeout)", time.time() - start, ""
        seconds = time.time() - start
        tail = proc.stdout.strip().splitlines()[-1:] or [""]
        if proc.returncode == 0:
            return "SURVIVED", seconds, tail[0]
        if proc.returncode in (4, 5):  # usage error / no tests collected: a broken entry
            return "BROKEN ENTRY", seconds, proc.stdout[-500:]
        lines = proc.stdout.splitlines()
        failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
        why = [line[1:].strip() for line in lines if line.startswith("E ")]
        return "CAUGHT", seconds, " | ".join(
            [(failed[0] if failed else tail[0])[:120], *(why[:1] and [why[0][:160]])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated mutation names")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only.split(",")]
    if args.list:
        for m in chosen:
            print(f"{m.name:36} {m.path}  ->  {', '.join(m.tests)}")
        return
    rows = []
    for m in chosen:
        outcome, seconds, detail = run_one(m, args.timeout)
        rows.append((m.name, outcome, seconds, detail))
        print(f"{m.name:36} {outcome:17} {seconds:6.0f} s  {detail}", flush=True)
    survivors = [r for r in rows if not r[1].startswith("CAUGHT")]
    print(f"\n{len(rows) - len(survivors)} of {len(rows)} mutations caught"
          + (f"; NOT caught: {[r[0] for r in survivors]}" if survivors else ""))
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
