"""Processes: pack's workers die with its main process and hold no lock, so a re-run after ``kill -9`` of
the main process proceeds; a pack that stops with an error prints one line and nothing at exit, every time."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO

from core.procs import die_with_parent

PACK = [sys.executable, str(REPO / "preprocess" / "pack.py")]
ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def children(pid: int) -> set[int]:
    """The pids whose parent is ``pid`` (read from /proc: psutil is not a dependency)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Some thread of ``pid`` is not yet a zombie (a killed process's files, its locks among them, are released
    only when its last thread has exited)."""
    try:
        tasks = list((Path("/proc") / str(pid) / "task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            if (task / "stat").read_text().rpartition(")")[2].split()[0] not in ("Z", "X"):
                return True
        except OSError:
            continue
    return False


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def pretrain_input(path: Path, records: int) -> Path:
    with path.open("w") as f:
        for i in range(records):
            f.write(json.dumps({"text": f"record {i}: " + "the quick brown fox jumps over the lazy dog. " * 8}) + "\n")
    return path


def test_kill_9_of_packs_main_process_leaves_no_worker_and_no_lock(tmp_path):
    src = pretrain_input(tmp_path / "big.jsonl", 30_000)
    out = tmp_path / "packed"
    argv = [*PACK, "--stage", "pretrain", "--input", str(src), "--out", str(out), "--seq-len", "64",
            "--shard-tokens", "20000", "--workers", "2", "--quiet"]
    main = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert wait_for(lambda: (out / "shard_00001.json").exists(), 60), "the pack never got going"
        workers = children(main.pid)
        assert len(workers) >= 2, workers
        assert main.poll() is None, "the pack finished before it could be killed: make the input bigger"
        os.kill(main.pid, signal.SIGKILL)  # the main process only, as the OOM killer does
        main.wait()
        assert wait_for(lambda: not any(alive(w) for w in workers), 10), "a worker outlived its parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(main.pid, signal.SIGKILL)
    rerun = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "another pack" not in rerun.stderr
    assert json.loads((out / "meta.json").read_text())["counts"]["records_read"] == 30_000


def test_a_pack_that_stops_with_an_error_prints_one_line_every_time(tmp_path):
    """The error path with a worker pool, several packs at once: exactly one line on stderr each time (no
    ``Exception ignored in ... concurrent/futures`` at exit)."""
    src = pretrain_input(tmp_path / "bad.jsonl", 3_000)
    with src.open("a") as f:
        f.write("not json\n")
    runs = 0
    deadline = time.monotonic() + 14
    while time.monotonic() < deadline and runs < 24:
        procs = [subprocess.Popen([*PACK, "--stage", "pretrain", "--input", str(src), "--out",
                                   str(tmp_path / f"out{runs + i}"), "--seq-len", "64", "--workers", "2", "--quiet"],
                                  env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(3)]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 1
            assert len(err.splitlines()) == 1 and err.startswith("pack.py: error: "), err
            assert f"{src}:3001:" in err
        runs += 3
    assert runs >= 6


def test_die_with_parent_exits_a_child_whose_parent_is_already_gone():
    pid = os.fork()
    if pid == 0:  # the child: its parent is not the (made-up) expected one
        die_with_parent(parent=os.getppid() + 10**6)
        os._exit(0)  # not reached
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 1


RANK_SCRIPT = """
import sys, time
sys.path.insert(0, {repo!r})
from core.files import FolderLock
from train import dist
info = dist.setup("cpu")
if info.is_main:
    FolderLock({out!r}, "training run", create="run folder").__enter__()
    print("locked", flush=True)
time.sleep(120)
"""


def test_kill_9_of_a_torchrun_agent_leaves_no_rank_and_no_lock(tmp_path):
    import pytest

    from core.files import FolderLock

    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this python")
    out = tmp_path / "run"
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(repo=str(REPO), out=str(out)))
    agent = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script)], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        ready, _, _ = select.select([agent.stdout], [], [], 120)
        assert ready and agent.stdout.readline().strip() == "locked", "the ranks never started"
        ranks = children(agent.pid)
        assert len(ranks) == 2, ranks
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        assert wait_for(lambda: not any(alive(r) for r in ranks), 10), "a rank outlived its torchrun agent"
        with FolderLock(out, "training run"):
            pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent.pid, signal.SIGKILL)
