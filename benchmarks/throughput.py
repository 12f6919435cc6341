"""Tokens/s, tokens/s per device and MFU of the raytitan Trainer under torchrun, next to
benchmarks/minimal_loop.py (the shortest hand-written FSDP2 loop of the same model on the
same token shards), for one flavor and shape, any world size.

MFU = model FLOPs per token (6 x params + attention, raytitan's `flops_per_token`) x
tokens/s per device / peak FLOP/s of one device. On a GPU give the data-sheet peak
(--peak-flops); on CPU the default is the fp32 matmul FLOP/s measured here with each
process's thread count, so CPU "MFU" is against what this machine's matmul reaches.
Steady state = median of the 10-step windows after the first; variants interleaved per
repeat; the Trainer/minimal-loop ratio is the median of per-repeat (paired) ratios.

    python benchmarks/throughput.py --flavor debug --workers 2 --write-docs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_overhead import run, steady, trainer_times, write_section  # noqa: E402


def matmul_peak(threads: int, n: int = 1024, seconds: float = 2.0) -> float:
    """fp32 matmul FLOP/s of one process with `threads` threads (best of 1 s windows)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < 0.5:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flavor", default="debug")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--local-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-flops", type=float, default=0.0,
                   help="peak FLOP/s of one device; 0 = measured fp32 matmul on CPU")
    p.add_argument("--cache-dir", default="~/.cache/raytitan")
    p.add_argument("--write-docs", action="store_true")
    a = p.parse_args()

    from raytitan.config.job_config import Data
    from raytitan.data import resolve_dataset
    from raytitan.data.prepare import Manifest, prepare_local
    from raytitan.models.llama3 import LLAMA3_FLAVORS

    dataset = resolve_dataset(Data(cache_dir=a.cache_dir), prepare_local)
    vocab = Manifest.load(dataset).vocab_size
    args = dataclasses.replace(LLAMA3_FLAVORS[a.flavor], vocab_size=vocab,
                               max_seq_len=a.seq_len)
    flops_per_token = args.flops_per_token(a.seq_len)
    threads = max(1, (os.cpu_count() or 1) // a.workers)
    peak = a.peak_flops or matmul_peak(threads)
    torchrun = [sys.executable, "-m", "torch.distributed.run",
                f"--nproc-per-node={a.workers}", "--master-addr=127.0.0.1"]
    env = {"OMP_NUM_THREADS": str(threads)}
    trainer_flags = {
        "data.path": dataset, "model.flavor": a.flavor, "training.steps": a.steps,
        "training.seq_len": a.seq_len, "training.local_batch_size": a.local_batch_size,
        "training.mixed_precision_param": "float32", "training.warmup_steps": 10,
        "metrics.log_freq": 10,
    }
    times: dict[str, list[float]] = {"minimal loop": [], "Trainer (torchrun)": []}
    for repeat in range(a.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "minimal.json")
            run(torchrun + ["benchmarks/minimal_loop.py", "--dataset", dataset,
                            "--flavor", a.flavor, "--steps", str(a.steps),
                            "--seq-len", str(a.seq_len),
                            "--local-batch-size", str(a.local_batch_size),
                            "--log-freq", "10", "--out", out], env)
            times["minimal loop"].append(steady(json.load(open(out)), 1))
            dump = os.path.join(tmp, "trainer")
            run(torchrun + ["-m", "raytitan.train"] + [
                f"--{k}={v}" for k, v in {**trainer_flags, "job.dump_folder": dump}.items()],
                env)
            times["Trainer (torchrun)"].append(steady(trainer_times(dump), 1))
        print(f"repeat {repeat + 1}: " + ", ".join(
            f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()), flush=True)

    tokens_per_step = a.local_batch_size * a.workers * a.seq_len
    ratio = statistics.median(t / m for t, m in zip(times["Trainer (torchrun)"],
                                                     times["minimal loop"]))
    table = ["| variant | step (ms) | tokens/s | tokens/s per device | MFU |",
             "|---|---|---|---|---|"]
    for name, values in times.items():
        step = statistics.median(values)
        per_device = tokens_per_step / step / a.workers
        table.append(f"| {name} | {step * 1e3:.1f} | {tokens_per_step / step:,.0f} | "
                     f"{per_device:,.0f} | {flops_per_token * per_device / peak:.1%} |")
    peak_note = (f"peak {peak / 1e9:.1f} GFLOP/s per device (given)" if a.peak_flops else
                 f"peak = measured fp32 matmul, {peak / 1e9:.1f} GFLOP/s per process with "
                 f"{threads} thread(s)")
    summary = (f"Trainer vs minimal loop: **{ratio:.3f}x** step time (goal <= 1.02x: "
               f"{'met' if ratio <= 1.02 else 'NOT met'}). Per-repeat step times (ms): "
               + "; ".join(f"{k} {', '.join(f'{t * 1e3:.0f}' for t in v)}"
                           for k, v in times.items()))
    print("\n".join(table))
    print(summary)
    if a.write_docs:
        machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"torch {torch.__version__}, Python {platform.python_version()}")
        write_section("\n".join([
            "## Throughput and MFU (`benchmarks/throughput.py`)", "",
            f"Machine: {machine}. Flavor `{a.flavor}` ({flops_per_token / 1e9:.3f} GFLOP per "
            f"token at seq {a.seq_len}), fp32, {a.workers} processes with FSDP2 under "
            f"torchrun, local batch {a.local_batch_size} x seq {a.seq_len}, {a.steps} steps x "
            f"{a.repeats} repeats; {peak_note}.", "", *table, "", summary, "",
            f"Command: `python benchmarks/throughput.py --flavor {a.flavor} --workers "
            f"{a.workers} --write-docs`", ""]), "throughput")


if __name__ == "__main__":
    main()
