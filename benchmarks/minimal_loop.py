"""The baseline for train_overhead.py: the shortest honest FSDP2 training loop one would
write by hand for the same model and the same token shards. No config system, no stream
state, no metrics beyond a loss print every `--log-freq` steps.

    torchrun --nproc-per-node 2 benchmarks/minimal_loop.py --dataset DIR --steps 100
"""

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard

from raytitan.models.llama3 import LLAMA3_FLAVORS, Llama3
from raytitan.parallel.utils import fill_param


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--flavor", default="debug")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--local-batch-size", type=int, default=8)
    p.add_argument("--log-freq", type=int, default=10)
    p.add_argument("--out", required=True, help="JSON file for the per-window step times")
    a = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, os.cpu_count() // world))
    manifest = json.load(open(os.path.join(a.dataset, "manifest.json")))
    tokens = np.concatenate([
        pc.list_flatten(pq.read_table(os.path.join(a.dataset, s["path"]))["tokens"]).to_numpy()
        for s in manifest["shards"]
    ])
    n = len(tokens) // (a.seq_len + 1)
    samples = torch.from_numpy(tokens[: n * (a.seq_len + 1)].reshape(n, -1).astype(np.int64))

    args = dataclasses.replace(LLAMA3_FLAVORS[a.flavor], vocab_size=manifest["vocab_size"],
                               max_seq_len=a.seq_len)
    with torch.device("meta"):
        model = Llama3(args)
    for block in model.layers.values():
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device="cpu")
    model.init_weights(0, fill=fill_param)  # same weights as the Trainer (init is not timed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, foreach=True)

    times, t0 = [], time.perf_counter()
    for step in range(1, a.steps + 1):
        first = ((step - 1) * world + rank) * a.local_batch_size % (n - a.local_batch_size)
        batch = samples[first: first + a.local_batch_size]
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % a.log_freq == 0:
            value = loss.item()
            times.append((time.perf_counter() - t0) / a.log_freq)
            t0 = time.perf_counter()
            if rank == 0:
                print(f"step {step} loss {value:.4f} step_time {times[-1]:.4f}s", flush=True)
    if rank == 0:
        with open(a.out, "w") as f:
            json.dump(times, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
