"""shared.atomic: a write replaces the whole file or nothing, and durably (fsync, rename, fsync dir)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from shared import atomic


def test_write_text_replaces_the_file_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "LATEST"
    atomic.write_text(path, "1\n")
    atomic.write_text(path, "2\n")
    assert path.read_text() == "2\n"
    assert os.listdir(tmp_path) == ["LATEST"]


def test_missing_folders_are_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "x.bin"
    atomic.write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


def test_write_json_round_trips_with_a_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    atomic.write_json(path, {"rounds": 3, "eps": [1.5, 2.0]})
    assert json.loads(path.read_text()) == {"rounds": 3, "eps": [1.5, 2.0]}
    assert path.read_text().endswith("}\n")


def test_unserialisable_json_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    atomic.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic.write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["config.json"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic.replacing(path) as tmp:
            tmp.write_bytes(b"half of the new")
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.pt"]


def test_a_failing_fsync_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "summary.json"
    atomic.write_json(path, {"v": 1})

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic.write_json(path, {"v": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["summary.json"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the fsynced descriptors")
def test_the_temporary_is_fsynced_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        steps.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        steps.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    path = tmp_path / "LATEST"
    atomic.write_text(path, "7\n")

    assert [s[0] for s in steps] == ["fsync", "replace", "fsync"]
    temporary = Path(steps[0][1])
    assert temporary.parent == tmp_path and temporary.name.startswith("LATEST.") and temporary.suffix == ".tmp"
    assert steps[1] == ("replace", str(path))
    assert steps[2] == ("fsync", str(tmp_path))


def test_permissions_are_those_of_a_plain_write(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("x")
    path = tmp_path / "atomic"
    atomic.write_text(path, "x")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_torch_save_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "features-abc.pt"
    atomic.torch_save({"w": torch.arange(3.0)}, path)
    assert torch.equal(torch.load(path)["w"], torch.arange(3.0))
    assert os.listdir(tmp_path) == ["features-abc.pt"]
