"""Nothing the CLI starts outlives it: a watchdog process that, once the CLI is gone (an exit, a crash, `kill -9`),
ends every process started under it, the temporary Prefect server, Dask workers and benchmark processes included.
They are found by a token in their environment, which every child inherits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

TOKEN_VARIABLE = "SQUEEZEFLOW_SESSION"
POLL_S = 0.5
GRACE_S = 5.0  # between SIGTERM and SIGKILL


def guard_children() -> None:
    """Marks this process's environment with a fresh token and starts the watchdog that will end every process that
    inherited it once this one is gone. Call it before starting anything. Linux only (it reads /proc)."""
    if not Path("/proc/self/environ").exists():
        return
    token = uuid.uuid4().hex
    os.environ[TOKEN_VARIABLE] = token
    subprocess.Popen(
        [sys.executable, "-m", __name__, str(os.getpid()), token],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C in the terminal reaches the CLI, not the watchdog, which cleans up after it
    )


def carriers(token: str) -> list[int]:
    """The processes (but this one) whose environment holds the token."""
    marker = f"{TOKEN_VARIABLE}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def end(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + GRACE_S
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
            time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def watch(parent: int, token: str) -> None:
    # the parent's death re-parents this process: a pid the parent had cannot be mistaken for a new process
    while os.getppid() == parent:
        time.sleep(POLL_S)
    end(carriers(token))


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
