"""Build a JobConfig from defaults <- TOML file <- `--section.key value` flags.

Unknown sections or keys and values of the wrong type fail here, before anything starts,
with the field, the value and the valid choices in the message.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import tomllib
from functools import cache
from typing import Any

from raytitan.config.job_config import ConfigError, JobConfig

_SECTIONS = {f.name: f for f in dataclasses.fields(JobConfig)}


def _section_cls(name: str) -> type:
    if name not in _SECTIONS:
        raise ConfigError(f"unknown config section [{name}]; valid sections: {sorted(_SECTIONS)}")
    return _SECTIONS[name].default_factory  # type: ignore[return-value]


def _fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(_section_cls(section))}


def _convert(where: str, type_name: str, value: Any) -> Any:
    """Convert a TOML or command-line value to the field's declared type."""
    from_cli = isinstance(value, str)
    if type_name == "bool":
        if isinstance(value, bool):
            return value
        if from_cli and value.lower() in ("true", "1", "yes", "on"):
            return True
        if from_cli and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where} = {value!r} is not a bool; use true or false")
    if type_name == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_cli:
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} = {value!r} is not an integer")
    if type_name == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_cli:
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} = {value!r} is not a number")
    if type_name == "str":
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} = {value!r} is not a string")
    if type_name == "list[str]":
        if from_cli:
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError(f"{where} = {value!r} is not a list of strings")
    raise TypeError(f"unsupported config field type {type_name} for {where}")


def build_job_config(overrides: dict[str, dict[str, Any]]) -> JobConfig:
    """Build a validated JobConfig from {section: {key: value}} on top of the defaults."""
    sections = {}
    for section, values in overrides.items():
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of key = value, got {values!r}")
        fields = _fields(section)
        kwargs = {}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(
                    f"unknown config key {section}.{key}; valid keys of [{section}]: "
                    f"{sorted(fields)}"
                )
            kwargs[key] = _convert(f"{section}.{key}", fields[key].type, value)
        sections[section] = _section_cls(section)(**kwargs)
    return JobConfig(**sections)


def parse_cli_overrides(argv: list[str]) -> dict[str, dict[str, Any]]:
    """Parse `--section.key value`, `--section.key=value` and bare `--section.bool_key`."""
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unexpected argument {arg!r}; expected --section.key value")
        name, has_eq, value = arg[2:].partition("=")
        section, _, key = name.partition(".")
        fields = _fields(section)
        if key not in fields:
            raise ConfigError(
                f"unknown config key {section}.{key}; valid keys of [{section}]: {sorted(fields)}"
            )
        if not has_eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if fields[key].type == "bool" and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None:
                raise ConfigError(f"--{name} needs a value")
            else:
                value = nxt
                i += 1
        out.setdefault(section, {})[key] = value
        i += 1
    return out


def load_job_config(config_path: str | None, cli_args: list[str] | None = None) -> JobConfig:
    """Defaults <- TOML file at `config_path` (if any) <- CLI overrides."""
    merged: dict[str, dict[str, Any]] = {}
    if config_path:
        try:
            with open(config_path, "rb") as f:
                merged = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {config_path!r} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {config_path!r} is not valid TOML: {e}") from None
    for section, values in parse_cli_overrides(cli_args or []).items():
        merged.setdefault(section, {}).update(values)
    return build_job_config(merged)


def to_dict(cfg: JobConfig) -> dict[str, dict[str, Any]]:
    """The config as plain {section: {key: value}} (TOML-serializable, picklable)."""
    return dataclasses.asdict(cfg)


def to_toml(cfg: JobConfig) -> str:
    """The resolved config as a TOML document that `load_job_config` reads back."""
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def redacted(cfg: JobConfig) -> JobConfig:
    """A copy safe to write into a checkpoint or a log: storage option values (endpoints,
    keys, tokens) replaced by <redacted>."""
    options = [f"{o.split('=', 1)[0]}=<redacted>" for o in cfg.checkpoint.storage_options]
    return dataclasses.replace(
        cfg, checkpoint=dataclasses.replace(cfg.checkpoint, storage_options=options))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal right after each field) of a dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def help_text() -> str:
    """Every config field with its type, default and docstring, for `--help`."""
    out = ["config fields (set in the TOML file or as --section.key value):", ""]
    defaults = JobConfig()
    for section in _SECTIONS:
        cls = _section_cls(section)
        docs = field_docs(cls)
        out.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            default = getattr(getattr(defaults, section), f.name)
            out.append(f"  --{section}.{f.name} ({f.type}, default {default!r})")
            for line in docs.get(f.name, "").splitlines():
                out.append(f"      {line}")
        out.append("")
    return "\n".join(out)
