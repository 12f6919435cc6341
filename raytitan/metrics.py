"""Logging setup and per-step metrics: console (rank 0), metrics.jsonl, TensorBoard."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys

import torch

from raytitan.config.job_config import Metrics

logger = logging.getLogger("raytitan")

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is lower, set metrics.peak_flops for it
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}


def init_logging(rank: int) -> None:
    """One stdlib logger; rank 0 logs INFO, other ranks only warnings and errors."""
    level = logging.INFO if rank == 0 else logging.WARNING
    root = logging.getLogger("raytitan")
    root.setLevel(level)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(message)s",
                                               datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False


def peak_flops(cfg: Metrics, device: torch.device) -> float:
    """Peak FLOP/s of one device, or 0 when unknown (then MFU is not reported)."""
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16_FLOPS.items():
            if key in name:
                return value
        logger.warning("unknown GPU %r: set metrics.peak_flops to report MFU", name)
    return 0.0


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated, or the CPU peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def read_records(path: str) -> list[dict]:
    """The records of a metrics.jsonl, in file order.

    An unparsable last line is a record torn by a crash while it was written: it is dropped
    with a warning. An unparsable line anywhere else is damage this code did not make.

    Raises:
        ValueError: a line before the last is not a JSON object with a "step".
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not an object with an integer step")
        except ValueError as e:
            if number == len(lines):
                logger.warning("%s line %d is incomplete (a crash while writing it?): "
                               "dropped: %.80r", path, number, line)
                break
            raise ValueError(
                f"{path} line {number} is not a metrics record ({e}): {line[:80]!r}; fix or "
                "delete that line, or delete the file to start it afresh") from None
        records.append(record)
    return records


class MetricsLogger:
    """Writes one JSON object per logged step to <dump_folder>/metrics.jsonl (rank 0 only)."""

    def __init__(self, cfg: Metrics, dump_folder: str, run_name: str, *, enabled: bool,
                 resume_step: int = 0) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(dump_folder, exist_ok=True)
        self.path = os.path.join(dump_folder, "metrics.jsonl")
        # A fresh run starts a fresh file; a resumed one keeps the records up to the step it
        # resumed from (later ones are about to be recomputed) and appends.
        kept = []
        if resume_step and os.path.exists(self.path):
            kept = [json.dumps(record) + "\n" for record in read_records(self.path)
                    if record["step"] <= resume_step]
        self._jsonl = open(self.path, "w", buffering=1)
        self._jsonl.writelines(kept)
        if cfg.enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(dump_folder, "tb", run_name))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
        parts = [f"step {step:>6}", f"loss {values['loss']:.4f}",
                 f"grad_norm {values['grad_norm']:.3f}", f"lr {values['lr']:.2e}",
                 f"tok/s {values['tokens_per_sec']:,.0f}"]
        if "mfu" in values:
            parts.append(f"mfu {values['mfu']:.1%}")
        parts.append(f"mem {values['memory_gib']:.2f}GiB")
        parts.append(f"data_wait {values['data_wait_sec'] * 1e3:.1f}ms")
        if "eta_sec" in values:
            parts.append(f"eta {values['eta_sec']:.0f}s")
        logger.info("  ".join(parts))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
