"""How fast does a run recover from a lost worker or node, per checkpoint tier?

Runs of the real Trainer under torchrun (2 gloo ranks on CPU, the two ranks on two fake
nodes, `torchrun --max-restarts 1`), each with persistent saves every --interval steps
(async) and, but for "persistent", fast-tier saves every --fast-interval steps (async):

  persistent    no fast tier: recovery reads the newest persistent step
  local         node-local fast tier (/dev/shm, torch.save files): each rank reads its own
  in_memory     the same, raw tensor bytes in a shared-memory file, mapped on recovery
  replica       in_memory with replication; the killed rank's node folder is deleted with
                it, so its state comes from its replica on the other node
  persistent on s3
                as "persistent", the steps in s3:// on an S3-compatible server started
                here (moto_server on 127.0.0.1), where production runs keep them

Each runs with a cold restart (torchrun restarts the processes) and, marked "warm", with
`training.warm_restarts = 1` (the ranks' keepers fork new trainers: no process start, no
imports, no torchrun restart round). Rank 1 is SIGKILLed as step --kill-at starts
(tests/fault_hooks). Reported: the training stall per save (median of the "training
blocked" figures), the load time of the recovery, the time from the kill until the
restarted run starts its first step (restart, imports, model build, load), until it starts
the killed step again (the same plus the steps redone), and the steps redone.
The model is the debug Llama with a --vocab-size vocabulary, so that the state (weights +
AdamW moments, fp32) is a few hundred MB.

    python benchmarks/recovery.py --write-docs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ROOT / "tests" / "fault_hooks"


def dataset(work: Path) -> str:
    """The tests' corpus (Python's language reference), prepared once."""
    from pydoc_data.topics import topics

    from raytitan.data.prepare import prepare_local

    out = work / "data"
    if not (out / "manifest.json").exists():
        work.mkdir(parents=True, exist_ok=True)
        corpus = work / "corpus.jsonl"
        with open(corpus, "w") as f:
            for key in sorted(topics):
                f.write(json.dumps({"text": topics[key]}) + "\n")
        prepare_local(str(corpus), str(out), vocab_size=512, shard_tokens=16384)
    return str(out)


def run(name: str, a, data: str, work: Path, fast: dict[str, str], lose_node: bool,
        warm: bool) -> dict:
    """One torchrun run with rank 1 killed as step --kill-at starts; its figures."""
    name += " (warm)" if warm else ""
    slug = name.replace(" ", "-").replace("(", "").replace(")", "")
    dump = work / slug
    shutil.rmtree(dump, ignore_errors=True)
    local = Path(f"/dev/shm/raytitan-bench-{os.getpid()}") / slug
    shutil.rmtree(local, ignore_errors=True)
    overrides = {
        "model.flavor": "debug", "model.vocab_size": str(a.vocab_size),
        "training.steps": str(a.steps), "training.seq_len": "64",
        "training.local_batch_size": "2", "training.global_batch_size": "8",
        "training.mixed_precision_param": "float32", "metrics.log_freq": "1",
        "data.path": data, "job.dump_folder": str(dump), "checkpoint.enable": "true",
        "checkpoint.interval": str(a.interval), "checkpoint.async_mode": "async",
        "checkpoint.non_persistent_local_ckpt_dir": str(local),
        "training.warm_restarts": "1" if warm else "0", **fast}
    kill = f"1:{a.kill_at}"
    if lose_node:
        kill += f":{local}/{os.uname().nodename}-fake1"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HOOKS}:{ROOT}",
           "RAYTITAN_FAKE_RANKS_PER_NODE": "1", "RAYTITAN_KILL_AT": kill,
           "RAYTITAN_PRINT_STEP_STARTS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--max-restarts=1", "--master-addr=127.0.0.1", "--master-port=29633",
           "-m", "raytitan.train"]
    for key, value in overrides.items():
        cmd += [f"--{key}", value]
    if a.from_logs:
        log = (work / f"{slug}.log").read_text()
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        log = proc.stdout + proc.stderr
        (work / f"{slug}.log").write_text(log)
        shutil.rmtree(local, ignore_errors=True)
        if proc.returncode != 0 or "done:" not in log:
            raise SystemExit(f"{name}: torchrun failed ({proc.returncode}); see "
                             f"{work}/{slug}.log")
    killed = float(re.search(r"RAYTITAN_KILLED_AT (\d+\.\d{3})", log).group(1))
    starts = re.findall(r"RAYTITAN_STEP_START (\d+) (\d+\.\d{3}) (\d+\.\d+)", log)
    after = [(int(step), float(t)) for step, t, attempt in starts if attempt != "0.0"]
    resumed = after[0][0] - 1
    again = next(t for step, t in after if step == a.kill_at)
    persistent_stalls = [float(x) for step, x in re.findall(  # the final save is synchronous
        r"committed \S+/step-(\d+) .*training blocked ([\d.]+) s", log) if int(step) != a.steps]
    fast_stalls = [float(x) for x in re.findall(r"fast tier holds step \d+ .*training "
                                                r"blocked ([\d.]+) s", log)]
    load = re.search(r"resumed from the FAST TIER, step \d+ of \S+ in ([\d.]+) s", log) or \
        re.search(r"checkpoint: loaded \[.*\] of \S+ in ([\d.]+) s", log)
    state = re.search(r"committed \S+ \(([\d.]+) MB\)", log)
    return {
        "name": name,
        "persistent_stall_s": statistics.median(persistent_stalls),
        "fast_stall_s": statistics.median(fast_stalls) if fast_stalls else None,
        "load_s": float(load.group(1)), "kill_to_step_s": after[0][1] - killed,
        "kill_to_again_s": again - killed,
        "steps_redone": a.kill_at - 1 - resumed, "resumed_from": resumed,
        "state_mb": float(state.group(1)),
        "from": "peer replica" if "from peer replicas" in log else
                "own node" if "every rank from its own node" in log else "persistent"}


def persistent_on_s3(a, data: str, work: Path) -> list[dict]:
    """The persistent-only run, cold and warm, with its steps in s3:// on moto_server."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import moto_s3

    with moto_s3(work / "moto.log", "raytitan-bench") as url:
        return [run("persistent on s3", a, data, work,
                    {"checkpoint.folder": f"{url}/{'warm' if warm else 'cold'}"}, False, warm)
                for warm in (False, True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--interval", type=int, default=5, help="persistent save interval")
    p.add_argument("--fast-interval", type=int, default=2)
    p.add_argument("--kill-at", type=int, default=10)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--dir", default="/tmp/raytitan-bench/recovery")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--from-logs", action="store_true",
                   help="read the figures from the logs of the last run in --dir, run nothing")
    a = p.parse_args()
    work = Path(a.dir)
    data = dataset(work)
    fast = {"checkpoint.non_persistent_save_interval": str(a.fast_interval)}
    memory = {**fast, "checkpoint.non_persistent_ckpt_type": "in_memory"}
    replica = {**memory, "checkpoint.replication": "true"}
    kinds = [("persistent", {}, False), ("local", fast, False), ("in_memory", memory, False),
             ("replica", replica, True)]
    rows = [run(name, a, data, work, over, lose, warm)
            for warm in (False, True) for name, over, lose in kinds if not warm or name != "local"]
    rows += persistent_on_s3(a, data, work)
    by = {r["name"]: r for r in rows}
    fast_rows = [r for r in rows if r["fast_stall_s"] is not None]
    cold_fast, warm_fast = ("local", "in_memory", "replica"), ("in_memory (warm)", "replica (warm)")

    def third(fast_runs: tuple[str, ...], persistent_run: str, key: str) -> bool:
        """The slowest of `fast_runs` takes <= 1/3 of `persistent_run` by `key`."""
        return max(by[n][key] for n in fast_runs) <= by[persistent_run][key] / 3

    step, again = "kill_to_step_s", "kill_to_again_s"
    goals = {
        "fast-tier stall <= async persistent stall": (
            max(r["fast_stall_s"] for r in fast_rows)
            <= min(r["persistent_stall_s"] for r in rows)),
        "fast-tier recovery (kill to next step) <= 1/3 of persistent, both cold restarts":
            third(cold_fast, "persistent", step),
        "fast tier with warm restarts <= 1/3 of persistent with cold restarts (the default)":
            third(warm_fast, "persistent", step),
        "fast tier <= 1/3 of persistent, both warm restarts":
            third(warm_fast, "persistent (warm)", step),
        "back at the killed step (kill to killed step again): fast tier <= 1/3 of "
        "persistent, both cold restarts": third(cold_fast, "persistent", again),
        "back at the killed step: fast tier <= 1/3 of persistent, both warm restarts":
            third(warm_fast, "persistent (warm)", again),
        "fast tier <= 1/3 of persistent on s3, both cold restarts":
            third(cold_fast, "persistent on s3", step),
        "fast tier <= 1/3 of persistent on s3, both warm restarts":
            third(warm_fast, "persistent on s3 (warm)", step),
        "back at the killed step: fast tier <= 1/3 of persistent on s3, both warm restarts":
            third(warm_fast, "persistent on s3 (warm)", again),
        f"steps redone <= non_persistent_save_interval ({a.fast_interval})": (
            max(r["steps_redone"] for r in fast_rows) <= a.fast_interval),
    }
    table = ["| run | recovered from | stall per save (s) | load (s) | kill to next step (s) | "
             "kill to killed step again (s) | steps redone | resumed from step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        stall = r["fast_stall_s"] if r["fast_stall_s"] is not None else r["persistent_stall_s"]
        table.append(f"| {r['name']} | {r['from']} | {stall:.3f} | {r['load_s']:.2f} | "
                     f"{r['kill_to_step_s']:.1f} | {r['kill_to_again_s']:.1f} | "
                     f"{r['steps_redone']} | {r['resumed_from']} |")
    persistent = by["persistent"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from train_overhead import cpu_name, write_section

    cpu = cpu_name()

    machine = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}; persistent "
               f"folder on local disk ({a.dir}), or (\"on s3\") s3:// on moto_server on "
               "127.0.0.1 (in memory, one Python process on the same 2 cores); fast tier in "
               "/dev/shm")
    setup = (f"State {persistent['state_mb']:.0f} MB (debug Llama, vocab {a.vocab_size}, "
             f"weights + AdamW, fp32) over 2 ranks on 2 fake nodes; {a.steps} steps, "
             f"persistent every {a.interval} (async), fast tier every {a.fast_interval} "
             f"(async); rank 1 SIGKILLed as step {a.kill_at} starts; persistent stall "
             f"{persistent['persistent_stall_s']:.3f} s.")
    lines = [f"- {k}: **{'met' if ok else 'NOT met'}**" for k, ok in goals.items()]
    print(f"Machine: {machine}\n{setup}\n\n" + "\n".join(table + [""] + lines))
    if a.write_docs:
        write_section("\n".join([
            "## Recovery from a lost worker or node (`benchmarks/recovery.py`)", "",
            f"Machine: {machine}. {setup} Kill to next step = from the SIGKILL until the "
            "restarted run starts its first step (restart, imports, model build, load); "
            "with cold restarts it is dominated by process start-up on this 2-core VM, "
            "which warm restarts (`training.warm_restarts`) skip. Kill to killed step "
            "again adds the steps redone.", "",
            *table, "", *lines, "", "Command: `python benchmarks/recovery.py --write-docs`",
            ""]), "recovery")


if __name__ == "__main__":
    main()
