"""Shard I/O on s3://: one stream against parallel parts and ranges, and the store's own
limit, on an S3-compatible server started here (moto_server on 127.0.0.1).

    store limit        8 whole objects of size/8 put (or got) at once: what the server
                       takes when the client is not the limit
    one stream         s3fs's file object: parts uploaded one after another
    parallel           raytitan.checkpoint.objectstore.ParallelUpload: parts in flight at once
    one GET / ranges   an object read in one ranged GET, or as 16 MiB ranged GETs at once
    dcp.save / load    a 1-process DCP save and load of the same bytes as a state dict:
                       stock FsspecWriter/Reader against raytitan's StepWriter / StepReader
                       (which also records and checks CRC32s)

    python benchmarks/s3_io.py --size-mb 512 --repeats 3 --write-docs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_overhead import cpu_name, write_section  # noqa: E402

from tests.conftest import start_moto  # noqa: E402

BUCKET = "bench"
CHUNK = 8 << 20  # what the writer hands over per write() call
RANGE = 16 << 20


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def methods(fs, data: bytes):
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    from raytitan.checkpoint.objectstore import ParallelUpload
    from raytitan.checkpoint.shards import StepWriter, step_reader

    size = len(data)
    obj = f"{BUCKET}/one"
    parts = {f"{BUCKET}/limit-{i}": data[i * size // 8:(i + 1) * size // 8] for i in range(8)}
    view = memoryview(data)
    state = {"w": torch.frombuffer(bytearray(data), dtype=torch.float32)}

    def stream_write():
        with fs.open(obj, "wb") as f:
            for i in range(0, size, CHUNK):
                f.write(view[i:i + CHUNK])

    def parallel_write():
        upload = ParallelUpload(fs, obj)
        for i in range(0, size, CHUNK):
            upload.write(view[i:i + CHUNK])
        upload.close()

    def one_get():
        assert len(fs.cat_file(obj, start=0, end=size)) == size

    def ranges_read():
        starts = list(range(0, size, RANGE))
        got = fs.cat_ranges([obj] * len(starts), starts, [s + RANGE for s in starts],
                            on_error="raise")
        assert sum(map(len, got)) == size

    def limit_read():
        assert sum(map(len, fs.cat_ranges(list(parts), 0, size, on_error="raise"))) == size

    def save(writer):
        def run():
            fs.rm(f"{BUCKET}/dcp", recursive=True) if fs.exists(f"{BUCKET}/dcp") else None
            dcp.save(state, storage_writer=writer(), no_dist=True)
        return run

    def load(reader):
        def run():
            dcp.load({"w": torch.empty_like(state["w"])}, storage_reader=reader(), no_dist=True)
        return run

    url = f"s3://{BUCKET}/dcp"

    def items():
        checksums = json.loads(fs.cat_file(f"{BUCKET}/dcp/checksums.json"))
        return {name: entry[2] for name, entry in checksums.items()}

    return [
        ("store limit: write", lambda: fs.pipe(parts), "8 objects of size/8 put at once"),
        ("one stream: write", stream_write, "s3fs file object, 50 MiB parts in turn"),
        ("parallel: write", parallel_write, "ParallelUpload, 16 MiB parts, up to 10 in flight"),
        ("store limit: read", limit_read, "8 objects of size/8 got at once"),
        ("one GET: read", one_get, "what StepReader does for an item larger than a range"),
        ("ranges: read", ranges_read, "16 MiB ranged GETs at once (not used: see below)"),
        ("dcp.save, FsspecWriter", save(lambda: FsspecWriter(url)), "stock, one stream"),
        ("dcp.save, StepWriter", save(lambda: StepWriter(url, storage_options={},
                                                        checksums=True)),
         "parallel parts + CRC32"),
        ("dcp.load, FsspecReader", load(lambda: FsspecReader(url)), "stock, one stream"),
        ("dcp.load, StepReader", load(lambda: step_reader(url, {}, items())),
         "a few large ranged GETs + CRC32 check"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    size = args.size_mb << 20
    with tempfile.TemporaryDirectory() as tmp:
        proc, endpoint = start_moto(os.path.join(tmp, "moto.log"))
        try:
            os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                               "AWS_DEFAULT_REGION": "us-east-1",
                               "AWS_ENDPOINT_URL": endpoint})
            import fsspec
            fs = fsspec.filesystem("s3")
            fs.mkdir(BUCKET)
            data = os.urandom(size)
            table = methods(fs, data)
            times: dict[str, list[float]] = {name: [] for name, _, _ in table}
            for _ in range(args.repeats):
                for name, fn, _ in table:
                    fs.invalidate_cache()
                    times[name].append(timed(fn))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    rows = ["| method | time (s) median | MB/s | per-repeat (s) | notes |",
            "|---|---|---|---|---|"]
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, _, note in table:
        rows.append(f"| {name} | {median[name]:.2f} | {size / 1e6 / median[name]:.0f} | "
                    f"{', '.join(f'{t:.2f}' for t in times[name])} | {note} |")
    speedup = median["one stream: write"] / median["parallel: write"]
    limit = median["store limit: write"] / median["parallel: write"]
    save = median["dcp.save, FsspecWriter"] / median["dcp.save, StepWriter"]
    load = median["dcp.load, FsspecReader"] / median["dcp.load, StepReader"]
    ranges = median["ranges: read"] / median["one GET: read"]
    lines = [
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"server: moto_server on 127.0.0.1 (in memory, one Python process on the same cores). "
        f"Object: {size / 1e6:.0f} MB of random bytes, written {CHUNK >> 20} MiB per write() "
        f"call; median of {args.repeats} repeats, methods interleaved.", "", *rows, "",
        f"Parallel parts against one stream: {speedup:.2f}x faster, {limit:.0%} of the "
        f"store limit. DCP on s3://: StepWriter saves {save:.2f}x faster than the stock "
        f"FsspecWriter (CRC32s included), StepReader loads {load:.2f}x faster than the stock "
        f"FsspecReader (CRC32 checks included). Concurrent ranges take {ranges:.1f}x the "
        "time of one GET on this server.", "",
        f"Command: `python benchmarks/s3_io.py --size-mb {args.size_mb} --repeats "
        f"{args.repeats} --write-docs`",
    ]
    section = "## Shard I/O on s3:// (`benchmarks/s3_io.py`)\n\n" + "\n".join(lines) + "\n"
    print(section)
    if args.write_docs:
        write_section(section, "s3io")


if __name__ == "__main__":
    main()
