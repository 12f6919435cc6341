"""Driver of the elastic test (test_elastic.py), run as its own process: a two-node Ray
cluster on 127.0.0.1 (ray.cluster_utils), one training worker per node (each node has one
`trainer_slot`, each worker takes one).

    python -m tests.integration.elastic_driver OUT_DIR --section.key value ...

Once the run has trained 6 steps, node 2 gets a preemption notice (`ray drain-node`, a 15 s
deadline), then is removed at the deadline; when the run trains on one worker, a new node
joins and the run grows back (training held, by a test hook, until Ray has resized). Every event goes to OUT_DIR/events.jsonl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def main() -> None:
    out = Path(sys.argv[1])
    argv = sys.argv[2:]
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    from raytitan.config import load_job_config
    from raytitan.launcher import launch

    events = open(out / "events.jsonl", "a")

    def event(name: str, **fields) -> None:
        events.write(json.dumps({"event": name, "t": time.time(), **fields}) + "\n")
        events.flush()
        print(f"=== elastic driver: {name} {fields}", flush=True)

    # The head holds one worker and the CPUs Ray Data's read tasks need (PLATFORM.md).
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "resources": {"trainer_slot": 1}, "node_ip_address": "127.0.0.1",
        "include_dashboard": False})
    second = cluster.add_node(num_cpus=1, resources={"trainer_slot": 1},
                              node_ip_address="127.0.0.1")
    ray.init(address=cluster.address)
    cfg = load_job_config(None, argv)
    metrics = Path(cfg.job.dump_folder) / "metrics.jsonl"
    result: dict = {}

    def run() -> None:
        try:
            result["metrics"] = launch(cfg).metrics
        except BaseException as e:  # reported by the test
            result["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=run)
    thread.start()

    def steps_done() -> int:
        try:
            return len(metrics.read_text().splitlines())
        except FileNotFoundError:
            return 0

    def wait_for(condition, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not condition():
            if not thread.is_alive() or time.time() > deadline:
                raise SystemExit(f"timed out waiting for {what}: {result}")
            time.sleep(0.2)

    def world_sizes() -> list[int]:
        text = (out / "driver.log").read_text() if (out / "driver.log").exists() else ""
        return [int(w) for w in __import__("re").findall(r"mesh:\s+world (\d+)", text)]

    wait_for(lambda: steps_done() >= 6, "6 steps on two workers")
    event("drain", node=second.node_id, steps=steps_done())
    subprocess.run(["ray", "drain-node", "--address", cluster.address, "--node-id",
                    second.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                    "--reason-message", "test: spot reclaim", "--deadline-remaining-seconds",
                    "15"], check=True, input="y\n", text=True)
    time.sleep(13)  # the node goes at its deadline
    cluster.remove_node(second)
    event("removed", steps=steps_done())
    wait_for(lambda: 1 in world_sizes()[1:], "a one-worker group")
    start = steps_done()
    wait_for(lambda: steps_done() >= start + 3, "3 steps on one worker")
    # Training waits (a test hook) until Ray has seen the new node and grown the group: its
    # resource view is refreshed every ~20 s, longer than this run's remaining steps.
    hold = Path(os.environ["RAYTITAN_HOLD_FILE"])
    hold.touch()
    cluster.add_node(num_cpus=1, resources={"trainer_slot": 1}, node_ip_address="127.0.0.1")
    event("added", steps=steps_done())
    grown = len(world_sizes())
    wait_for(lambda: len(world_sizes()) > grown and world_sizes()[-1] == 2, "a regrown group")
    hold.unlink()
    event("grown", steps=steps_done())
    thread.join(timeout=600)
    event("finished", **result)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
