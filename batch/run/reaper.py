"""Leave no Ray behind: a watchdog process that ends an embedded Ray once the driver that started it is gone.

A driver killed with SIGKILL runs no cleanup, and some of the processes its embedded Ray started (the
dashboard and runtime-env agents) outlive it. :func:`start` launches this module as a small separate
process (its own session, so a Ctrl-C to the driver's terminal does not end it first) that:

1. holds the read end of a pipe whose write end only the driver holds: the read returns (EOF) the moment
   the driver exits, however it exits;
2. meanwhile records, every second, the driver's Ray processes (``/proc``: pid, start time): its descendants
   whose command line names the driver's private Ray temp dir (GCS, raylet, monitors) and everything below
   them (the agents and workers, whose process titles no longer name it), since orphans are re-parented
   once the driver dies and the tree can no longer be walked; other children of the driver are not Ray's
   and are left alone;
3. on EOF ends the recorded processes that still run (same pid *and* start time, so a reused pid is never
   hit) and every process whose command line names the temp dir: SIGTERM, then SIGKILL after a grace
   period; then removes that temp dir.

Linux only (``/proc``); elsewhere :func:`start` returns None and Ray's own cleanup is all there is. Only PIDs
are signalled, never names: other Ray instances on the machine are untouched.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time


def start(driver_pid: int, temp_dir: str) -> subprocess.Popen | None:
    """Launch the watchdog for ``driver_pid`` (this process) and its Ray ``temp_dir``; None off Linux."""
    if not os.path.isdir("/proc"):
        return None
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "batch.run.reaper", str(driver_pid), temp_dir],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True, env=env)
    return proc  # the driver keeps proc.stdin open until it exits


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _tree() -> tuple[dict[int, list[int]], dict[int, int]]:
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for pid in _pids():
        st = _stat(pid)
        if st is not None:
            children.setdefault(st[0], []).append(pid)
            starts[pid] = st[1]
    return children, starts


def _below(roots: list[int], children: dict[int, list[int]]) -> list[int]:
    found, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every process below ``root`` (pure reading of ``/proc``)."""
    children, starts = _tree()
    return {p: starts[p] for p in _below([root], children) if p in starts}


def ray_processes(driver_pid: int, temp_dir: str) -> dict[int, int]:
    """{pid: start time} of the Ray processes a driver started: its descendants naming ``temp_dir``, and all
    that runs below those (step 2 of the module docstring)."""
    children, starts = _tree()
    roots = [p for p in _below([driver_pid], children) if temp_dir in _cmdline(p)]
    return {p: starts[p] for p in roots + _below(roots, children) if p in starts}


def survivors(recorded: dict[int, int], temp_dir: str, me: int) -> list[int]:
    """The recorded descendants still running (same start time), and processes naming ``temp_dir``."""
    alive = []
    for pid in _pids():
        if pid == me:
            continue
        st = _stat(pid)
        if st is None:
            continue
        if recorded.get(pid) == st[1] or (temp_dir and temp_dir in _cmdline(pid)):
            alive.append(pid)
    return alive


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def watch(driver_pid: int, temp_dir: str, grace_s: float = 5.0) -> None:
    """Steps 1-3 of the module docstring (runs in the watchdog process)."""
    import select

    me = os.getpid()
    recorded: dict[int, int] = {}
    fd = sys.stdin.fileno()
    while True:  # 1-2: record the tree until the driver's pipe closes
        recorded.update(ray_processes(driver_pid, temp_dir))
        readable, _, _ = select.select([fd], [], [], 1.0)
        if readable and not os.read(fd, 4096):
            break
    recorded.pop(me, None)
    # 3: the driver is gone; what it started must go too
    pids = survivors(recorded, temp_dir, me)
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        time.sleep(0.2)
        pids = survivors({p: recorded[p] for p in pids if p in recorded}, temp_dir, me)
    _signal_all(pids, signal.SIGKILL)
    if temp_dir and os.path.basename(temp_dir).startswith("sdbatch-ray-"):
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(sys.argv[1]), sys.argv[2])
