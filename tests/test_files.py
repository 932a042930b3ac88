"""core.files.FolderLock: one holder at a time, and a failed job leaves no empty folder it created."""

from __future__ import annotations

import pytest

from core.errors import TinyLMError
from core.files import LOCK_NAME, FolderLock


def test_a_failed_job_removes_the_empty_folder_it_created(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError), FolderLock(out, "job", create="output folder"):
        assert (out / LOCK_NAME).is_file()
        raise RuntimeError("the job failed")
    assert not out.exists()


def test_a_folder_that_existed_or_holds_output_is_kept(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(RuntimeError), FolderLock(existing, "job", create="output folder"):
        raise RuntimeError("failed")
    assert existing.is_dir()
    written = tmp_path / "written"
    with pytest.raises(RuntimeError), FolderLock(written, "job", create="output folder"):
        (written / "part").write_text("x")
        raise RuntimeError("failed")
    assert (written / "part").is_file()
    done = tmp_path / "done"
    with FolderLock(done, "job", create="output folder"):
        pass
    assert (done / LOCK_NAME).read_text() == ""  # released: names no holder


def test_a_second_holder_is_refused_in_one_line(tmp_path):
    with FolderLock(tmp_path, "pack"), pytest.raises(TinyLMError) as e, FolderLock(tmp_path, "pack"):
        pass
    assert "another pack" in str(e.value) and "\n" not in str(e.value)
    file = tmp_path / "a_file"
    file.write_text("")
    with pytest.raises(TinyLMError, match="not a folder"), FolderLock(file, "pack", create="output folder"):
        pass


def test_a_forked_child_does_not_keep_its_parents_lock(tmp_path):
    """The holder forks a child and dies without releasing: the folder is free at once, the child still alive."""
    import os
    import signal
    import time

    read, write = os.pipe()
    holder = os.fork()
    if holder == 0:  # the holder: take the lock, start a long-lived child, die without releasing
        os.close(read)
        FolderLock(tmp_path, "pack").__enter__()
        if os.fork() == 0:  # the child: it reports once it runs (after the fork hooks)
            os.write(write, f"{os.getpid()}\n".encode())
            time.sleep(30)
            os._exit(0)
        os._exit(0)
    os.close(write)
    child = int(os.read(read, 32).decode())
    os.close(read)
    os.waitpid(holder, 0)
    try:
        os.kill(child, 0)  # still running
        with FolderLock(tmp_path, "pack"):
            pass
    finally:
        os.kill(child, signal.SIGKILL)
