"""Parallelism degrees -> a validated DeviceMesh.

Mesh dims, outermost first: pp, dp_replicate, dp_shard, tp. TP is innermost so its
high-volume collectives stay within a node; PP is outermost since it moves the least data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from raytitan.config.job_config import ConfigError, Parallelism

# Mesh dim -> the [parallelism] field that sets it (errors name the field).
CONFIG_FIELDS = {
    "dp_replicate": "data_parallel_replicate_degree",
    "dp_shard": "data_parallel_shard_degree",
    "tp": "tensor_parallel_degree",
    "pp": "pipeline_parallel_degree",
}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int
    _mesh: DeviceMesh | None = field(default=None, repr=False)
    _dp_mesh: DeviceMesh | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for dim in ("dp_replicate", "tp", "pp"):
            if getattr(self, dim) < 1:
                raise ConfigError(f"parallelism.{CONFIG_FIELDS[dim]} = {getattr(self, dim)} "
                                  "must be >= 1")
        if self.dp_shard < 1 and self.dp_shard != -1:
            raise ConfigError(f"parallelism.data_parallel_shard_degree = {self.dp_shard} must "
                              "be >= 1, or -1 (whatever the world size leaves)")
        others = self.dp_replicate * self.tp * self.pp
        if self.dp_shard == -1:
            if self.world_size % others:
                raise ConfigError(
                    f"parallelism.data_parallel_replicate_degree ({self.dp_replicate}) * "
                    f"tensor_parallel_degree ({self.tp}) * pipeline_parallel_degree ({self.pp})"
                    f" = {others} must divide world size {self.world_size} for "
                    f"data_parallel_shard_degree = -1 to fill it; {self._valid_choices()}")
            self.dp_shard = self.world_size // others
        product = others * self.dp_shard
        if product != self.world_size:
            raise ConfigError(
                f"parallelism.data_parallel_replicate_degree ({self.dp_replicate}) * "
                f"data_parallel_shard_degree ({self.dp_shard}) * tensor_parallel_degree "
                f"({self.tp}) * pipeline_parallel_degree ({self.pp}) = {product} != world size "
                f"{self.world_size}; {self._valid_choices()}")

    def _valid_choices(self) -> str:
        """For each degree, the values that would fit the world with the others as set."""
        world = self.world_size
        degrees = {dim: getattr(self, dim) for dim in CONFIG_FIELDS}
        parts = []
        for dim in CONFIG_FIELDS:
            rest = math.prod(v for d, v in degrees.items() if d != dim and v != -1)
            if world % rest:
                continue
            if degrees["dp_shard"] == -1 or dim == "dp_shard":
                # data_parallel_shard_degree = -1 takes what is left: any divisor fits
                choices = ([-1, world // rest] if dim == "dp_shard"
                           else _divisors(world // rest))
            else:
                choices = [world // rest]
            parts.append(f"valid {CONFIG_FIELDS[dim]} values for world size {world}: {choices}")
        return "; ".join(parts) or (f"each degree must divide world size {world}: "
                                    f"{_divisors(world)}")

    @classmethod
    def from_config(cls, cfg: Parallelism, world_size: int) -> ParallelDims:
        return cls(
            dp_replicate=cfg.data_parallel_replicate_degree,
            dp_shard=cfg.data_parallel_shard_degree,
            tp=cfg.tensor_parallel_degree,
            pp=cfg.pipeline_parallel_degree,
            world_size=world_size,
        )

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different batches are processed per micro-step."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Create the world mesh, with a flattened "dp" dim (for data loading, loss averaging)."""
        names = ("pp", "dp_replicate", "dp_shard", "tp")
        shape = (self.pp, self.dp_replicate, self.dp_shard, self.tp)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        self._dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        self._mesh = mesh
        return mesh

    @property
    def dp_mesh(self) -> DeviceMesh:
        """All data-parallel ranks as one dim (replicate x shard)."""
        if self._dp_mesh is None:
            raise RuntimeError("call build_mesh() first")
        return self._dp_mesh

    @property
    def mesh(self) -> DeviceMesh:
        if self._mesh is None:
            raise RuntimeError("call build_mesh() first")
        return self._mesh

    def mesh_shape(self) -> dict[str, int]:
        return {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard,
                "tp": self.tp}

    def describe(self) -> str:
        return (
            f"world {self.world_size} = pp {self.pp} x dp_replicate {self.dp_replicate} x "
            f"dp_shard {self.dp_shard} x tp {self.tp}"
        )
