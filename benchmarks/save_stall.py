"""What does an async save cost the training steps of the debug job?

The debug job (jobs/debug.toml: debug Llama, FSDP2 over 2 gloo ranks on CPU) under torchrun,
logging every step, with a persistent async save every --interval steps, once per async
mode. From the run's own figures:

  stall         the "training blocked" time of each save (the copy the optimizer waits for
                and the work in save()), against the median step time of the steps that
                neither follow a save nor overlap a persist;
  persist       the step times of the steps that overlap a background persist (from the
                step after the save until the save's duration has passed), against the same
                median.

The first save is left out (it starts the writer thread or process and allocates the
staging buffers). Goals (issue 11): stall <= 1% of a step; overlapped steps <= 5% slower.

    python benchmarks/save_stall.py --write-docs
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
MODES = ("async", "async_with_pinned_mem")


def run(mode: str, a, work: Path) -> dict:
    dump = work / mode
    shutil.rmtree(dump, ignore_errors=True)
    overrides = {"training.steps": str(a.steps), "metrics.log_freq": "1",
                 "checkpoint.interval": str(a.interval), "checkpoint.async_mode": mode,
                 "checkpoint.keep_latest_k": "2", "job.dump_folder": str(dump)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", "--master-port=29641", "-m", "raytitan.train",
           "--config", "jobs/debug.toml"]
    for key, value in overrides.items():
        cmd += [f"--{key}", value]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = proc.stdout + proc.stderr
    (work / f"{mode}.log").write_text(log)
    if proc.returncode != 0 or "done:" not in log:
        raise SystemExit(f"{mode}: torchrun failed ({proc.returncode}); see {work}/{mode}.log")
    times = {}
    with open(dump / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            times[row["step"]] = row["step_time_sec"]
    saves = [(int(step), float(total), float(blocked)) for step, total, blocked in re.findall(
        r"committed \S+/step-(\d+) \(.*?\) in ([\d.]+) s .*training blocked ([\d.]+) s", log)]
    saves = [s for s in saves if s[0] < a.steps][1:]  # not the first, not the final (sync)
    after, overlapped = set(), set()
    for step, total, _ in saves:
        after.add(step + 1)  # its step time holds the stall of the save after `step`
        spent, nxt = 0.0, step + 1
        while nxt in times and spent < total:
            overlapped.add(nxt)
            spent += times[nxt]
            nxt += 1
    first = a.interval + 3  # after the first save and its persist
    quiet = [t for s, t in times.items() if s > first and s not in overlapped]
    base = statistics.median(quiet)
    busy = [times[s] for s in sorted(overlapped - after) if s > first]
    stall = statistics.median(b for _, _, b in saves)
    return {"mode": mode, "step_s": base, "stall_s": stall, "stall_pct": 100 * stall / base,
            "saves": len(saves), "persist_s": statistics.median(t for _, t, _ in saves),
            "busy_s": statistics.median(busy) if busy else float("nan"),
            "busy_pct": 100 * (statistics.median(busy) / base - 1) if busy else float("nan"),
            "busy_steps": len(busy), "quiet_steps": len(quiet)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--dir", default="/tmp/raytitan-bench/save_stall")
    p.add_argument("--write-docs", action="store_true")
    a = p.parse_args()
    work = Path(a.dir)
    work.mkdir(parents=True, exist_ok=True)
    rows = [run(mode, a, work) for mode in MODES]
    table = ["| async_mode | step (ms) | stall per save (ms) | stall / step | persist (s) | "
             "overlapped step (ms) | overlapped / quiet - 1 | saves, overlapped, quiet steps |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['mode']} | {1000 * r['step_s']:.1f} | {1000 * r['stall_s']:.1f} | "
                     f"{r['stall_pct']:.1f}% | {r['persist_s']:.2f} | {1000 * r['busy_s']:.1f} | "
                     f"{r['busy_pct']:+.1f}% | {r['saves']}, {r['busy_steps']}, "
                     f"{r['quiet_steps']} |")
    goals = []
    for r in rows:
        goals.append(f"- {r['mode']}: stall <= 1% of a step: {r['stall_pct']:.1f}% — "
                     f"**{'met' if r['stall_pct'] <= 1 else 'NOT met'}**")
        goals.append(f"- {r['mode']}: overlapped steps <= 5% slower: {r['busy_pct']:+.1f}% — "
                     f"**{'met' if r['busy_pct'] <= 5 else 'NOT met'}**")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from train_overhead import cpu_name, write_section

    cpu = cpu_name()

    machine = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}; the debug job "
               f"(jobs/debug.toml) on 2 gloo ranks under torchrun, {a.steps} steps, a "
               f"persistent async save every {a.interval} steps to local disk")
    print(f"Machine: {machine}\n\n" + "\n".join(table + [""] + goals))
    if a.write_docs:
        write_section("\n".join([
            "## Save stall in the debug job (`benchmarks/save_stall.py`)", "",
            f"Machine: {machine}. Step = median step time of the steps that neither follow "
            "a save nor overlap its persist; stall = median \"training blocked\" per save "
            "(not the first); overlapped = median step time of the steps during a "
            "background persist.", "", *table, "", *goals, "",
            "Command: `python benchmarks/save_stall.py --write-docs`", ""]), "save_stall")


if __name__ == "__main__":
    main()
