"""Parallelism degrees -> a validated DeviceMesh.

Mesh dims, outermost first: pp, dp_replicate, dp_shard, tp. TP is innermost so its
high-volume collectives stay within a node; PP is outermost since it moves the least data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from raytitan.config.job_config import ConfigError, Parallelism


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
        degrees = {"dp_replicate": self.dp_replicate, "tp": self.tp, "pp": self.pp}
        for name, value in degrees.items():
            if value < 1:
                raise ConfigError(f"{name} = {value} must be >= 1")
        others = self.dp_replicate * self.tp * self.pp
        if self.dp_shard == -1:
            if self.world_size % others:
                raise ConfigError(
                    f"world size {self.world_size} is not divisible by dp_replicate("
                    f"{self.dp_replicate}) * tp({self.tp}) * pp({self.pp}) = {others}, so "
                    "data_parallel_shard_degree = -1 cannot fill it"
                )
            self.dp_shard = self.world_size // others
        if self.dp_shard < 1:
            raise ConfigError(f"dp_shard = {self.dp_shard} must be >= 1 or -1")
        product = others * self.dp_shard
        if product != self.world_size:
            raise ConfigError(
                f"dp_replicate({self.dp_replicate}) * dp_shard({self.dp_shard}) * tp({self.tp})"
                f" * pp({self.pp}) = {product} != world size {self.world_size}"
            )

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
