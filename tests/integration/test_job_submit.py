"""`ray job submit` of the debug job to a running cluster, exactly as a user does it: a head
started with `ray start --head`, the repo uploaded with `--working-dir`, `raytitan train` as
the entrypoint. The launcher must join that cluster (not start its own) and the job must
commit its checkpoints."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import BASE_OVERRIDES, ROOT, free_port, overrides_to_argv, read_losses

RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
# Every process of the head (and every worker and job driver it spawns) inherits this
# variable, set to the head's temp dir: teardown stops exactly those processes, not another
# Ray of the same user (which `ray stop` would).
MARKER = "RAYTITAN_TEST_RAY_HEAD"


def _head_pids(value: str, session: int) -> list[int]:
    """Processes in the session of `ray start` (the daemons), or carrying the marker (workers
    and job drivers, which leave that session). Both, because a process may rewrite its own
    environ with its title (Ray's agents do) or call setsid (Ray's workers do)."""
    entry = f"{MARKER}={value}".encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[0] == "Z":  # a zombie waits for its parent, it runs nothing
                continue
            if int(fields[3]) == session:
                pids.append(int(name))
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                if entry in f.read().split(b"\0"):
                    pids.append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    return pids


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _stop_head(value: str, session: int, grace_s: float = 5.0) -> list[int]:
    """Stop this head's processes the way `ray stop` does, in its order: the raylet (which
    takes its workers and agents with it), then the rest, then the GCS; SIGTERM, and SIGKILL
    after `grace_s`. Returns the pids still alive after that."""
    buckets = [lambda pid: _comm(pid) == "raylet",
               lambda pid: _comm(pid) != "gcs_server",
               lambda pid: True]
    for in_bucket in buckets:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            targets = [pid for pid in _head_pids(value, session) if in_bucket(pid)]
            for pid in targets:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + grace_s
            alive = set(targets)
            while alive and time.time() < deadline:
                time.sleep(0.1)
                alive &= set(_head_pids(value, session))
            if not alive:
                break
    return _head_pids(value, session)


def _get(url: str) -> tuple[int, str]:
    """(HTTP status, body) of a GET without credentials."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray on 127.0.0.1 with a dashboard (the job server) and token auth.

    The token is passed in the environment (RAY_AUTH_TOKEN) to the head and to every CLI call,
    so nothing reads or writes ~/.ray/auth_token."""
    if RAY is None or not sys.platform.startswith("linux"):
        pytest.skip("needs the `ray` CLI and /proc")
    # NOTE: short on purpose: Ray puts unix sockets at <temp-dir>/session_<date>_<pid>/sockets/
    # and a socket path may not exceed 107 bytes (pytest's tmp_path is too long).
    temp_dir = tempfile.mkdtemp(prefix="rtjob-", dir="/tmp")
    session = 0
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update({
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # else Ray binds a non-loopback address
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        # the job's entrypoint (`raytitan`) is found on the head's PATH
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        MARKER: temp_dir,
    })
    ports = set()
    while len(ports) < 9:
        ports.add(free_port())
    (gcs, dashboard, agent_http, agent_grpc, runtime_env_agent, metrics, object_manager,
     node_manager, client_server) = sorted(ports)
    cmd = [
        RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--dashboard-agent-listen-port", str(agent_http),
        "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env_agent),
        "--metrics-export-port", str(metrics),
        "--object-manager-port", str(object_manager),
        "--node-manager-port", str(node_manager),
        "--ray-client-server-port", str(client_server),
        # 2 train workers + Ray Data read tasks: with only the 2 real cores they deadlock
        "--num-cpus", "4",
        "--temp-dir", os.path.join(temp_dir, "ray"),
        "--disable-usage-stats",
    ]
    try:
        # its own session: the daemons it leaves behind are recognised by that session id
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, start_new_session=True)
        session = proc.pid
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, out[-6000:]
        url = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 60
        while True:
            try:
                status, body = _get(f"{url}/api/authentication_mode")
                if status == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "the dashboard did not come up in 60 s"
            time.sleep(0.5)
        assert json.loads(body)["authentication_mode"] == "token"
        yield {"env": env, "dashboard_url": url, "gcs_address": f"127.0.0.1:{gcs}"}
    finally:
        leftover = _stop_head(temp_dir, session) if session else []
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"Ray processes of the test head survived teardown: {leftover}"


def test_job_submit_debug_job_to_running_cluster(ray_head, tiny_dataset, tmp_path):
    from raytitan.checkpoint.storage import CheckpointStorage

    url = ray_head["dashboard_url"]
    # the job server really requires the token that the submit below carries
    assert _get(f"{url}/api/jobs/")[0] == 401

    dump = tmp_path / "dump"
    overrides = {**BASE_OVERRIDES, "data.path": tiny_dataset, "job.dump_folder": str(dump),
                 "training.steps": "20", "checkpoint.interval": "10"}
    # .git is excluded by Ray's defaults and .gitignore is honoured (outputs/, .venv/, caches):
    # the upload is the sources only, ~0.5 MB.
    cmd = [RAY, "job", "submit", "--address", url, "--working-dir", str(ROOT), "--",
           "raytitan", "train", "--config", "jobs/debug.toml", *overrides_to_argv(overrides)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ray_head["env"],
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-8000:]
    assert "succeeded" in output.lower(), output[-8000:]  # "Job 'raysubmit_...' succeeded"

    # the launcher joined this head ($RAY_ADDRESS, set by the job server) ...
    assert f"Connecting to existing Ray cluster at address: {ray_head['gcs_address']}" in output
    assert "starting a local Ray" not in output  # ... rather than starting its own

    storage = CheckpointStorage(str(dump / "checkpoint" / "debug"))
    assert storage.committed_steps() == [10, 20]  # keep_latest_k = 2 in jobs/debug.toml
    for step in (10, 20):
        assert (dump / "checkpoint" / "debug" / f"step-{step}" / "COMMIT.json").is_file()
    assert len(read_losses(dump)) == 20
