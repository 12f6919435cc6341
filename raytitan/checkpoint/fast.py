"""The fast tier: non-persistent checkpoints that survive a lost worker or a lost node in
seconds (Megatron's non_persistent_* options; docs/checkpointing.md "Tiers").

Each rank writes its own shards (plain local tensors, no resharding) to a folder of its
node: with torch.save (`local`, `global`), or, `in_memory`, as raw bytes copied straight from
the live tensors into a shared-memory file that outlives the process (no clone, no
serialization; a small pickled index says where each tensor lies). With `replication` it
also sends its file to `replication_factor - 1` ranks on other nodes, which keep it beside
their own. A step is complete when every rank has
written its file and its replicas (an all-reduce), and only then gets COMPLETE.json on
each node; older steps are deleted then. Recovery gathers what every rank can read, takes
the newest complete step that this mesh can load and that is newer than the persistent
choice, and sends each rank its file from the node that has it (own node first).

    <node dir>/step-<N>/rank-<R>.pt    rank R's state (on R's node, or a replica); .raw for
                                       in_memory
    <node dir>/step-<N>/COMPLETE.json  {step, lineage, world_size, mesh, algo, type}

The node dir is <non_persistent_local_ckpt_dir>/<node id> (local, in_memory) or the shared
non_persistent_global_ckpt_dir (global). Background work runs on its own gloo group
(one group used from two threads deadlocks; PLATFORM.md).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import pickle
import shutil
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from raytitan.checkpoint.state import StepContents, count_non_finite, rng_state
from raytitan.checkpoint.storage import CheckpointError
from raytitan.config.job_config import Checkpoint as CheckpointConfig

logger = logging.getLogger("raytitan")

COMPLETE = "COMPLETE.json"
# Test-only: ranks [k*n, (k+1)*n) form fake node k, so replication can be shown on one machine.
FAKE_RANKS_PER_NODE_ENV = "RAYTITAN_FAKE_RANKS_PER_NODE"
# Set by the Ray launcher: the Ray node id (loopback clusters share one hostname).
NODE_ID_ENV = "RAYTITAN_NODE_ID"
_SKIPPED = "__raytitan_replica_of_main__"
RAW_MAGIC = b"RTRAW\x00v1"  # an in_memory file: magic, index length (8 bytes), index, tensors
_ALIGN = 64


def node_id(rank: int) -> str:
    """This process's node: Ray's node id under Ray, a fake node in tests, else the host."""
    if per_node := os.environ.get(FAKE_RANKS_PER_NODE_ENV):
        return f"{socket.gethostname()}-fake{rank // int(per_node)}"
    return os.environ.get(NODE_ID_ENV) or socket.gethostname()


def replica_targets(nodes: list[str], factor: int, jump: int) -> dict[int, list[int]]:
    """rank -> the ranks that hold its replicas: r + k * jump (mod world), k = 1..factor-1,
    jump defaulting to the ranks per node. Raises CheckpointError if a target shares its
    node with the owner (then a lost node would take both)."""
    world = len(nodes)
    n_nodes = len(set(nodes))
    if n_nodes < factor:
        raise CheckpointError(
            f"checkpoint.replication_factor = {factor} needs that many nodes; this run has "
            f"{n_nodes} ({sorted(set(nodes))[:4]}): lower it, or set replication = false")
    jump = jump or nodes.count(nodes[0])
    targets = {r: [(r + k * jump) % world for k in range(1, factor)] for r in range(world)}
    for r, peers in targets.items():
        if len({nodes[r], *(nodes[p] for p in peers)}) < factor:
            raise CheckpointError(
                f"checkpoint.replication_jump = {jump}: rank {r} (node {nodes[r]}) would keep "
                f"its replicas on ranks {peers} (nodes {[nodes[p] for p in peers]}), not on "
                f"{factor - 1} other node(s); use the number of ranks per node")
    return targets


@dataclass
class FastChoice:
    step: int
    sources: dict[int, int]
    """owner rank -> the rank that reads its file (the owner itself when on its node)."""
    sizes: dict[int, int]


class FastTier:
    """One run's fast tier on this rank. Every method is called on every rank.

    Args:
        cfg: the [checkpoint] section.
        contents: this rank's owners of the step's keys.
        states: the non-model top-level keys (lr_scheduler, train_state, dataloader).
        lineage: the run id of the persistent folder (steps of other runs are never used).
        run_info: the mesh and world size recorded with each step.
        job: the job name (default local folder /dev/shm/raytitan/<job>).
        dump_folder: where a relative global folder lives.
        background: write in a background thread (an async_mode other than disabled).
    """

    def __init__(self, cfg: CheckpointConfig, contents: StepContents, *, lineage: str,
                 run_info: dict[str, Any], job: str, dump_folder: str, background: bool,
                 ) -> None:
        self.cfg = cfg
        self.contents = contents
        self.lineage = lineage
        self.mesh = run_info.get("mesh")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.pg = dist.new_group(backend="gloo")  # used by the background thread only
        self.ctrl = dist.new_group(backend="gloo")
        self.node = node_id(self.rank)
        self.nodes: list[str] = [""] * self.world_size
        dist.all_gather_object(self.nodes, self.node, group=self.ctrl)
        if cfg.non_persistent_ckpt_type == "global":
            folder = cfg.non_persistent_global_ckpt_dir
            self.dir = folder if os.path.isabs(folder) else os.path.join(dump_folder, folder)
        else:
            base = cfg.non_persistent_local_ckpt_dir or f"/dev/shm/raytitan/{job}"
            self.dir = os.path.join(base, self.node)
        self.targets: dict[int, list[int]] = {}
        if cfg.replication and len(set(self.nodes)) > 1:
            self.targets = replica_targets(self.nodes, cfg.replication_factor,
                                           cfg.replication_jump)
        elif cfg.replication:
            logger.info("checkpoint: one node, so the fast tier keeps no replicas")
        self.dedup = cfg.non_persistent_local_ckpt_algo == "fully_parallel"
        self.raw = cfg.non_persistent_ckpt_type == "in_memory"
        self._executor = ThreadPoolExecutor(1, "raytitan-fast-tier") if background else None
        self._staging: Future | None = None  # the copy of the in-flight save
        self._pending: tuple[int, Future] | None = None
        self.last_complete: int | None = None
        self.last_stall_sec = 0.0
        self.last_save_sec = 0.0
        self.last_save_time = time.monotonic()

    @property
    def survives_node_loss(self) -> bool:
        """A complete step outlives the loss of any one node (replicas, or shared storage)."""
        return bool(self.targets) or self.cfg.non_persistent_ckpt_type == "global"

    # -- saving -------------------------------------------------------------------------

    def save(self, step: int) -> None:
        """Copy this rank's state, then write and replicate it. With a background thread
        (async_mode other than disabled) the copy runs there too, overlapping the next
        forward/backward, and `wait_for_staging` holds the optimizer step until it is done;
        the stall is this call plus that wait. in_memory copies straight into its
        shared-memory file, so only replication and the commit follow. A failed fast-tier
        save is logged, never fatal."""
        self.wait()
        start = time.perf_counter()
        state = self._local(self._state())  # tensors as they are: `_stage` copies them
        self.last_save_time = time.monotonic()
        if self._executor is None:
            self._finish(step, self._write(step, self._stage(step, state), start))
            self.last_stall_sec = time.perf_counter() - start
            return
        self._staging = self._executor.submit(self._stage, step, state)
        self._pending = (step, self._executor.submit(self._write, step, self._staging, start))
        self.last_stall_sec = time.perf_counter() - start

    def wait_for_staging(self) -> None:
        """Block until the in-flight save has copied the state; call before the optimizer
        changes it."""
        if self._staging is not None:
            start = time.perf_counter()
            self._staging.result()  # _stage reports its errors instead of raising
            self._staging = None
            self.last_stall_sec += time.perf_counter() - start

    def poll(self) -> None:
        """Note a background save that has finished (no collective)."""
        if (self._pending is not None and self._staging is None
                and self._pending[1].done()):
            step, future = self._pending
            self._pending = None
            self._finish(step, future.result())

    def wait(self) -> None:
        self.wait_for_staging()
        if self._pending is not None:
            step, future = self._pending
            self._pending = None
            self._finish(step, future.result())

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()

    def _finish(self, step: int, outcome: tuple[bool, str, float]) -> None:
        ok, why, seconds = outcome
        if not ok:
            logger.warning("checkpoint: fast-tier save of step %d failed (%s); the newest "
                           "fast-tier step stays %s", step, why, self.last_complete)
            return
        self.last_complete, self.last_save_sec = step, seconds
        logger.info("checkpoint: fast tier holds step %d (%s%s) in %.3f s (training "
                    "blocked %.3f s)", step, self.dir,
                    f", {len(self.targets[self.rank])} replica(s) per rank" if self.targets
                    else "", seconds, self.last_stall_sec)

    def _state(self) -> dict[str, Any]:
        """What a fast-tier step holds: the same keys as a persistent one."""
        state: dict[str, Any] = {"model": self.contents.merged_state("model"),
                                 "optimizer": self.contents.merged_state("optimizer")}
        for key, obj in self.contents.states.items():
            state[key] = obj.state_dict()
        state["rng"] = {f"rank{self.rank}": rng_state()}
        return state

    def _local(self, value: Any) -> Any:
        """This rank's state as plain tensors (DTensors' local shards; replicated shards
        skipped but on their main replica when deduplicating), not copied; the other values
        copied (cheap, and they change as training goes on)."""
        if isinstance(value, DTensor):
            if self.dedup and not _is_main_replica(value):
                return _SKIPPED
            value = value.to_local()
        if isinstance(value, torch.Tensor):
            return value.detach()
        if isinstance(value, dict):
            return {k: self._local(v) for k, v in value.items()}
        return copy.deepcopy(value)

    def _stage(self, step: int, state: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
        """The copy of the live tensors, before the optimizer changes them: into the
        in_memory file (then nothing is returned), else a clone to write. Returns
        (snapshot, error). Runs before the optimizer step (which waits for it), so it also
        checks that the weights are finite: the ranks agree on every error in `_write`."""
        try:
            if bad := count_non_finite(t for t in state["model"].values()
                                       if isinstance(t, torch.Tensor)):
                return None, (f"rank {self.rank}: {bad} model tensor(s) hold non-finite "
                              "(NaN/inf) weights, so the step is not kept")
            if self.raw:
                self._prepare(step)
                _write_raw(self._path(step, self.rank), state)
                return None, ""
            return _clone_tensors(state), ""
        except Exception as e:
            return None, f"rank {self.rank}: {type(e).__name__}: {e}"

    def _write(self, step: int, staged: tuple[dict[str, Any] | None, str] | Future,
               start: float) -> tuple[bool, str, float]:
        """Write this rank's file (unless in_memory wrote it already), exchange replicas,
        agree that every rank did (on every rank, whatever failed, so no rank is left in a
        collective). `staged`: what `_stage` returned, or its future."""
        snapshot, error = staged.result() if isinstance(staged, Future) else staged
        size = -1
        try:
            if not error:
                if snapshot is not None:
                    self._prepare(step)
                    _write_file(self._path(step, self.rank), snapshot)  # straight to the file
                size = os.path.getsize(self._path(step, self.rank))
        except Exception as e:
            error = f"rank {self.rank}: {type(e).__name__}: {e}"
        del snapshot, staged
        if self.targets:
            sizes: list[int] = [0] * self.world_size
            dist.all_gather_object(sizes, -1 if error else size, group=self.pg)
            try:
                self._exchange(step, sizes)
            except Exception as e:
                error = error or f"rank {self.rank}: replication: {type(e).__name__}: {e}"
        flag = torch.tensor([1 if error else 0])
        dist.all_reduce(flag, group=self.pg)
        if int(flag[0]):
            return False, error or f"{int(flag[0])} rank(s) failed", 0.0
        marker = {"step": step, "lineage": self.lineage, "world_size": self.world_size,
                  "mesh": self.mesh, "algo": self.cfg.non_persistent_local_ckpt_algo,
                  "type": self.cfg.non_persistent_ckpt_type}
        _write_file(os.path.join(self._step_dir(step), COMPLETE), json.dumps(marker).encode())
        self._remove_older(step)
        return True, "", time.perf_counter() - start

    def _exchange(self, step: int, sizes: list[int]) -> None:
        """Send this rank's file to its replica holders; receive the files it holds."""
        requests, received = [], {}
        for owner, peers in self.targets.items():
            if sizes[owner] < 0:
                continue
            if owner == self.rank:
                payload = _file_tensor(self._path(step, owner), sizes[owner])
                requests += [dist.isend(payload, peer, group=self.pg) for peer in peers]
            elif self.rank in peers:
                received[owner] = torch.empty(sizes[owner], dtype=torch.uint8)
                requests.append(dist.irecv(received[owner], owner, group=self.pg))
        for request in requests:
            request.wait()
        if any(size < 0 for size in sizes):
            raise RuntimeError("a rank had nothing to send")
        for owner, payload in received.items():
            _write_file(self._path(step, owner), payload.numpy())

    def _prepare(self, step: int) -> None:
        os.makedirs(self._step_dir(step), exist_ok=True)

    def _remove_older(self, step: int) -> None:
        for name in _step_dirs(self.dir):
            if int(name.split("-")[1]) < step:
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.dir, f"step-{step}")

    def _path(self, step: int, owner: int) -> str:
        return os.path.join(self._step_dir(step), f"rank-{owner}{self._suffix}")

    @property
    def _suffix(self) -> str:
        return ".raw" if self.raw else ".pt"

    # -- recovery -----------------------------------------------------------------------

    def choose(self, persistent_step: int | None) -> FastChoice | None:
        """Collective: the newest complete fast-tier step this run can load, if it is newer
        than `persistent_step`; logs which tier recovery uses and why."""
        inventory = self._inventory()
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, inventory, group=self.ctrl)
        markers: dict[int, dict] = {}
        holders: dict[int, dict[int, list[tuple[int, int]]]] = {}  # step -> owner -> [(r, size)]
        for rank, (marks, files) in enumerate(gathered):
            markers.update(marks)
            for step, owners in files.items():
                for owner, size in owners.items():
                    holders.setdefault(step, {}).setdefault(owner, []).append((rank, size))
        reasons = []
        choice = None
        for step in sorted(markers, reverse=True):
            marker = markers[step]
            if marker["lineage"] != self.lineage:
                reasons.append(f"step {step} belongs to another run ({marker['lineage']})")
                continue
            if marker["world_size"] != self.world_size or marker["mesh"] != self.mesh:
                reasons.append(f"step {step} was saved on mesh {marker['mesh']} (world size "
                               f"{marker['world_size']}), this run has {self.mesh}")
                continue
            if marker["algo"] != self.cfg.non_persistent_local_ckpt_algo:
                reasons.append(f"step {step} was saved with algo {marker['algo']}")
                continue
            if (kind := marker.get("type", "local")) != self.cfg.non_persistent_ckpt_type:
                reasons.append(f"step {step} was saved with non_persistent_ckpt_type {kind}")
                continue
            owners = holders.get(step, {})
            lost = [r for r in range(self.world_size) if r not in owners]
            if lost:
                reasons.append(f"step {step}: no node holds the state of ranks {lost}")
                continue
            sources = {r: min(owners[r], key=lambda held: (held[0] != r, held[0]))
                       for r in range(self.world_size)}
            choice = FastChoice(step, {r: s[0] for r, s in sources.items()},
                                {r: s[1] for r, s in sources.items()})
            break
        why = "; ".join(reasons[:3])
        if choice is None:
            if markers and self.rank == 0:
                logger.warning("checkpoint: the fast tier holds nothing this run can resume "
                               "from (%s): using the persistent tier", why)
            return None
        if persistent_step is not None and persistent_step >= choice.step:
            if self.rank == 0:
                logger.info("checkpoint: persistent step %d is at least as new as fast-tier "
                            "step %d: resuming from the persistent tier", persistent_step,
                            choice.step)
            return None
        return choice

    def load(self, choice: FastChoice, request: dict[str, Any]) -> dict[str, str]:
        """Collective: fill `request` (the state structure, tensors in place) from the chosen
        step; returns {rank: tier it came from} for the log."""
        step = choice.step
        requests, received = [], None
        for owner, source in sorted(choice.sources.items()):
            if source == self.rank != owner:
                payload = _file_tensor(self._path(step, owner), choice.sizes[owner])
                requests.append((dist.isend(payload, owner, group=self.ctrl), payload))
            elif owner == self.rank != source:
                received = torch.empty(choice.sizes[owner], dtype=torch.uint8)
                requests.append((dist.irecv(received, source, group=self.ctrl), received))
        for transfer, _ in requests:  # each with its tensor, alive until the transfer is done
            transfer.wait()
        if received is None and self.raw:  # its own node's file, mapped: views, no copy
            saved = _read_raw(_file_tensor(self._path(step, self.rank), choice.sizes[self.rank]))
        elif received is None:  # memory-mapped (no copy until _fill)
            saved = torch.load(self._path(step, self.rank), mmap=True, weights_only=False)
        elif self.raw:
            saved = _read_raw(received)
        else:
            saved = torch.load(io.BytesIO(memoryview(received.numpy())), weights_only=False)
        saved = {key: value for key, value in saved.items() if key in request}
        _fill(request, saved)
        if self.dedup:
            _broadcast_replicas(request, saved)
        self.last_complete = step
        return {owner: ("own node" if source == owner else f"replica on rank {source} "
                        f"(node {self.nodes[source]})")
                for owner, source in choice.sources.items()}

    def cleanup_after_choice(self, keep: int | None) -> None:
        """Delete this node's fast-tier steps other than `keep` (stale, foreign, partial)."""
        for name in _step_dirs(self.dir):
            if keep is None or int(name.split("-")[1]) != keep:
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)

    def _inventory(self) -> tuple[dict[int, dict], dict[int, dict[int, int]]]:
        markers, files = {}, {}
        for name in _step_dirs(self.dir):
            step = int(name.split("-")[1])
            folder = os.path.join(self.dir, name)
            try:
                with open(os.path.join(folder, COMPLETE)) as f:
                    markers[step] = json.load(f)
            except (OSError, ValueError):
                pass
            for entry in os.listdir(folder):
                if entry.startswith("rank-") and entry.endswith(self._suffix):
                    owner = int(entry[5:-len(self._suffix)])
                    files.setdefault(step, {})[owner] = os.path.getsize(
                        os.path.join(folder, entry))
        return markers, files


def _is_main_replica(value: DTensor) -> bool:
    """The one rank of a replicated shard that writes it: coordinate 0 on every mesh dim
    the tensor is replicated over."""
    coords = value.device_mesh.get_coordinate()
    return all(coords[d] == 0 for d, p in enumerate(value.placements) if isinstance(p, Replicate))


def _broadcast_replicas(request: dict[str, Any], saved: dict[str, Any]) -> None:
    """Send each skipped replicated shard from its main replica, one replicated mesh dim at
    a time (after dim d, every rank whose later replicated coordinates are 0 has it)."""
    def walk(target: Any, source: Any) -> None:
        if isinstance(target, dict):
            for key in target:
                walk(target[key], source[key])
            return
        if not isinstance(target, DTensor):
            return
        mesh = target.device_mesh
        for dim, placement in enumerate(target.placements):
            if isinstance(placement, Replicate):
                group = mesh.get_group(dim)
                dist.broadcast(target.to_local(), dist.get_process_group_ranks(group)[0],
                               group=group)

    walk(request, saved)


def _fill(target: dict[str, Any], saved: dict[str, Any], where: str = "") -> None:
    """Copy saved values into `target`: tensors in place, other values replaced. Every
    tensor of `target` must be in `saved` (the weights are not initialized before a load)."""
    absent = [key for key, value in target.items()
              if key not in saved and isinstance(value, (torch.Tensor, dict))]
    if absent:
        raise CheckpointError(f"the fast-tier state lacks {where}{absent[:3]}, which this "
                              "run holds (a damaged or foreign file)")
    for key, value in saved.items():
        if key not in target:
            raise CheckpointError(f"fast-tier state has {key!r}, which this run lacks")
        current = target[key]
        if isinstance(value, dict) and isinstance(current, dict):
            _fill(current, value, f"{where}{key}.")
        elif isinstance(value, str) and value == _SKIPPED:
            continue  # a replicated shard, sent by its main replica
        elif isinstance(current, torch.Tensor):
            local = current.to_local() if isinstance(current, DTensor) else current
            local.copy_(value)
        else:
            target[key] = value


def _clone_tensors(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone_tensors(v) for k, v in value.items()}
    return value


def _step_dirs(folder: str) -> list[str]:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted((n for n in names if n.startswith("step-") and n[5:].isdigit()),
                  key=lambda n: int(n[5:]))


def _file_tensor(path: str, size: int) -> torch.Tensor:
    """A file's bytes as a uint8 tensor, memory-mapped (a send reads them from the page)."""
    return torch.from_file(path, shared=False, size=size, dtype=torch.uint8)


class _TensorAt:
    """Where a tensor lies in an in_memory file (the index holds these in its place)."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> None:
        self.dtype, self.shape, self.offset = dtype, shape, offset


def _write_raw(path: str, state: dict[str, Any]) -> None:
    """in_memory: copy every tensor of `state` straight into a file mapped in shared memory
    (one copy, no serialization); the rest of the structure is a pickled index in front.
    Written under a temporary name and renamed, whole or not at all."""
    tensors: list[torch.Tensor] = []
    end = [0]

    def place(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: place(v) for k, v in value.items()}
        if not isinstance(value, torch.Tensor):
            return value
        at = _TensorAt(value.dtype, tuple(value.shape), end[0])
        tensors.append(value)
        end[0] += -(-value.numel() * value.element_size() // _ALIGN) * _ALIGN
        return at

    index = pickle.dumps(place(state))
    head = -(-(len(RAW_MAGIC) + 8 + len(index)) // _ALIGN) * _ALIGN
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.truncate(head + end[0])
    mapped = torch.from_file(tmp, shared=True, size=head + end[0], dtype=torch.uint8)
    header = RAW_MAGIC + len(index).to_bytes(8, "little") + index
    mapped[:len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
    offset = head
    for tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        mapped[offset:offset + size].view(tensor.dtype).view(tensor.shape).copy_(tensor)
        offset += -(-size // _ALIGN) * _ALIGN
    del mapped  # unmapped: the file holds the bytes
    os.replace(tmp, path)


def _read_raw(data: torch.Tensor) -> dict[str, Any]:
    """An in_memory file's state from its bytes (a mapped file or a received buffer): every
    tensor a view into `data`, nothing copied."""
    raw = data.numpy()
    if raw[:len(RAW_MAGIC)].tobytes() != RAW_MAGIC:
        raise CheckpointError(f"not an in_memory fast-tier file (magic "
                              f"{raw[:len(RAW_MAGIC)].tobytes()!r}, expected {RAW_MAGIC!r})")
    length = int.from_bytes(raw[len(RAW_MAGIC):len(RAW_MAGIC) + 8].tobytes(), "little")
    start = len(RAW_MAGIC) + 8
    head = -(-(start + length) // _ALIGN) * _ALIGN
    index = pickle.loads(raw[start:start + length].tobytes())

    def view(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: view(v) for k, v in value.items()}
        if not isinstance(value, _TensorAt):
            return value
        size = value.dtype.itemsize * int(torch.Size(value.shape).numel())
        offset = head + value.offset
        return data[offset:offset + size].view(value.dtype).view(value.shape)

    return view(index)


def _write_file(path: str, data: Any) -> None:
    """Write whole or not at all: a temporary name, fsync, rename. `data`: bytes, a buffer
    (a numpy array), or a state to torch.save."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        if isinstance(data, dict):
            torch.save(data, f)
        else:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
