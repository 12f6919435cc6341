"""Megatron's knobs on a 4-rank HSDP mesh (2 replicas x 2 shards, gloo on CPU): bytes each
rank writes with fully_parallel_save on and off, bytes each rank reads with
fully_parallel_load on and off, and the save time with ckpt_assume_constant_structure on
and off for a state of many small tensors (where planning, not writing, is the cost).

The script launches itself under torch.distributed.run with 4 processes. Each save goes
through raytitan's CheckpointManager (sync), --repeats times per variant, variants
interleaved; the first save of a cached variant (which fills the cache) is not counted.

    python benchmarks/save_plans.py --write-docs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_overhead import write_section  # noqa: E402


class Counter:
    step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def build(layers: int, width: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(8, width)).square().mean().backward()
    opt.step()
    return model, opt


def manager(folder: str, model, opt, **cfg):
    from raytitan.checkpoint import CheckpointManager, CheckpointStorage
    from raytitan.checkpoint.folder import open_folder
    from raytitan.config.job_config import Checkpoint

    storage = CheckpointStorage(folder)
    config = Checkpoint(enable=True, interval=1, save_rng=False, **cfg)
    return CheckpointManager(config, storage=storage, model_parts=[model], optimizers=[opt],
                             states={"train_state": Counter()}, files=lambda: {},
                             folder=open_folder(config, storage, job="bench"))


def shard_bytes(step_dir: str) -> list[int]:
    files = json.load(open(os.path.join(step_dir, "checksums.json")))
    return [files[f"__{r}_0.distcp"][0] for r in range(dist.get_world_size())]


def worker(args) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    root = args.dir
    results: dict = {}

    # 1. bytes written per rank, fully_parallel_save on / off (a few large tensors)
    model, opt = build(args.big_layers, args.big_width)
    for balanced in (True, False):
        folder = f"{root}/write-{balanced}"
        m = manager(folder, model, opt, fully_parallel_save=balanced)
        m.save(1, final=True)
        results[f"write_{balanced}"] = shard_bytes(f"{folder}/step-1")
        # 2. bytes read per rank from that step, fully_parallel_load on / off
        for parallel_load in (True, False):
            loader = manager(folder, model, opt, fully_parallel_load=parallel_load)
            start = time.perf_counter()
            loader.load()
            seconds = time.perf_counter() - start
            reads = [0] * dist.get_world_size()
            dist.all_gather_object(reads, loader.loader.last_read_bytes)
            results[f"read_{balanced}_{parallel_load}"] = (reads, seconds)
            loader.close()
        m.close()
    del model, opt

    # 3. save time with and without the plan cache (many small tensors)
    model, opt = build(args.small_layers, args.small_width)
    times: dict[bool, list[float]] = {True: [], False: []}
    managers = {cached: manager(f"{root}/plans-{cached}", model, opt,
                                ckpt_assume_constant_structure=cached, save_checksums=False)
                for cached in (True, False)}
    for repeat in range(args.repeats + 1):
        for cached in (True, False):
            dist.barrier()
            start = time.perf_counter()
            managers[cached].save(repeat + 1, final=True)
            dist.barrier()
            if repeat > 0:
                times[cached].append(time.perf_counter() - start)
            if rank == 0:
                shutil.rmtree(f"{root}/plans-{cached}/step-{repeat + 1}")
            dist.barrier()
    results["plan_times"] = {str(k): v for k, v in times.items()}
    results["tensors"] = len(model.state_dict()) * 3  # params + 2 AdamW moments
    for m in managers.values():
        m.close()
    if rank == 0:
        print(json.dumps(results), flush=True)
    dist.destroy_process_group()


def table(results: dict, args) -> str:
    mb = lambda xs: ", ".join(f"{x / 1e6:.1f}" for x in xs)  # noqa: E731
    imbalance = lambda xs: max(xs) / (sum(xs) / len(xs))  # noqa: E731
    lines = [
        "## Save plans: Megatron's knobs (`benchmarks/save_plans.py`)", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}; 4 gloo ranks on CPU, HSDP mesh 2 replicas x 2 shards "
        f"(FSDP2). Write/read: {args.big_layers} x Linear({args.big_width}, "
        f"{args.big_width}) + AdamW, sync saves. Plan cache: {args.small_layers} x "
        f"Linear({args.small_width}, {args.small_width}) + AdamW ({results['tensors']} "
        f"tensors), median of {args.repeats} sync saves (CRC32 off).", "",
        "| variant | MB written per rank (ranks 0-3) | max / mean |",
        "|---|---|---|",
    ]
    for balanced in (True, False):
        w = results[f"write_{balanced}"]
        lines.append(f"| fully_parallel_save = {str(balanced).lower()} | {mb(w)} | "
                     f"{imbalance(w):.2f} |")
    lines += ["", "| variant | MB read per rank (ranks 0-3) | load (s) |", "|---|---|---|"]
    for parallel_load in (True, False):
        reads, seconds = results[f"read_True_{parallel_load}"]
        lines.append(f"| fully_parallel_load = {str(parallel_load).lower()} | {mb(reads)} | "
                     f"{seconds:.2f} |")
    cached = statistics.median(results["plan_times"]["True"])
    plain = statistics.median(results["plan_times"]["False"])
    lines += ["", "| variant | save (s), median | per-save times (s) |", "|---|---|---|",
              f"| ckpt_assume_constant_structure = true | {cached:.3f} | "
              + ", ".join(f"{t:.3f}" for t in results["plan_times"]["True"]) + " |",
              f"| ckpt_assume_constant_structure = false | {plain:.3f} | "
              + ", ".join(f"{t:.3f}" for t in results["plan_times"]["False"]) + " |",
              "", f"Plan cache: {plain / cached:.2f}x faster saves.", "",
              "Command: `python benchmarks/save_plans.py --write-docs`"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-layers", type=int, default=4)
    parser.add_argument("--big-width", type=int, default=1024)
    parser.add_argument("--small-layers", type=int, default=200)
    parser.add_argument("--small-width", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        argv = [a for a in sys.argv[1:] if a != "--write-docs"]
        out = Path(tmp) / "out.json"
        with open(out, "w") as f:
            code = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
                 "--master-addr", "127.0.0.1", f"--master-port={free_port()}", __file__,
                 "--worker", "--dir", tmp, *argv],
                cwd=ROOT, stdout=f, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
        if code:
            sys.exit(code)
        results = json.loads(out.read_text().strip().splitlines()[-1])
    text = table(results, args)
    print(text)
    if args.write_docs:
        write_section(text + "\n", "save_plans")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
