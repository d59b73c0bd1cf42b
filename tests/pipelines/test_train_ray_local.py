"""scripts/ray_local.sh: a local Ray cluster on 127.0.0.1, started, used and stopped from a
non-interactive shell, leaving none of its processes behind (marked ``slow``: Ray starts in 15-30 s)."""

import ipaddress
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "ray_local.sh"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _script(command: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    # bash -c: a non-interactive shell without job control, as in cron, CI or ssh host command
    return subprocess.run(["bash", "-c", f"{SCRIPT} {command}"], env=env, capture_output=True, text=True, timeout=timeout)


def _session(leader: int) -> list[int]:
    """Live processes of the session whose leader is ``leader`` (zombies left out)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == leader and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, session
                pids.append(int(entry.name))
    return pids


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # /proc/net/tcp*: host-order words
    if len(words) == 4:
        return ipaddress.IPv4Address(words)
    address = ipaddress.IPv6Address(words)
    return address.ipv4_mapped or address


def _listening(pids: list[int]) -> set[str]:
    """The addresses the processes ``pids`` listen on (TCP)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                found.add(str(_address(fields[1].split(":")[0])))
    return found


@pytest.mark.slow
def test_start_connect_stop_leaves_nothing_and_binds_loopback_only():
    state = tempfile.mkdtemp(prefix="arl", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_LOCAL_DIR=state, RAY_LOCAL_PORT=str(port), RAY_LOCAL_CPUS="1", RAY_LOCAL_STORE_MB="100")
    leader = None
    try:
        assert _script("status", env).returncode == 3  # nothing started yet
        started = _script("start", env)
        assert started.returncode == 0, started.stdout + started.stderr + Path(state, "ray.log").read_text()
        assert f"RAY_ADDRESS=127.0.0.1:{port}" in started.stdout
        leader = int(Path(state, "head.pid").read_text())
        assert _script("start", env).stdout.startswith("already running")
        status = _script("status", env)
        assert status.returncode == 0 and status.stdout.startswith("running")
        addresses = _listening(_session(leader))
        assert addresses and all(ipaddress.ip_address(a).is_loopback for a in addresses), addresses

        job = "import ray; ray.init(); print(ray.get(ray.remote(lambda: 6 * 7).remote()), ray.nodes()[0]['NodeManagerAddress'])"
        connected = subprocess.run(
            [sys.executable, "-c", job],
            env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert connected.returncode == 0 and connected.stdout.split()[-2:] == ["42", "127.0.0.1"], connected.stderr[-3000:]
    finally:
        stopped = _script("stop", env)
    assert stopped.returncode == 0 and stopped.stdout.startswith("stopped"), stopped.stdout + stopped.stderr
    assert leader is not None and _session(leader) == []
    mine = [p for p in Path("/proc").iterdir() if p.name.isdigit() and state.encode() in _cmdline(p)]
    assert mine == []  # no process of this cluster left, under any session
    assert _script("status", env).returncode == 3
    assert _script("stop", env).stdout.startswith("not running")
    assert _script("restart", env).returncode == 2


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
