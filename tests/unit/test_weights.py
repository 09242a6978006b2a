"""Model weights on disk without a Hub: what counts as present (a complete snapshot, a local
directory), what does not (interrupted, truncated, superseded, missing), the room a plan needs
and the disk check. Downloads: tests/integration/test_weights_download.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from appliance.errors import PreflightError, exit_code_for
from appliance.packaging.weights import (
    GIB,
    HEADROOM_BYTES,
    check_disk,
    checksums_path,
    is_hub_id,
    required_bytes,
    weights_status,
    with_headroom,
)
from hardware.catalog import model_table, variant_by_id
from hardware.plan_types import ServingPlan

MODEL = "acme/tiny-llm"
COMMIT = "a" * 40
FILES = {"config.json": b'{"model_type": "tiny"}', "model.safetensors": os.urandom(4096)}


def make_snapshot(models: Path, *, record: bool = True) -> Path:
    """The Hugging Face cache layout as huggingface_hub writes it: blobs named by their hash,
    relative links to them from snapshots/<commit>/, refs/main naming the commit."""
    repo = models / "hf" / "hub" / "models--acme--tiny-llm"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    rows = {}
    for name, data in FILES.items():
        sha256 = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / sha256).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", sha256))
        rows[name] = {"sha256": sha256, "size": len(data), "blob": sha256}
    if record:
        path = checksums_path(models, MODEL)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"model": MODEL, "commit": COMMIT, "files": rows}))
    return snapshot


# ---------------------------------------------------------------------------- the Hub's layout


def test_a_complete_snapshot_with_its_checksums_is_present(tmp_path: Path) -> None:
    snapshot = make_snapshot(tmp_path / "models")
    status = weights_status(tmp_path / "models", MODEL)
    assert status.present and status.path == snapshot
    assert "2 files" in status.detail and "commit aaaaaaaaaaaa" in status.detail


@pytest.mark.parametrize("damage", ["missing", "truncated", "link gone"])
def test_a_damaged_snapshot_is_not_present(tmp_path: Path, damage: str) -> None:
    snapshot = make_snapshot(tmp_path / "models")
    blob = (snapshot / "model.safetensors").resolve()
    if damage == "missing":
        blob.unlink()
    elif damage == "truncated":  # what a cut transfer would leave if it were renamed in place
        blob.write_bytes(FILES["model.safetensors"][:100])
    else:
        (snapshot / "model.safetensors").unlink()
    status = weights_status(tmp_path / "models", MODEL)
    assert not status.present and status.path is None
    assert "incomplete: 1 of 2 files, e.g. model.safetensors" in status.detail


def test_an_interrupted_download_with_no_listing_or_checksums_is_not_present(
    tmp_path: Path,
) -> None:
    make_snapshot(tmp_path / "models", record=False)  # every file there, nothing recorded
    status = weights_status(tmp_path / "models", MODEL)
    assert not status.present and "no file listing or checksums recorded" in status.detail


def test_a_newer_commit_half_fetched_is_not_present(tmp_path: Path) -> None:
    """refs/main names what vLLM loads offline: the recorded commit is no longer it."""
    make_snapshot(tmp_path / "models")
    (tmp_path / "models/hf/hub/models--acme--tiny-llm/refs/main").write_text("b" * 40)
    assert not weights_status(tmp_path / "models", MODEL).present


def test_nothing_downloaded(tmp_path: Path) -> None:
    status = weights_status(tmp_path / "models", MODEL)
    assert (status.present, status.path) == (False, None)
    assert "not downloaded" in status.detail and str(tmp_path / "models") in status.detail


def test_a_record_that_is_not_json_counts_as_none(tmp_path: Path) -> None:
    make_snapshot(tmp_path / "models")
    checksums_path(tmp_path / "models", MODEL).write_text("{not json")
    assert not weights_status(tmp_path / "models", MODEL).present


# ---------------------------------------------------------------------------- local directories


def test_a_local_directory_with_config_and_weights_is_present(tmp_path: Path) -> None:
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text("{}")
    (local / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 1024)
    status = weights_status(tmp_path / "models", str(local))
    assert status.present and status.path == local
    assert status.detail.startswith(f"local directory {local}: 1 weight files")


@pytest.mark.parametrize("what", ["no dir", "no config", "no weights"])
def test_an_incomplete_local_directory_is_not_present(tmp_path: Path, what: str) -> None:
    local = tmp_path / "my-model"
    if what != "no dir":
        local.mkdir()
        (local / "tokenizer.json").write_text("{}")
        if what == "no weights":
            (local / "config.json").write_text("{}")
    status = weights_status(tmp_path / "models", str(local))
    assert not status.present and status.path is None
    expected = {"no dir": "does not exist", "no config": "no config.json"}
    assert expected.get(what, "no weight files") in status.detail


@pytest.mark.parametrize(
    ("model", "hub"),
    [
        ("nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-NVFP4", True),
        ("acme/tiny.llm_v2-1", True),
        ("acme/../../etc", False),  # never a path under the cache
        ("../acme/x", False),
        ("acme/x/y", False),
        ("/srv/models/x", False),
        ("acme", False),
        ("acme/x y", False),
    ],
)
def test_what_is_a_hub_id(model: str, hub: bool) -> None:
    assert is_hub_id(model) is hub


def test_a_hostile_model_name_stays_out_of_the_cache(tmp_path: Path) -> None:
    make_snapshot(tmp_path / "models")
    status = weights_status(tmp_path / "models", "acme/../hf/hub")
    assert not status.present and "does not exist" in status.detail


# ---------------------------------------------------------------------------- room


def plan_for(variant_id: str, model: str | None = None) -> ServingPlan:
    variant = variant_by_id(variant_id)
    assert variant is not None
    return ServingPlan(
        backend=variant.backend,
        variant=variant_id,
        model=model or variant.hf_id,
        served_model_name="nemotron",
        max_model_len=4096,
        max_num_seqs=1,
    )


@pytest.mark.parametrize("variant", [v.id for v in model_table() if v.backend == "vllm"])
def test_required_bytes_is_the_variants_checkpoint(variant: str) -> None:
    gib = variant_by_id(variant).weights_gib  # type: ignore[union-attr]
    assert required_bytes(plan_for(variant)) == int(gib * GIB)


def test_required_bytes_of_super_nvfp4() -> None:
    assert required_bytes(plan_for("super-nvfp4")) == int(69.85 * 1024**3)


def test_required_bytes_is_unknown_for_an_overridden_model() -> None:
    assert required_bytes(plan_for("super-nvfp4", model="acme/my-finetune")) is None
    assert required_bytes(plan_for("super-nvfp4", model="/srv/models/x")) is None


def test_the_disk_check_passes_with_room(tmp_path: Path) -> None:
    check_disk(tmp_path, 1024 * 1024)
    free = shutil.disk_usage(tmp_path).free
    margin = 256 * 1024 * 1024  # others write to this disk meanwhile
    need = int((free - margin - HEADROOM_BYTES) / 1.03)
    assert with_headroom(need) < free - margin // 2
    check_disk(tmp_path, need)


def test_the_disk_check_refuses_in_one_line_with_the_fix(tmp_path: Path) -> None:
    models = tmp_path / "not" / "yet" / "models"  # measured at the nearest existing parent
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(PreflightError) as caught:
        check_disk(models, free)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("not enough disk space for the model weights: need ")
    assert re.search(
        rf"need [\d.]+ GiB in {re.escape(str(models))}, have [\d.]+ GiB free$", message
    )
    assert "models_dir" in caught.value.hint and str(tmp_path) in caught.value.hint
    assert exit_code_for(caught.value) == 6
    assert not models.exists()  # checking creates nothing


def test_headroom_grows_with_the_model() -> None:
    assert with_headroom(0) == HEADROOM_BYTES
    assert with_headroom(100 * GIB) > 102 * GIB
