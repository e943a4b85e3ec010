from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from server.checkpoint import (
    COMPLETE_FILE,
    LATEST_FILE,
    PARAMETERS_FILE,
    Checkpoint,
    CheckpointError,
    checkpoints_dir,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    round_dir_name,
    save_checkpoint,
)
from shared.run_files import CHECKPOINTS_DIR

CONFIG: dict[str, bool | int | float | str] = {
    "num-server-rounds": 5,
    "dp": True,
    "noise-multiplier": 1.1,
    "target-delta": 1e-5,
    "strategy": "fedadam",
}


def make(round_: int, *, seed: int = 0) -> Checkpoint:
    rng = np.random.default_rng(seed + round_)
    # Key order deliberately not alphabetical: it must survive the round trip.
    parameters: dict[str, np.ndarray] = {
        "heads.ctr.weight": rng.standard_normal((4, 8)).astype(np.float32),
        "encoder.layer.1.bias": rng.standard_normal(8).astype(np.float32),
        "adapter.scale": np.array(np.float64(rng.standard_normal())),
        "counts": rng.integers(0, 100, size=(3,), dtype=np.int64),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 5), dtype=np.float16),
    }
    # Bit patterns float == cannot see: signed zero and a NaN with a payload.
    parameters["heads.ctr.weight"][0, :3] = [-0.0, np.nan, np.inf]
    parameters["heads.ctr.weight"].view(np.uint32)[0, 1] = 0x7FC0BEEF
    return Checkpoint(
        round=round_,
        parameters=parameters,
        config=dict(CONFIG),
        extra={"strategy": "fedadam", "t": round_, "history": [0.1, 0.2]},
        extra_arrays={"m.heads.ctr.weight": np.full((4, 8), 0.5, np.float32)},
    )


def assert_same(a: Checkpoint, b: Checkpoint) -> None:
    assert a.round == b.round and a.config == b.config and a.extra == b.extra
    for mine, theirs in ((a.parameters, b.parameters), (a.extra_arrays, b.extra_arrays)):
        assert list(mine) == list(theirs)  # same keys, same order
        for key in mine:
            assert mine[key].dtype == theirs[key].dtype and mine[key].shape == theirs[key].shape
            assert mine[key].tobytes() == theirs[key].tobytes(), key  # bit-identical


def latest_text(run_dir: Path) -> str:
    return (checkpoints_dir(run_dir) / LATEST_FILE).read_text()


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    original = make(7)
    path = save_checkpoint(tmp_path, original)
    assert path == tmp_path / CHECKPOINTS_DIR / "round-0007"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [COMPLETE_FILE, PARAMETERS_FILE, "extra_arrays.safetensors", "checkpoint.json"]
    )
    assert latest_text(tmp_path).strip() == "7"
    loaded = load_latest(tmp_path)
    assert loaded is not None
    assert_same(loaded, original)
    assert isinstance(loaded.config["dp"], bool) and isinstance(loaded.config["num-server-rounds"], int)
    loaded.parameters["counts"][0] = -1  # loaded arrays are ordinary writable arrays


def test_without_extra(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, Checkpoint(round=0, parameters={"w": np.ones(3)}, config={}))
    loaded = load_latest(tmp_path)
    assert loaded is not None and loaded.round == 0
    assert loaded.extra == {} and loaded.extra_arrays == {}


def test_empty_or_missing_run_dir_returns_none(tmp_path: Path) -> None:
    assert load_latest(tmp_path) is None
    assert load_latest(tmp_path / "does-not-exist") is None
    checkpoints_dir(tmp_path).mkdir()
    assert load_latest(tmp_path) is None
    assert list_checkpoints(tmp_path) == []


def test_latest_follows_saves(tmp_path: Path) -> None:
    for round_ in (1, 2, 3):
        save_checkpoint(tmp_path, make(round_))
        assert latest_text(tmp_path).strip() == str(round_)
        loaded = load_latest(tmp_path)
        assert loaded is not None and loaded.round == round_


def test_leftover_tmp_and_incomplete_dirs_are_ignored(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make(2))
    root = checkpoints_dir(tmp_path)
    # A crash mid-save: a full-looking temp dir of a later round (not yet renamed) ...
    shutil.copytree(root / "round-0002", root / "round-0004.tmp-99999")
    # ... and a round dir without its COMPLETE marker (written last, so never finished).
    shutil.copytree(root / "round-0002", root / "round-0003")
    (root / "round-0003" / COMPLETE_FILE).unlink()
    os.remove(root / LATEST_FILE)  # force the fallback scan
    # ... and LATEST's temporary file from shared.atomic, killed before its rename.
    (root / f"{LATEST_FILE}.0123abcd.tmp").write_text("4\n")

    loaded = load_latest(tmp_path)
    assert loaded is not None and loaded.round == 2
    assert list_checkpoints(tmp_path) == [2]
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(root / "round-0003")

    # The next save clears leftovers of interrupted saves.
    save_checkpoint(tmp_path, make(5))
    assert not (root / "round-0004.tmp-99999").exists()
    assert not (root / f"{LATEST_FILE}.0123abcd.tmp").exists()


def test_latest_pointing_to_missing_dir_falls_back(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make(1))
    save_checkpoint(tmp_path, make(2))
    root = checkpoints_dir(tmp_path)
    (root / LATEST_FILE).write_text("9\n")
    loaded = load_latest(tmp_path)
    assert loaded is not None and loaded.round == 2
    (root / LATEST_FILE).write_text("garbage")
    loaded = load_latest(tmp_path)
    assert loaded is not None and loaded.round == 2


def test_latest_wins_over_a_higher_uncommitted_round(tmp_path: Path) -> None:
    # Crash after round 3's dir was renamed into place but before LATEST moved: LATEST is
    # the commit point, so round 2 is what was committed.
    save_checkpoint(tmp_path, make(2))
    save_checkpoint(tmp_path, make(3))
    (checkpoints_dir(tmp_path) / LATEST_FILE).write_text("2\n")
    loaded = load_latest(tmp_path)
    assert loaded is not None and loaded.round == 2


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make(1))
    path = save_checkpoint(tmp_path, make(2))
    data = bytearray((path / PARAMETERS_FILE).read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last array's data
    (path / PARAMETERS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)
    loaded = load_latest(tmp_path)
    assert loaded is not None and loaded.round == 1


def test_pruning_keeps_last_n_and_latest(tmp_path: Path) -> None:
    for round_ in range(1, 7):
        save_checkpoint(tmp_path, make(round_), keep_last=2)
    assert list_checkpoints(tmp_path) == [5, 6]
    # Saving an older round (e.g. resuming from it on purpose) keeps it: LATEST names it.
    save_checkpoint(tmp_path, make(3), keep_last=2)
    assert list_checkpoints(tmp_path) == [3, 5, 6]
    assert latest_text(tmp_path).strip() == "3"
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, make(8), keep_last=0)


def test_resaving_a_round_replaces_it(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make(4, seed=1))
    replacement = make(4, seed=2)
    save_checkpoint(tmp_path, replacement)
    loaded = load_latest(tmp_path)
    assert loaded is not None
    assert_same(loaded, replacement)
    assert sorted(p.name for p in checkpoints_dir(tmp_path).iterdir()) == [LATEST_FILE, "round-0004"]


def test_failed_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make(1))
    bad = Checkpoint(round=2, parameters={"w": np.ones(2)}, config={}, extra={"x": object()})
    with pytest.raises(TypeError):  # extra is not JSON: fails while writing the temp dir
        save_checkpoint(tmp_path, bad)
    assert sorted(p.name for p in checkpoints_dir(tmp_path).iterdir()) == [LATEST_FILE, "round-0001"]
    loaded = load_latest(tmp_path)
    assert loaded is not None and loaded.round == 1


def test_validation(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="nested"):
        save_checkpoint(tmp_path, Checkpoint(round=1, parameters={}, config={"nested": [1]}))  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="numpy"):
        save_checkpoint(tmp_path, Checkpoint(round=1, parameters={"w": [1.0]}, config={}))  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="round"):
        save_checkpoint(tmp_path, Checkpoint(round=-1, parameters={}, config={}))


def test_manifest_is_plain_json(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, make(1))
    manifest = json.loads((path / "checkpoint.json").read_text())
    assert manifest["round"] == 1 and manifest["config"] == CONFIG
    assert manifest["parameter_names"][0] == "heads.ctr.weight"
    assert round_dir_name(12345) == "round-12345"
