from raytitan.config.job_config import ConfigError, JobConfig
from raytitan.config.manager import (
    build_job_config,
    load_job_config,
    redacted,
    to_dict,
    to_toml,
)

__all__ = ["ConfigError", "JobConfig", "build_job_config", "load_job_config", "redacted",
           "to_dict", "to_toml"]
