"""Elastic Ray training on a two-node loopback cluster (tests/integration/elastic_driver.py):
a preemption notice triggers an emergency save; the node goes and the run continues on one
worker with the same global batch; a node joins and the run grows back to two. Losses stay
within 1e-5 of an uninterrupted run, and every sample is trained exactly once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import defaultdict

import pytest

from tests.conftest import BASE_OVERRIDES, HOOKS, ROOT, overrides_to_argv, run_torchrun

pytestmark = pytest.mark.slow

STEPS = 30


def test_elastic_run_shrinks_on_preemption_and_grows_back(tiny_dataset, tmp_path):
    run = {**BASE_OVERRIDES, "data.path": tiny_dataset, "training.steps": str(STEPS),
           "training.global_batch_size": "16", "checkpoint.enable": "true",
           "checkpoint.interval": "4", "ray.num_workers": "2", "ray.min_workers": "1",
           "ray.max_failures": "4", "ray.worker_resources": "trainer_slot=1",
           "ray.resize_check_seconds": "5", "job.name": "elastic"}
    reference = run_torchrun(2, run, tmp_path / "reference")

    out = tmp_path / "elastic"
    out.mkdir()
    samples = out / "samples"
    samples.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "",
           "PYTHONPATH": os.pathsep.join([HOOKS, str(ROOT)]),
           "RAYTITAN_SAMPLE_LOG": str(samples), "RAYTITAN_SLOW_STEP_SEC": "0.2",
           "RAYTITAN_HOLD_FILE": str(out / "hold"),
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"}
    with open(out / "driver.log", "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.integration.elastic_driver", str(out),
             *overrides_to_argv({**run, "job.dump_folder": str(out)})],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=900)
    text = (out / "driver.log").read_text()
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert proc.returncode == 0 and "error" not in events[-1], text[-5000:]

    # Preemption notice: an emergency save, training went on until the node went.
    assert re.search(r"step \d+: preemption notice: emergency save to \S+step-\d+", text), \
        text[-5000:]
    worlds = [int(w) for w in re.findall(r"mesh:\s+world (\d+)", text)]
    assert worlds[0] == 2 and 1 in worlds and worlds[-1] == 2, worlds
    assert [e["event"] for e in events] == ["drain", "removed", "added", "grown", "finished"]
    assert re.findall(r"batch:\s+global (\d+)", text) == ["16"] * len(worlds)

    with open(out / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) < 1e-5

    # Each step's samples, from every attempt that ran it: the same global batch whatever
    # the world size, and over the run every sample id exactly once.
    by_step: dict[int, dict[tuple[int, int], list[int]]] = defaultdict(dict)
    for path in samples.iterdir():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            key = (entry["dp_degree"], entry["dp_rank"])
            seen = by_step[entry["step"]].setdefault(key, entry["ids"])
            assert seen == entry["ids"], f"step {entry['step']} rank {key} differs on redo"
    assert sorted(by_step) == list(range(1, STEPS + 1))
    trained = []
    for step in range(1, STEPS + 1):
        per_degree: dict[int, list[int]] = defaultdict(list)
        for (degree, _), ids in sorted(by_step[step].items()):
            per_degree[degree] += ids
        batches = {tuple(sorted(ids)) for ids in per_degree.values()}
        assert len(batches) == 1, f"step {step}: world sizes took different samples"
        trained += list(batches.pop())
    assert len(trained) == STEPS * 16 == len(set(trained))
    assert {d for s in by_step.values() for d, _ in s} == {1, 2}
