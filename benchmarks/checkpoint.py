"""How fast are raytitan's checkpoints, next to the disk and to stock PyTorch?

A 2-process gloo job on CPU (the script launches itself under torch.distributed.run) holds an
FSDP2-sharded stack of Linear(d, d) layers plus its AdamW state (params + 2 fp32 moments
~= --size-gb) after one training step, and times, each --repeats times (median reported):

  1. raw disk: sequential write (64 MiB chunks, then fsync) and read of the same number of
     bytes, from 2 processes at once (one file each) and from 1; reads follow an fsync and
     posix_fadvise(DONTNEED), so they come from the disk, not the page cache; one untimed
     warm-up pass first (on this VM the first touch of fresh memory costs ~1 s/GB);
  2. torch.save of the gathered full state on rank 0 (gather + write + fsync);
  3. stock dcp.save with FileSystemWriter (default options) and dcp.load with
     FileSystemReader (page cache evicted first; includes set_*_state_dict);
  4. raytitan CheckpointManager.save(step, final=True): synchronous save + commit;
  5. raytitan CheckpointManager.load() with the step's page cache evicted first;
  6. raytitan async and async_with_pinned_mem: the stall (time inside save() plus
     wait_for_staging() called right after it, so no overlap with a training step: an upper
     bound) and the persist time (save() until poll(wait=True) has committed the step).

Timings are barrier to barrier (the slowest rank counts); old checkpoints are deleted
before each save. GB/s = bytes on disk (sum of the files written; GB = 1e9 B) / seconds.
Prints a markdown table (on stderr with --json, which prints one JSON object on stdout);
--write-docs replaces the "checkpoint" section of docs/benchmarks.md.

    python benchmarks/checkpoint.py --size-gb 1 --repeats 3 --write-docs
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
CHUNK = 64 << 20
GB = 1e9


def launch(argv: list[str]) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port), __file__, *argv]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def timed(fn) -> float:
    """Wall seconds of fn, called on every rank, barrier to barrier."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def on_rank0(fn) -> None:
    if dist.get_rank() == 0:
        fn()
    dist.barrier()


def files(path: str) -> list[str]:
    return [path] if os.path.isfile(path) else [
        os.path.join(d, f) for d, _, names in os.walk(path) for f in names]


def evict(path: str) -> None:
    """Drop the (clean: fsync'd) page cache of every file under path."""
    for p in files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def du(path: str) -> int:
    return sum(os.path.getsize(p) for p in files(path))


def rm(path: str) -> None:
    on_rank0(lambda: shutil.rmtree(path) if os.path.isdir(path) else
             os.remove(path) if os.path.exists(path) else None)


def machine(target: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.machine())
    mem = int(open("/proc/meminfo").readline().split()[1]) / 2**20
    df = subprocess.run(["df", "-T", target], capture_output=True, text=True).stdout
    dev, fstype = df.splitlines()[-1].split()[:2]
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, disk {dev} ({fstype}), "
            f"torch {torch.__version__}, Python {platform.python_version()}")


class Counter:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def main(a: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    os.makedirs(a.dir, exist_ok=True)
    box = [tempfile.mkdtemp(prefix="ckpt-", dir=os.path.abspath(a.dir))
           if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    try:
        rows, state_bytes, layers = measure(a, box[0])
        if dist.get_rank() == 0:
            report(a, rows, state_bytes, layers, machine(box[0]))
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(box[0], ignore_errors=True)
        dist.destroy_process_group()


def measure(a: argparse.Namespace, base: str) -> tuple[dict, int, int]:
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
        set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from raytitan.checkpoint import CheckpointManager, CheckpointStorage
    from raytitan.config.job_config import Checkpoint as CheckpointConfig

    rank, reps, d = dist.get_rank(), a.repeats, a.dim
    # The state: FSDP2 Linear stack + AdamW after one step (gradients dropped).
    layers = max(1, round(a.size_gb * GB / (12 * d * d)))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(d, d, bias=False) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (2,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    model(torch.randn(4, d)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    state_bytes = torch.tensor(3 * sum(p.to_local().nbytes for p in model.parameters()))
    dist.all_reduce(state_bytes)
    state_bytes = int(state_bytes)
    log(f"state: {layers} x Linear({d}, {d}), {state_bytes / GB:.2f} GB; files in {base}")
    rows: dict[str, dict] = {}

    def record(name: str, times: list[float], nbytes: int | None, notes: str) -> dict:
        med = statistics.median(times)
        rows[name] = {"median_s": med, "repeats_s": times, "bytes": nbytes,
                      "gbps": nbytes / GB / med if nbytes else None, "notes": notes}
        log(f"  {name}: {', '.join(f'{t:.2f}' for t in times)} s")
        return rows[name]

    # 1. Raw disk: 2 writers (one file each), then 1 writer; the same total bytes.
    buf = memoryview(torch.randint(0, 256, (CHUNK,), dtype=torch.uint8).numpy()).cast("B")
    for writers in (2, 1):
        path, n, active = f"{base}/raw-{rank}.bin", state_bytes // writers, rank < writers

        def write() -> None:
            with open(path, "wb", buffering=0) as f:
                for off in range(0, n, CHUNK):
                    f.write(buf[:min(CHUNK, n - off)])
                os.fsync(f.fileno())

        def read() -> None:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass

        w, r = [], []
        for _ in range(reps + 1):  # the first pass is an untimed warm-up
            w.append(timed(write if active else lambda: None))
            if active:
                evict(path)
            r.append(timed(read if active else lambda: None))
            if active:
                os.remove(path)
        note = f"{writers} process{'es' if writers > 1 else ''}, 64 MiB chunks, "
        record(f"raw disk write ({writers}p)", w[1:], state_bytes, note + "fsync")
        record(f"raw disk read ({writers}p)", r[1:], state_bytes, note + "page cache evicted")

    # 2. torch.save of the gathered full state on rank 0.
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    path, times, gathers = f"{base}/full.pt", [], []

    def full_save() -> None:
        start = time.perf_counter()
        state = {"model": get_model_state_dict(model, options=full),
                 "optimizer": get_optimizer_state_dict(model, opt, options=full)}
        gathers.append(time.perf_counter() - start)
        if rank == 0:
            with open(path, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

    for _ in range(reps):
        rm(path)
        times.append(timed(full_save))
    nbytes = du(path) if rank == 0 else 0
    rm(path)
    record("torch.save, full state on rank 0", times, nbytes,
           f"gather (all-gather to rank 0) {statistics.median(gathers):.2f} s, then write")

    # 3. Stock DCP with the default FileSystemWriter / FileSystemReader.
    def sharded() -> dict:
        return {"model": get_model_state_dict(model),
                "optimizer": get_optimizer_state_dict(model, opt)}

    def dcp_load() -> None:
        state = sharded()
        dcp.load(state, storage_reader=FileSystemReader(path))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optimizer"])

    path, saves, loads = f"{base}/dcp", [], []
    for _ in range(reps):
        rm(path)
        saves.append(timed(lambda: dcp.save(sharded(), storage_writer=FileSystemWriter(path))))
    for _ in range(reps):
        on_rank0(lambda: evict(path))
        loads.append(timed(dcp_load))
    nbytes = du(path)
    rm(path)
    record("dcp.save (FileSystemWriter)", saves, nbytes, "stock, default options")
    record("dcp.load (FileSystemReader)", loads, nbytes, "incl. set_*_state_dict")

    # 4.-6. raytitan's CheckpointManager, a fresh run folder per mode.
    def manager(mode: str) -> CheckpointManager:
        folder = f"{base}/raytitan-{mode}"
        cfg = CheckpointConfig(enable=True, folder=folder, interval=1, async_mode=mode,
                               save_checksums=True)
        return CheckpointManager(cfg, storage=CheckpointStorage(folder), model_parts=[model],
                                 optimizers=[opt], states={"train_state": Counter()})

    def drop_steps(mgr: CheckpointManager) -> None:
        on_rank0(lambda: [mgr.storage.remove_step(s.step) for s in mgr.storage.list_steps()])

    mgr, saves, loads = manager("disabled"), [], []
    for step in range(1, reps + 1):
        drop_steps(mgr)
        saves.append(timed(lambda: mgr.save(step, final=True)))
    path = mgr.storage.step_path(reps)
    for _ in range(reps):
        on_rank0(lambda: evict(path))
        loads.append(timed(mgr.load))
    nbytes = du(path)
    mgr.close()
    rm(mgr.storage.root)
    sync = record("raytitan save (sync)", saves, nbytes, "save(final=True): DCP + CRC32 + commit")
    record("raytitan load", loads, nbytes, "load(): choose, check sizes, DCP, apply")

    for mode in ("async", "async_with_pinned_mem"):
        mgr, stalls, persists, in_save = manager(mode), [], [], []
        for step in range(1, reps + 1):
            drop_steps(mgr)
            dist.barrier()
            start = time.perf_counter()
            mgr.save(step)
            returned = time.perf_counter()
            mgr.wait_for_staging()
            staged = time.perf_counter()
            mgr.poll(wait=True)
            t = torch.tensor([staged - start, time.perf_counter() - start, returned - start],
                             dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank holds up training
            stalls.append(float(t[0]))
            persists.append(float(t[1]))
            in_save.append(float(t[2]))
        nbytes = du(mgr.storage.step_path(reps))
        mgr.close()
        rm(mgr.storage.root)
        stall = statistics.median(stalls) / sync["median_s"]
        record(f"raytitan {mode}: stall", stalls, None,
               f"**{stall:.1%} of sync save**; in save() {statistics.median(in_save):.2f} s, "
               "the rest in wait_for_staging()")
        record(f"raytitan {mode}: persist", persists, nbytes, "save() until committed")
    return rows, state_bytes, layers


def report(a, rows: dict[str, dict], state_bytes: int, layers: int, machine_line: str) -> None:
    def best(kind: str) -> tuple[str, dict]:
        return max(((n, r) for n, r in rows.items() if n.startswith(f"raw disk {kind}")),
                   key=lambda nr: nr[1]["gbps"])

    (wname, write), (rname, read) = best("write"), best("read")
    sync, load = rows["raytitan save (sync)"], rows["raytitan load"]
    dsave, dload = rows["dcp.save (FileSystemWriter)"], rows["dcp.load (FileSystemReader)"]
    goals = {  # name: (value, limit, higher is better, format)
        "sync save >= 80% of the raw write bandwidth":
            (sync["gbps"] / write["gbps"], 0.8, True, "{:.0%}"),
        "load >= 80% of the raw read bandwidth":
            (load["gbps"] / read["gbps"], 0.8, True, "{:.0%}"),
        **{f"{m} stall <= 5% of the sync save time":
           (rows[f"raytitan {m}: stall"]["median_s"] / sync["median_s"], 0.05, False, "{:.1%}")
           for m in ("async", "async_with_pinned_mem")},
        "save no slower than dcp.save (time ratio)":
            (sync["median_s"] / dsave["median_s"], 1.0, False, "{:.2f}x"),
        "load no slower than dcp.load (time ratio)":
            (load["median_s"] / dload["median_s"], 1.0, False, "{:.2f}x"),
    }
    met = {k: v >= lim if up else v <= lim for k, (v, lim, up, _) in goals.items()}
    table = ["| method | time (s) median | GB/s | per-repeat (s) | notes |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        gbps = f"{r['gbps']:.2f}" if r["gbps"] else "-"
        per = ", ".join(f"{t:.2f}" for t in r["repeats_s"])
        table.append(f"| {name} | {r['median_s']:.2f} | {gbps} | {per} | {r['notes']} |")
    goal_lines = [f"Physical limit (the better raw figure): write {write['gbps']:.2f} GB/s "
                  f"({wname}), read {read['gbps']:.2f} GB/s ({rname}). Goals:", ""] + [
        f"- {k}: {fmt.format(v)} — **{'met' if met[k] else 'NOT met'}**"
        for k, (v, _, _, fmt) in goals.items()]
    size = (f"State: {state_bytes / GB:.2f} GB ({layers} x Linear({a.dim}, {a.dim}), FSDP2 "
            f"over 2 gloo ranks, + AdamW moments, fp32); median of {a.repeats} repeats.")
    out = sys.stderr if a.json else sys.stdout
    print(f"Machine: {machine_line}\n{size}\n\n" + "\n".join(table + [""] + goal_lines),
          file=out, flush=True)
    if a.json:
        print(json.dumps({"machine": machine_line, "state_bytes": state_bytes,
                          "layers": layers, "dim": a.dim, "repeats": a.repeats, "rows": rows,
                          "goals": {k: {"value": v, "limit": lim, "met": met[k]}
                                    for k, (v, lim, _, _) in goals.items()}}), flush=True)
    if a.write_docs:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from train_overhead import write_section

        command = (f"python benchmarks/checkpoint.py --size-gb {a.size_gb:g} --repeats "
                   f"{a.repeats}{f' --dim {a.dim}' if a.dim != 4096 else ''} --write-docs")
        write_section("\n".join([
            "## Checkpoint save and load (`benchmarks/checkpoint.py`)", "",
            f"Machine: {machine_line}. {size} GB/s = bytes on disk / time (GB = 1e9 B); "
            "every write is fsync'd, every read starts from an evicted page cache, and old "
            "checkpoints are deleted before each save.", "",
            *table, "", *goal_lines, "", f"Command: `{command}`", ""]), "checkpoint")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=1.0, help="params + AdamW moments, fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dim", type=int, default=4096, help="width of the Linear layers")
    p.add_argument("--dir", default="/tmp/raytitan-bench",
                   help="target folder; a fresh ckpt-* folder in it is used, then removed")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    if "LOCAL_RANK" not in os.environ:
        sys.exit(launch(sys.argv[1:]))
    main(args)
