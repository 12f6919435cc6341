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
  5. raytitan CheckpointManager.load() with the step's page cache evicted first (by a new
     manager, as a restarted run), with and without the per-item CRC32 check;
  6. raytitan async and async_with_pinned_mem: the stall = time inside save() + time
     inside wait_for_staging(), which runs after the next step's forward and backward
     (--batch rows), as in the Trainer; and the persist time (save() until
     poll(wait=True) has committed the step). Also the sync save without checksums.

Each repeat runs every method back to back (this VM drifts a lot over minutes), the DCP and
raytitan methods in alternating order, and the raytitan-vs-DCP time ratios are medians of
per-repeat (paired) ratios. Timings are barrier
to barrier (the slowest rank counts); checkpoints are deleted after each measurement.
GB/s = bytes on disk (sum of the files written; GB = 1e9 B) / seconds.
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
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def du(path: str) -> int:
    return sum(os.path.getsize(p) for p in files(path))


def rm(path: str) -> None:
    on_rank0(lambda: shutil.rmtree(path, ignore_errors=True))


def machine(target: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.machine())
    mem = int(open("/proc/meminfo").readline().split()[1]) / 2**20
    df = subprocess.run(["df", "-T", target], capture_output=True, text=True).stdout
    dev, fstype = df.splitlines()[-1].split()[:2]
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, disk {dev} ({fstype}), "
            f"torch {torch.__version__}, Python {platform.python_version()}")


class Counter:  # stands in for the train_state
    step = 0

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
        dist.barrier()
    finally:
        if dist.get_rank() == 0:
            shutil.rmtree(box[0], ignore_errors=True)
    dist.destroy_process_group()


def measure(a: argparse.Namespace, base: str) -> tuple[dict, int, int]:
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint import state_dict as sd
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from raytitan.checkpoint import CheckpointManager, CheckpointStorage
    from raytitan.config.job_config import Checkpoint as CheckpointConfig

    rank, d = dist.get_rank(), a.dim
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
    # Every repeat runs every method back to back (this VM drifts by a lot over minutes),
    # and ratios between methods are the median of per-repeat (paired) ratios.
    times: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    extra: dict[str, list[float]] = {}

    def add(name: str, seconds: float, table: dict = times) -> None:
        table.setdefault(name, []).append(seconds)

    # 1. Raw disk: 2 writers (one file each), then 1 writer; the same total bytes.
    buf = memoryview(torch.randint(0, 256, (CHUNK,), dtype=torch.uint8).numpy()).cast("B")

    def raw(writers: int, record: bool = True) -> None:
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

        seconds = timed(write if active else lambda: None)
        if active:
            evict(path)
        seconds = (seconds, timed(read if active else lambda: None))
        if active:
            os.remove(path)
        for kind, t in zip(("write", "read"), seconds if record else ()):
            add(f"raw disk {kind} ({writers}p)", t)

    # 2. torch.save of the gathered full state on rank 0.
    full = sd.StateDictOptions(full_state_dict=True, cpu_offload=True)

    def torch_save() -> None:
        path = f"{base}/torch_save"
        os.makedirs(path, exist_ok=True)

        def save() -> None:
            start = time.perf_counter()
            state = {"model": sd.get_model_state_dict(model, options=full),
                     "optimizer": sd.get_optimizer_state_dict(model, opt, options=full)}
            add("gather", time.perf_counter() - start, extra)
            if rank == 0:
                with open(f"{path}/full.pt", "wb") as f:
                    torch.save(state, f)
                    f.flush()
                    os.fsync(f.fileno())

        add("torch.save", timed(save))
        sizes["torch.save"] = du(path) if rank == 0 else 0
        rm(path)

    # 3. Stock DCP with the default FileSystemWriter / FileSystemReader.
    def sharded() -> dict:
        return {"model": sd.get_model_state_dict(model),
                "optimizer": sd.get_optimizer_state_dict(model, opt)}

    def stock_dcp() -> None:
        path = f"{base}/dcp"

        def load() -> None:
            state = sharded()
            dcp.load(state, storage_reader=FileSystemReader(path))
            sd.set_model_state_dict(model, state["model"])
            sd.set_optimizer_state_dict(model, opt, state["optimizer"])

        add("dcp.save", timed(lambda: dcp.save(sharded(), storage_writer=FileSystemWriter(path))))
        sizes["dcp.save"] = sizes["dcp.load"] = du(path)
        on_rank0(lambda: evict(path))
        add("dcp.load", timed(load))
        rm(path)

    # 4.-6. raytitan's CheckpointManager, one run folder per async_mode.
    def manager(mode: str) -> CheckpointManager:
        folder = f"{base}/raytitan-{mode}"
        cfg = CheckpointConfig(enable=True, folder=folder, interval=1,
                               async_mode=mode.split("-")[0],
                               save_checksums=not mode.endswith("-nocrc"),
                               thread_count=2 if mode.endswith("-tc2") else 1)
        return CheckpointManager(cfg, storage=CheckpointStorage(folder), model_parts=[model],
                                 optimizers=[opt], states={"train_state": Counter()})

    modes = ("disabled", "disabled-nocrc", "disabled-tc2", "async", "async_with_pinned_mem")
    sync_names = {"disabled": "", "disabled-nocrc": ", no checksums",
                  "disabled-tc2": ", 2 threads"}
    load_names = {"disabled": "", "disabled-nocrc": " (no item CRC32s)",
                  "disabled-tc2": " (a 2-thread step)"}
    batch = torch.randn(a.batch, d)
    managers = {mode: manager(mode) for mode in modes}

    def raytitan(mode: str, step: int) -> None:
        mgr = managers[mode]
        path = mgr.storage.step_path(step)
        if mode.startswith("disabled"):
            add(f"raytitan save (sync{sync_names[mode]})",
                timed(lambda: mgr.save(step, final=True)))
            on_rank0(lambda: evict(path))
            loader = manager(mode)  # a run starting now: it opens the folder, picks the step
            add(f"raytitan load{load_names[mode]}", timed(loader.load))
            loader.close()
        else:
            dist.barrier()
            start = time.perf_counter()
            mgr.save(step)
            returned = time.perf_counter()
            model(batch).square().mean().backward()  # the next step's forward + backward
            waiting = time.perf_counter()
            mgr.wait_for_staging()
            staged = time.perf_counter()
            opt.zero_grad(set_to_none=True)  # no optimizer step: the state stays the same
            mgr.poll(wait=True)
            stall = (returned - start) + (staged - waiting)
            t = torch.tensor([stall, time.perf_counter() - start, returned - start],
                             dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank holds up training
            add(f"raytitan {mode}: stall", float(t[0]))
            add(f"raytitan {mode}: persist", float(t[1]))
            add(f"in save() {mode}", float(t[2]), extra)
        sizes[mode] = du(path)
        dist.barrier()  # every rank has measured before rank 0 deletes
        on_rank0(lambda: mgr.storage.remove_step(step))

    raw(2, record=False)  # warm-up
    for rep in range(a.repeats):
        raw(2)
        raw(1)
        torch_save()
        # Alternate which goes first: on this VM a save right after a 1 GB load or delete
        # runs slower (fresh memory, page cache), which would bias a fixed order.
        order = [stock_dcp, *[lambda m=m, r=rep: raytitan(m, r + 1) for m in modes]]
        for method in (order if rep % 2 == 0 else order[::-1]):
            method()
        log(f"repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()))
    for mgr in managers.values():
        mgr.close()

    def med(name: str, table: dict = times) -> float:
        return statistics.median(table[name])

    rows: dict[str, dict] = {}
    for name, nbytes, notes in [
        ("raw disk write (2p)", state_bytes, "2 processes, 64 MiB chunks, fsync"),
        ("raw disk read (2p)", state_bytes, "2 processes, page cache evicted"),
        ("raw disk write (1p)", state_bytes, "1 process, 64 MiB chunks, fsync"),
        ("raw disk read (1p)", state_bytes, "1 process, page cache evicted"),
        ("torch.save", sizes["torch.save"],
         f"full state to rank 0 (gather {med('gather', extra):.2f} s), one file, fsync"),
        ("dcp.save", sizes["dcp.save"], "stock FileSystemWriter, default options"),
        ("dcp.load", sizes["dcp.load"], "FileSystemReader; incl. set_*_state_dict"),
        ("raytitan save (sync)", sizes["disabled"], "save(final=True): DCP + CRC32 + commit"),
        ("raytitan save (sync, no checksums)", sizes["disabled-nocrc"],
         "save_checksums = false"),
        ("raytitan save (sync, 2 threads)", sizes["disabled-tc2"],
         "thread_count = 2: two files per rank, written in two threads"),
        ("raytitan load", sizes["disabled"],
         "load(): sizes, CRC32 of every item as read, DCP, apply"),
        ("raytitan load (no item CRC32s)", sizes["disabled-nocrc"],
         "the same, of a step saved with save_checksums = false"),
        ("raytitan load (a 2-thread step)", sizes["disabled-tc2"],
         "the same, of a step saved with thread_count = 2"),
        *[row for mode in modes[3:] for row in [
            (f"raytitan {mode}: stall", None,
             f"**{med(f'raytitan {mode}: stall') / med('raytitan save (sync)'):.1%} of sync "
             f"save**; in save() {med(f'in save() {mode}', extra):.2f} s, the rest in "
             f"wait_for_staging() after a forward + backward of {a.batch} rows"),
            (f"raytitan {mode}: persist", sizes[mode], "save() until committed")]]]:
        rows[name] = {"median_s": med(name), "repeats_s": times[name], "bytes": nbytes,
                      "gbps": nbytes / GB / med(name) if nbytes else None, "notes": notes}
    for ours, theirs in (("raytitan save (sync)", "dcp.save"),
                         ("raytitan save (sync, no checksums)", "dcp.save"),
                         ("raytitan load", "dcp.load"),
                         ("raytitan load", "raytitan load (no item CRC32s)")):
        rows[ours]["paired_ratio_vs_" + theirs] = statistics.median(
            x / y for x, y in zip(times[ours], times[theirs]))
    return rows, state_bytes, layers


def report(a, rows: dict[str, dict], state_bytes: int, layers: int, machine_line: str) -> None:
    def best(kind: str) -> tuple[str, dict]:
        return max(((n, r) for n, r in rows.items() if n.startswith(f"raw disk {kind}")),
                   key=lambda nr: nr[1]["gbps"])

    (wname, write), (rname, read) = best("write"), best("read")
    sync, load = rows["raytitan save (sync)"], rows["raytitan load"]
    goals = {  # name: (value, limit, higher is better, format)
        "sync save >= 90% of the raw write bandwidth":
            (sync["gbps"] / write["gbps"], 0.9, True, "{:.0%}"),
        "load >= 90% of the raw read bandwidth":
            (load["gbps"] / read["gbps"], 0.9, True, "{:.0%}"),
        **{f"{m} stall <= 5% of the sync save time":
           (rows[f"raytitan {m}: stall"]["median_s"] / sync["median_s"], 0.05, False, "{:.1%}")
           for m in ("async", "async_with_pinned_mem")},
        "save no slower than dcp.save (time ratio, paired)":
            (sync["paired_ratio_vs_dcp.save"], 1.0, False, "{:.2f}x"),
        "save without checksums no slower than dcp.save (time ratio, paired)":
            (rows["raytitan save (sync, no checksums)"]["paired_ratio_vs_dcp.save"], 1.0, False,
             "{:.2f}x"),
        "load no slower than dcp.load (time ratio, paired)":
            (load["paired_ratio_vs_dcp.load"], 1.0, False, "{:.2f}x"),
        "checking every item's CRC32 while loading costs <= 10% (time ratio, paired)":
            (load["paired_ratio_vs_raytitan load (no item CRC32s)"], 1.1, False, "{:.2f}x"),
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
            "checkpoints are deleted before each save. Each repeat runs all methods back to "
            "back; the time ratios are medians of per-repeat (paired) ratios.", "",
            *table, "", *goal_lines, "", f"Command: `{command}`", ""]), "checkpoint")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=1.0, help="params + AdamW moments, fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dim", type=int, default=4096, help="width of the Linear layers")
    p.add_argument("--batch", type=int, default=64,
                   help="rows of the forward + backward that async staging overlaps")
    p.add_argument("--dir", default="/tmp/raytitan-bench",
                   help="target folder; a fresh ckpt-* folder in it is used, then removed")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    if "LOCAL_RANK" not in os.environ:
        sys.exit(launch(sys.argv[1:]))
    main(args)
