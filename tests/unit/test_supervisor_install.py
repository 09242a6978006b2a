"""The supervisor's modules are installed into one directory that every sandbox mounts: a sandbox
starting while another's create installs them must read each module whole (old or new), never a
truncated one (an ImportError at PID 1's start, seen with two creates at once)."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from sandbox.lifecycle.create import install_file


def test_a_reader_sees_a_whole_file_while_it_is_reinstalled(tmp_path: Path) -> None:
    src, dest = tmp_path / "config.py", tmp_path / "supervisor" / "config.py"
    dest.parent.mkdir()
    versions = [f"X = {i}\n" * 20000 for i in range(40)]
    seen: set[int] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                seen.add(len(dest.read_bytes()))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for text in versions:
            src.write_text(text)
            install_file(src, dest)
    finally:
        stop.set()
        reader.join()
    assert seen <= {len(v) for v in versions}, sorted(seen)[:5]  # never a partial length
    assert dest.read_text() == versions[-1] and dest.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in dest.parent.iterdir()] == ["config.py"]  # no temporary left


def test_an_identical_file_is_left_alone(tmp_path: Path) -> None:
    src, dest = tmp_path / "init.py", tmp_path / "init-installed.py"
    src.write_text("print('hi')\n")
    install_file(src, dest)
    inode = dest.stat().st_ino
    install_file(src, dest)
    assert dest.stat().st_ino == inode  # not rewritten: nothing for a starting sandbox to race
