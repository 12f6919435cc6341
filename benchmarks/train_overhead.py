"""What does the framework cost per step? Steady-state step time of

  1. a minimal hand-written FSDP2 loop (benchmarks/minimal_loop.py) on the same model/data,
  2. the raytitan Trainer under torchrun,
  3. the same Trainer launched by Ray (`raytitan train`: TorchTrainer + Ray Data stream),

all with the same world size, model, batch and thread count. Prints a table and, with
--write-docs, replaces its section in docs/benchmarks.md.

    python benchmarks/train_overhead.py --steps 100 --repeats 3 --write-docs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"


def run(cmd: list[str], env: dict | None = None) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def steady(times: list[float], skip: int) -> float:
    """Median of the per-window step times after the first `skip` windows (warm-up,
    first shard reads)."""
    return statistics.median(times[skip:])


def trainer_times(dump: str) -> list[float]:
    with open(os.path.join(dump, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    # Windows of log_freq steps (the step-1 record is a window of one: skip it).
    return [r["step_time_sec"] for r in records if r["step"] > 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--local-batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dir", default="~/.cache/raytitan")
    p.add_argument("--write-docs", action="store_true")
    a = p.parse_args()

    from raytitan.config.job_config import Data
    from raytitan.data import resolve_dataset
    from raytitan.data.prepare import prepare_local

    dataset = resolve_dataset(Data(cache_dir=a.cache_dir), prepare_local)
    log_freq = 10
    common = {
        "data.path": dataset, "model.flavor": "debug", "training.steps": a.steps,
        "training.seq_len": a.seq_len, "training.local_batch_size": a.local_batch_size,
        "training.mixed_precision_param": "float32", "training.warmup_steps": 10,
        "metrics.log_freq": log_freq, "ray.num_workers": a.workers,
    }
    torchrun = [sys.executable, "-m", "torch.distributed.run",
                f"--nproc-per-node={a.workers}", "--master-addr=127.0.0.1"]
    env = {"OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": ""}
    results: dict[str, list[float]] = {"minimal loop": [], "Trainer (torchrun)": [],
                                       "Trainer (Ray)": []}
    for repeat in range(a.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "minimal.json")
            run(torchrun + ["benchmarks/minimal_loop.py", "--dataset", dataset,
                            "--steps", str(a.steps), "--seq-len", str(a.seq_len),
                            "--local-batch-size", str(a.local_batch_size),
                            "--log-freq", str(log_freq), "--out", out], env)
            results["minimal loop"].append(steady(json.load(open(out)), 1))
            for name, launcher in (("Trainer (torchrun)", torchrun + ["-m", "raytitan.train"]),
                                   ("Trainer (Ray)", [sys.executable, "-m", "raytitan.cli",
                                                      "train"])):
                dump = os.path.join(tmp, name.split()[-1].strip("()"))
                flags = [f"--{k}={v}" for k, v in {**common, "job.dump_folder": dump}.items()]
                run(launcher + flags, env)
                results[name].append(steady(trainer_times(dump), 1))
            print(f"repeat {repeat + 1}: " + ", ".join(
                f"{k} {v[-1] * 1e3:.1f} ms" for k, v in results.items()), flush=True)

    # This machine drifts by several % over minutes, so ratios are paired: each repeat runs
    # the three variants back to back, and we report the median of the per-repeat ratios.
    tokens_per_step = a.local_batch_size * a.workers * a.seq_len
    med = {k: statistics.median(v) for k, v in results.items()}
    base = results["minimal loop"]

    def paired(num: str, den: list[float]) -> float:
        return statistics.median(n / d for n, d in zip(results[num], den))

    trainer_ratio = paired("Trainer (torchrun)", base)
    ray_ratio = paired("Trainer (Ray)", results["Trainer (torchrun)"])
    rows = [("minimal loop", 1.0), ("Trainer (torchrun)", trainer_ratio),
            ("Trainer (Ray)", paired("Trainer (Ray)", base))]
    table = ["| variant | step time (ms), median of repeats | tokens/s | vs minimal loop |",
             "|---|---|---|---|"]
    table += [f"| {n} | {med[n] * 1e3:.1f} | {tokens_per_step / med[n]:,.0f} | {r:.3f}x |"
              for n, r in rows]
    summary = (f"Ray launch vs torchrun: **{ray_ratio:.3f}x** (goal <= 1.03x); "
               f"Trainer vs minimal loop: **{trainer_ratio:.3f}x** (goal <= 1.05x). "
               "Per-repeat step times (ms): " + "; ".join(
                   f"{k} {', '.join(f'{t * 1e3:.0f}' for t in v)}" for k, v in results.items()))
    print("\n".join(table))
    print(summary)
    if a.write_docs:
        import ray

        machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"torch {torch.__version__}, Ray {ray.__version__}, Python "
                   f"{platform.python_version()}, gloo on CPU")
        section = "\n".join([
            "## Training step overhead (`benchmarks/train_overhead.py`)", "",
            f"Machine: {machine}. Debug model (4 M params), fp32, {a.workers} processes "
            f"with FSDP2, local batch {a.local_batch_size} x seq {a.seq_len}; steady-state "
            f"step time = median of the {log_freq}-step windows after the first; "
            f"{a.repeats} repeats of {a.steps} steps, variants interleaved; ratios are the "
            "median of per-repeat (paired) ratios.", "",
            *table, "", summary, "",
            f"Command: `python benchmarks/train_overhead.py --steps {a.steps} --repeats "
            f"{a.repeats} --write-docs`", "",
        ])
        write_section(section, "train_overhead")


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo), else the architecture."""
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")), platform.machine())


def write_section(section: str, key: str) -> None:
    """Replace (or append) the section between the key's markers in docs/benchmarks.md."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\n"
    block = f"{start}\n{section}{end}\n"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) + 1:]
    else:
        text += "\n" + block
    DOCS.write_text(text)


if __name__ == "__main__":
    main()
