"""Searches (a discrete one, DNAS on two workers) submitted as jobs to a real Ray cluster
(`ray start --head`), as a user would; one cluster serves the module's tests.

The cluster gets its own ports and its own --temp-dir, so it collides with no other Ray on
the machine (another test's `ray.init()`, a user's cluster), and is stopped by its own
processes only: `ray stop` would stop every Ray on the machine.
"""

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import SYNTHETIC_SPACE

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"),
                       reason="finds the cluster's processes in /proc"),
]

JOB_TIMEOUT_S = 180
STOP_GRACE_S = 10  # per stage of stopping the cluster
CLUSTER_PORTS = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port",
                 "object-manager-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")


def nas_command(*args: str) -> list[str]:
    """The `nas` console script of this environment (or `python -m nas`) with `args`."""
    nas = Path(sys.executable).parent / "nas"
    return ([str(nas)] if nas.is_file() else [sys.executable, "-m", "nas"]) + list(args)


def run_job(dashboard: str, entrypoint: str) -> tuple[str, str]:
    """Submits `entrypoint` as a Ray job, waits for it (stopping it after JOB_TIMEOUT_S),
    asserts it succeeded and returns its job id and logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    job = client.submit_job(entrypoint=entrypoint)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = client.get_job_status(job)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job)
    logs = client.get_job_logs(job)
    if not status.is_terminal():
        client.stop_job(job)
        status = f"still {status.value} after {JOB_TIMEOUT_S} s (stopped)"
    assert status == JobStatus.SUCCEEDED, f"job {job}: {status}; its logs:\n{logs}"
    return client.get_job_info(job).job_id, logs


def free_ports(n: int) -> list[int]:
    """n distinct ports free now (held together, so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------- processes, from /proc

def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, command line) of every process."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if fields[0] == "Z":
            continue  # a zombie: dead already, waiting for its parent
        procs[int(entry)] = (int(fields[1]), int(fields[3]), cmdline)
    return procs


def cluster_processes(sessions: set[int], marks: list[re.Pattern]) -> dict[int, str]:
    """The cluster's live processes, pid -> command line: those in its sessions (`ray start`
    ran in a new one, so the daemons it leaves, workers included, share it) or whose command
    line names its temp dir or GCS address, and every descendant of those (a job's driver
    runs in a session of its own). Adds the sessions they lead to `sessions`, so that one
    orphaned later is still found."""
    procs = _processes()
    mine = {os.getpid(), *_ancestors(os.getpid(), procs)}
    ours = {pid for pid, (_, sid, cmd) in procs.items()
            if sid in sessions or any(m.search(cmd) for m in marks)} - mine
    while True:
        more = {pid for pid, (ppid, _, _) in procs.items() if ppid in ours} - ours - mine
        if not more:
            break
        ours |= more
    sessions |= {pid for pid in ours if procs[pid][1] == pid}
    return {pid: procs[pid][2] for pid in ours}


def _ancestors(pid: int, procs) -> set[int]:
    found = set()
    while pid in procs and procs[pid][0] not in found and procs[pid][0] > 0:
        pid = procs[pid][0]
        found.add(pid)
    return found


def _stage(cmd: str) -> int:
    """As `ray stop` goes: the raylet first, the GCS last (stopped at the same time, the
    others wait on each other for seconds)."""
    return 0 if "/raylet/raylet " in cmd else 2 if "/gcs/gcs_server " in cmd else 1


def stop_cluster(sessions: set[int], marks: list[re.Pattern]) -> dict[int, str]:
    """Stop the cluster's processes, in `ray stop`'s order: SIGTERM, then SIGKILL to what is
    left after a grace period. Returns those still alive after that (none, normally)."""
    for stage in (0, 1, 2, 3):
        sig = signal.SIGTERM if stage < 3 else signal.SIGKILL
        pids = {pid for pid, cmd in cluster_processes(sessions, marks).items()
                if _stage(cmd) <= stage}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + STOP_GRACE_S
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids &= set(cluster_processes(sessions, marks))
    return cluster_processes(sessions, marks)


# ---------------------------------------------------------------- the cluster

@pytest.fixture(scope="module")
def ray_cluster(ray_address):
    """A one-node Ray cluster of 2 CPUs, started with `ray start --head` on ports of its own,
    for this module's jobs; yields (GCS port, dashboard URL). Stopped, only it, however the
    tests end. The test session's own Ray (conftest's, in this process) is up before it
    starts and must still answer after it stops: the cluster must not take its place, and
    stopping the cluster must not stop it."""
    pytest.importorskip("ray.job_submission")
    ray_cli = Path(sys.executable).parent / "ray"
    if not ray_cli.is_file():
        pytest.skip(f"no ray command next to {sys.executable}")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # for the job client here too
        yield from _cluster(ray_cli)
    import ray

    assert ray.get(ray.remote(lambda: 1).remote(), timeout=60) == 1, \
        "the session's Ray stopped with the cluster"


def _cluster(ray_cli: Path):
    """`ray_cluster`'s start, yield and stop."""
    # Short: Ray's unix sockets live under it (and their paths are limited to ~107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="raytest-", dir="/tmp")
    ports = dict(zip(CLUSTER_PORTS, free_ports(len(CLUSTER_PORTS))))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           # as after activating the environment: a job's driver finds `nas` on its PATH
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    command = [str(ray_cli), "start", "--head", "--num-cpus", "2", "--num-gpus", "0",
               "--disable-usage-stats", "--temp-dir", temp_dir, "--dashboard-host", "127.0.0.1",
               "--object-store-memory", str(100 * 2**20),
               # workers on ports the OS picks (the default is a fixed range, 10002-19999)
               "--min-worker-port", "0", "--max-worker-port", "0",
               *(arg for name, port in ports.items() for arg in (f"--{name}", str(port)))]
    sessions: set[int] = set()
    marks = [re.compile(re.escape(temp_dir)), re.compile(rf":{ports['port']}\b")]
    try:
        # A session of its own: every daemon `ray start` leaves running stays in it.
        start = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        sessions.add(start.pid)
        output, _ = start.communicate(timeout=120)
        assert start.returncode == 0, f"ray start failed:\n{output}"
        yield ports["port"], f"http://127.0.0.1:{ports['dashboard-port']}"
    finally:
        survivors = stop_cluster(sessions, marks)
        if not survivors:
            shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, "processes of the test's Ray cluster survived: " + ", ".join(
            f"{pid} {cmd[:120]}" for pid, cmd in survivors.items())


def test_search_runs_as_a_job_on_a_ray_cluster(ray_cluster, tmp_path):
    from ray.util.state import list_actors

    from nas.plan import Plan
    from nas.spaces import load_space

    gcs_port, dashboard = ray_cluster
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SYNTHETIC_SPACE))
    runs = tmp_path / "runs"
    search = nas_command("--runs-dir", str(runs), "search", "--method", "random", "--space",
                         str(space), "--budget", "3trials", "--train-budget", "1ep",
                         "--ray-address", "auto", "--no-progress")
    job_id, logs = run_job(dashboard, f"echo RAY_ADDRESS=$RAY_ADDRESS && {shlex.join(search)}")

    # Its driver was given this cluster's GCS address, which --ray-address auto reads.
    (address,) = re.findall(r"^RAY_ADDRESS=(.*)$", logs, re.M)
    assert re.fullmatch(rf"[\w.-]+:{gcs_port}", address), logs
    (folder,) = runs.iterdir()
    assert not folder.name.endswith(".partial"), logs
    assert f"plan file: {folder / 'plan.yaml'}" in logs, logs

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["trials"] == 3 and summary["failed_trials"] == 0, summary
    plan = Plan.load(folder / "plan.yaml").resolved(load_space(space))
    assert plan.provenance["trials"] == 3
    rows = (folder / "trials.csv").read_text().splitlines()
    header, body = rows[0].split(","), [r.split(",") for r in rows[1:]]
    assert len(body) == 3 and all(r[header.index("node")] for r in body), rows

    # The trials ran on this cluster: its state holds the job's trial actors.
    actors = list_actors(address=dashboard, limit=1000, raise_on_missing_output=False)
    assert any(a.job_id == job_id and "ImplicitFunc" in a.class_name for a in actors), \
        f"no trial actor of job {job_id} on the cluster: {actors}"


def test_dnas_on_workers_as_a_ray_job(ray_cluster, tmp_path):
    _, dashboard = ray_cluster
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SYNTHETIC_SPACE))
    runs = tmp_path / "runs"
    search = nas_command("--runs-dir", str(runs), "search", "--method", "dnas", "--space",
                         str(space), "--budget", "1ep", "--samples", "0", "--workers", "2",
                         "--ray-address", "auto", "--no-progress")
    _, logs = run_job(dashboard, shlex.join(search))
    (folder,) = runs.iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["steps"] == 4, summary  # 512 images, batch 128
    assert re.search(rf"^plan file: {re.escape(str(folder / 'plan.yaml'))}$", logs, re.M), logs
    assert (folder / "supernet.pt").is_file()
