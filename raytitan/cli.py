"""`raytitan` command line: train | prepare | ckpt | convert."""

from __future__ import annotations

import argparse
import logging
import re
import sys

from raytitan.checkpoint.storage import CheckpointError
from raytitan.config import ConfigError, load_job_config
from raytitan.config.job_config import EXPORT_DTYPES
from raytitan.config.manager import help_text
from raytitan.metrics import init_logging

USAGE = """raytitan <command> [options]

commands:
  train    --config FILE [--dry-run] [--section.key value ...]   train on Ray
  prepare  --input PATH --output DIR [--tokenizer PATH]          tokenize a corpus
  ckpt     ls FOLDER | show STEP_DIR | verify STEP_DIR             inspect checkpoints
  convert  to-hf STEP_DIR OUT | from-hf HF_DIR OUT --flavor F | to-torch STEP_DIR OUT.pt
"""


def _train(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print("usage: raytitan train --config FILE [--dry-run] [--section.key value ...]\n")
        print(help_text())
        return 0
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a file path")
        config_path = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    cfg = load_job_config(config_path, argv)
    if dry_run:
        from raytitan.plan import build_plan

        plan = build_plan(cfg, cfg.ray.num_workers)
        print(f"dry run: {cfg.model.flavor} on {cfg.ray.num_workers} workers: OK")
        print(plan.describe())
        dims = plan.parallel_dims
        shards = dims.dp_shard * dims.tp * dims.pp
        # fp32 master weights + grads + 2 Adam moments = 16 bytes per parameter.
        state_gib = plan.model_args.num_params() * 16 / shards / 2**30
        print(f"memory: ~{state_gib:.1f} GiB per device of weights, grads and optimizer "
              "state (activations not included)")
        return 0
    from raytitan.launcher import launch

    launch(cfg)
    return 0


def _prepare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="raytitan prepare",
                                     description="Tokenize a corpus into token shards.")
    parser.add_argument("--input", required=True,
                        help="file, folder or glob of .txt/.md/.jsonl/.parquet (local or s3://)")
    parser.add_argument("--output", required=True, help="output folder (local or s3://)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json (or a folder with one); default: train a BPE")
    parser.add_argument("--vocab-size", type=int, default=2048,
                        help="vocabulary of the BPE trained when no tokenizer is given")
    parser.add_argument("--shard-tokens", type=int, default=32 * 2**20,
                        help="tokens per output shard (approximate)")
    parser.add_argument("--local", action="store_true",
                        help="tokenize in this process instead of a Ray Data pipeline")
    args = parser.parse_args(argv)
    kwargs = dict(tokenizer_path=args.tokenizer, vocab_size=args.vocab_size,
                  shard_tokens=args.shard_tokens)
    if args.local:
        from raytitan.data.prepare import prepare_local

        prepare_local(args.input, args.output, **kwargs)
    else:
        import ray

        from raytitan.config import JobConfig
        from raytitan.data.ray_io import prepare_ray
        from raytitan.launcher import init_ray

        init_ray(JobConfig())
        prepare_ray(args.input, args.output, **kwargs)
        ray.shutdown()
    return 0


def _ckpt(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="raytitan ckpt", description="Inspect checkpoints (local or s3://).")
    parser.add_argument("action", choices=["ls", "show", "verify"],
                        help="ls: the steps of a run folder (<checkpoint.folder>/<job.name>); "
                             "show: one step's contents; verify: sizes and CRC32s")
    parser.add_argument("path", help="run folder (ls) or step directory (show, verify)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec option for the filesystem, e.g. endpoint_url=...")
    args = parser.parse_args(argv)
    from raytitan.checkpoint import inspect

    if args.action == "ls":
        print(inspect.ls(args.path, args.storage_option))
    elif args.action == "show":
        print(inspect.show(args.path, args.storage_option))
    else:
        ok, message = inspect.verify(args.path, args.storage_option)
        print(message, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    return 0


def _convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="raytitan convert",
        description="Convert checkpoints: a committed step to a Hugging Face folder or one "
                    "torch file, or an HF folder to a model-only step (an initial_load_path).")
    sub = parser.add_subparsers(dest="action", required=True)
    to_hf = sub.add_parser("to-hf", help="step directory -> HF LlamaForCausalLM folder")
    to_hf.add_argument("step_dir", help="a committed step directory (local or s3://)")
    to_hf.add_argument("out", help="output folder (local or s3://; remote: written locally, "
                                   "then uploaded)")
    to_hf.add_argument("--flavor", default=None,
                       help="model flavor (default: the one the step records)")
    to_hf.add_argument("--dtype", default=None, choices=EXPORT_DTYPES,
                       help="dtype of the weights (default: as stored)")
    to_hf.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB",
                       help="largest safetensors file, in GB (default 5, as transformers)")
    to_hf.add_argument("--tokenizer", default=None,
                       help="tokenizer.json or a folder of tokenizer files (default: the "
                            "step's tokenizer/ assets)")
    from_hf = sub.add_parser("from-hf", help="HF folder -> model-only step directory")
    from_hf.add_argument("hf_dir", help="a local HF model folder (config.json + safetensors)")
    from_hf.add_argument("out", help="step directory <folder>/step-<N> to create, or a "
                                     "folder (then <folder>/step-0)")
    from_hf.add_argument("--flavor", required=True, help="the raytitan flavor it is")
    from_hf.add_argument("--dtype", default=None, choices=EXPORT_DTYPES,
                         help="dtype to store (default: as in the HF files)")
    to_torch = sub.add_parser("to-torch", help="step directory -> one torch.save file")
    to_torch.add_argument("step_dir", help="a step directory (local or s3://)")
    to_torch.add_argument("out", help="output .pt file (local or s3://)")
    to_torch.add_argument("--full", action="store_true",
                          help="everything (optimizer, train state, ...) nested by key, as "
                               "dcp_to_torch writes; default: the model only, flat")
    to_torch.add_argument("--dtype", default=None, choices=EXPORT_DTYPES,
                          help="dtype of the model's tensors (default: as stored)")
    for p in (to_hf, from_hf, to_torch):
        p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                       help="fsspec option for remote folders, e.g. endpoint_url=...")
    args = parser.parse_args(argv)

    from raytitan.checkpoint.storage import parse_storage_options
    from raytitan.interop import hf

    options = parse_storage_options(args.storage_option)
    if args.action == "to-hf":
        export = hf.HFExport.plan(args.step_dir, args.out, options=options, flavor=args.flavor,
                                  dtype=args.dtype,
                                  max_shard_bytes=int(args.max_shard_size * 1e9))
        tokenizer = (hf.read_tokenizer_files(args.tokenizer) if args.tokenizer
                     else hf.step_tokenizer_files(args.step_dir, options))
        if "tokenizer.json" not in tokenizer:
            logging.getLogger("raytitan").warning(
                "no tokenizer.json in %s/tokenizer or --tokenizer: exporting the model only",
                args.step_dir)
        written = export.run(tokenizer)
        total = sum(entry["size"] for entry in written.values())
        print(f"wrote {args.out}: {len(written)} files, {total / 1e6:.1f} MB, "
              f"{len(export.files)} safetensors file(s), {hf._dtype_name(export.dtype)}")
    elif args.action == "from-hf":
        step_url, manifest = hf.import_hf(args.hf_dir, args.out, flavor=args.flavor,
                                          options=options, dtype=args.dtype)
        total = sum(entry["size"] for entry in manifest["files"].values())
        print(f"wrote {step_url}: model only, {manifest['dtype']}, {total / 1e6:.1f} MB\n"
              f"start a run from it with --checkpoint.initial_load_path {step_url}")
    else:
        entry = hf.step_to_torch(args.step_dir, args.out, options=options,
                                 model_only=not args.full, dtype=args.dtype)
        print(f"wrote {args.out}: {entry['size'] / 1e6:.1f} MB "
              f"({'everything' if args.full else 'model only'})")
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    init_logging(rank=0)
    logging.getLogger("raytitan").setLevel(logging.INFO)
    commands = {"train": _train, "prepare": _prepare, "ckpt": _ckpt, "convert": _convert}
    if not argv or argv[0] not in commands:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    try:
        sys.exit(commands[argv[0]](argv[1:]))
    except (ConfigError, ValueError, KeyError, CheckpointError) as e:
        message = str(e)
    except OSError as e:
        # s3fs turns NoSuchBucket, AccessDenied, ... into OSErrors without a path
        message = str(e) if e.filename else _storage_error_message(e, argv[1:])
    except _storage_errors() as e:
        message = _storage_error_message(e, argv[1:])
    print(f"raytitan {argv[0]}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _storage_errors() -> tuple[type[Exception], ...]:
    """What the object store clients raise that is not an OSError: botocore's connection,
    credential and (untranslated) HTTP errors, aiohttp's (fsspec's http filesystem)."""
    import aiohttp
    import botocore.exceptions

    return botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, aiohttp.ClientError


def _storage_error_message(e: Exception, argv: list[str]) -> str:
    """'<the URLs on the command line>: <cause>; <what to check>'. The clients' messages
    name the request (an endpoint URL, a bucket) but not the path the user gave."""
    import aiohttp
    import botocore.exceptions as boto

    code = ((getattr(e, "response", None) or {}).get("Error") or {}).get("Code", "")
    if isinstance(e, (boto.ConnectionError, boto.HTTPClientError, aiohttp.ClientConnectionError,
                      ConnectionError, TimeoutError)):
        hint = ("cannot reach the storage endpoint: check that it is up and that endpoint_url "
                "(--storage-option, checkpoint.storage_options or AWS_ENDPOINT_URL) names it")
    elif isinstance(e, (boto.NoCredentialsError, boto.PartialCredentialsError)):
        hint = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    elif isinstance(e, PermissionError) or code in ("AccessDenied", "403", "Forbidden"):
        hint = "check the credentials and that they may access this bucket"
    elif isinstance(e, FileNotFoundError) or code in ("NoSuchBucket", "NoSuchKey", "404"):
        hint = "check the bucket name and the path (and endpoint_url, if set)"
    else:
        hint = ""
    # "s3://b/run" or "--checkpoint.folder=s3://b/run"; not "endpoint_url=http://..."
    urls = [m.group(2) for arg in argv
            if (m := re.match(r"(--[\w.]+=)?([a-z][a-z0-9+.-]*://.+)$", arg))]
    cause = str(e) or type(e).__name__
    return (f"{', '.join(urls)}: " if urls else "") + cause + (f"; {hint}" if hint else "")


if __name__ == "__main__":
    main()
