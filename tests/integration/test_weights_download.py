"""Model weights fetched from a real stand-in of the Hugging Face Hub (a server process,
tests/fixtures/hf_hub_server.py, speaking the HTTP API huggingface_hub 2.4.0 uses): the files
vLLM needs land in the HF cache layout with checksums and readable permissions; a cut transfer
is resumed; gated, unknown, refused-token and unreachable hubs are one line and a fix each, and
leave nothing that counts as present."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from huggingface_hub import constants as hub_constants

from appliance.errors import NotFoundError, PreflightError, exit_code_for
from appliance.packaging import weights
from appliance.packaging.hub_errors import (
    GatedModelError,
    HubTokenRefusedError,
    HubUnreachableError,
    ModelNotOnHubError,
    WeightsCorruptError,
)
from appliance.packaging.weights import (
    bytes_on_disk,
    checksums_path,
    download,
    hub_cache,
    repo_folder,
    verify,
    weights_status,
)
from tests.helpers import free_port

pytestmark = [pytest.mark.integration]

SERVER = Path(__file__).parents[1] / "fixtures" / "hf_hub_server.py"
MODEL = "acme/tiny-llm"
MIB = 1024 * 1024
# What vLLM needs of the repo; the rest (a README, a .bin copy, the original checkpoint) is not
# fetched.
WANTED = {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}
NOT_WANTED = {"README.md", "pytorch_model.bin", "original/consolidated.pth"}
SHARD = "model-00001-of-00002.safetensors"
# huggingface_hub writes a transfer in 10 MiB chunks (DOWNLOAD_CHUNK_SIZE): a cut loses what
# came after the last whole chunk, and a resume asks for the rest from there.
CHUNK = 10 * MIB


def make_repo(root: Path, shard_mib: int) -> Path:
    root.mkdir(parents=True)
    for name in WANTED | NOT_WANTED:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith((".safetensors", ".bin", ".pth")):
            path.write_bytes(os.urandom((shard_mib if name == SHARD else 1) * MIB))
        else:
            path.write_text(json.dumps({"name": name}))
    return root


@dataclass
class Hub:
    url: str
    repos: dict[str, Path]

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/_stats", timeout=5).json()

    def served(self, name: str, repo: str = MODEL) -> int:
        return int(self.stats()["bytes"].get(f"{repo}/{name}", 0))

    def commit(self, repo: str = MODEL) -> str:
        return httpx.get(f"{self.url}/api/models/{repo}", timeout=5).json()["sha"]


@contextmanager
def running_hub(
    tmp_path: Path, repos: dict[str, dict[str, Any]], shard_mib: int = 3, **spec: Any
) -> Iterator[Hub]:
    dirs = {}
    for repo_id, options in repos.items():
        dirs[repo_id] = make_repo(tmp_path / "hub-repos" / repo_id, shard_mib)
        options["dir"] = str(dirs[repo_id])
    spec_file = tmp_path / "hub-spec.json"
    spec_file.write_text(json.dumps({"repos": repos, **spec}))
    port = free_port()
    env = {**os.environ, "HUB_SPEC": str(spec_file)}
    proc = subprocess.Popen([sys.executable, str(SERVER), str(port)], env=env)
    hub = Hub(f"http://127.0.0.1:{port}", dirs)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                hub.stats()
                break
            except httpx.TransportError:
                assert proc.poll() is None, "the hub stand-in exited"
                assert time.monotonic() < deadline, "the hub stand-in did not come up"
                time.sleep(0.05)
        yield hub
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(autouse=True)
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Online, no token from this machine: the library reads these once, at import."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))


def snapshot_of(models_dir: Path, commit: str) -> Path:
    return hub_cache(models_dir) / repo_folder(MODEL) / "snapshots" / commit


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "\n" not in (getattr(exc, "hint", "") or ""), text
    return text


# ---------------------------------------------------------------------------- a download


def test_download_fetches_what_vllm_needs_with_checksums_and_open_permissions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    with running_hub(tmp_path, {MODEL: {}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        old_umask = os.umask(0o077)  # a root service's umask: the image's uid must still read
        try:
            path = download(MODEL, models, progress=False)
        finally:
            os.umask(old_umask)
        commit = hub.commit()
        assert path == snapshot_of(models, commit)
        got = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
        assert got == WANTED
        for name in WANTED:
            assert (path / name).read_bytes() == (hub.repos[MODEL] / name).read_bytes()
        for name in NOT_WANTED:
            assert hub.served(name) == 0

        record = json.loads(checksums_path(models, MODEL).read_text())
        assert record["commit"] == commit and set(record["files"]) == WANTED
        for name, row in record["files"].items():
            data = (hub.repos[MODEL] / name).read_bytes()
            assert row["sha256"] == hashlib.sha256(data).hexdigest()
            assert row["size"] == len(data)

        for root, dirs, files in os.walk(models / "hf"):
            for d in dirs:
                assert stat.S_IMODE(os.lstat(Path(root, d)).st_mode) == 0o755, Path(root, d)
            for f in files:
                mode = os.lstat(Path(root, f)).st_mode
                if not stat.S_ISLNK(mode):
                    assert stat.S_IMODE(mode) == 0o644, Path(root, f)
        assert stat.S_IMODE(models.stat().st_mode) == 0o755

        status = weights_status(models, MODEL)
        assert status.present and status.path == path
        assert "8 files" in status.detail and "checksums recorded" in status.detail
        assert verify(models, MODEL) == []
        assert bytes_on_disk(models, MODEL) == sum(
            (hub.repos[MODEL] / name).stat().st_size for name in WANTED
        )

        before = hub.stats()
        assert download(MODEL, models, progress=False) == path  # present: the Hub is not asked
        assert hub.stats() == before


def test_weights_already_present_are_opened_up_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights a bundle, `hf download` or a umask 077 left root-only: the present path opens
    them up (the image's uid reads them), this repo's files only."""
    models = tmp_path / "models"
    with running_hub(tmp_path, {MODEL: {}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        path = download(MODEL, models, progress=False)
    other = hub_cache(models) / "models--acme--other"
    other.mkdir(mode=0o700)
    (other / "secret").write_text("x")
    (other / "secret").chmod(0o600)
    for root, dirs, files in os.walk(models):
        for name in dirs:
            os.chmod(Path(root, name), 0o700)
        for name in files:
            if not Path(root, name).is_symlink():
                os.chmod(Path(root, name), 0o600)
    models.chmod(0o700)
    assert download(MODEL, models, progress=False) == path  # present: the hub is stopped
    for root, dirs, files in os.walk(models / "hf" / "hub" / repo_folder(MODEL)):
        for d in dirs:
            assert stat.S_IMODE(os.lstat(Path(root, d)).st_mode) == 0o755, Path(root, d)
        for f in files:
            mode = os.lstat(Path(root, f)).st_mode
            if not stat.S_ISLNK(mode):
                assert stat.S_IMODE(mode) == 0o644, Path(root, f)
    assert stat.S_IMODE(models.stat().st_mode) == 0o755
    assert stat.S_IMODE(checksums_path(models, MODEL).stat().st_mode) == 0o644
    assert stat.S_IMODE(other.stat().st_mode) == 0o700  # another repo: left alone


def test_progress_is_the_hubs_bar_even_in_a_log_and_none_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    with running_hub(tmp_path, {MODEL: {}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        download(MODEL, tmp_path / "quiet", progress=False)
        assert capfd.readouterr().err == ""
        download(MODEL, tmp_path / "shown", progress=True)  # stderr is a pipe here, no tty
    shown = capfd.readouterr().err
    assert "Fetching 8 files" in shown and "Download complete" in shown
    assert "[dry-run]" not in shown


def test_verify_names_a_file_changed_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    models = tmp_path / "models"
    with running_hub(tmp_path, {MODEL: {}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        path = download(MODEL, models, progress=False)
    blob = (path / "tokenizer.json").resolve()
    blob.write_text('{"tampered": true}')
    assert verify(models, MODEL) == ["tokenizer.json"]


def test_a_snapshot_with_the_hubs_listing_but_no_checksums_is_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a bundle may carry it: the hub's own tree listing says which files make it whole."""
    models = tmp_path / "models"
    with running_hub(tmp_path, {MODEL: {}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        path = download(MODEL, models, progress=False)
    checksums_path(models, MODEL).unlink()
    status = weights_status(models, MODEL)
    assert status.present and status.path == path and "no checksums recorded" in status.detail
    (path / SHARD).resolve().unlink()
    assert "incomplete: 7 of 8 files" in weights_status(models, MODEL).detail
    with pytest.raises(NotFoundError):
        verify(models, MODEL)


def test_two_downloads_at_once_both_end_with_one_whole_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    with running_hub(tmp_path, {MODEL: {}}, shard_mib=8) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with ThreadPoolExecutor(2) as pool:
            paths = list(pool.map(lambda _: download(MODEL, models, progress=False), range(2)))
        commit = hub.commit()
    assert paths[0] == paths[1] == snapshot_of(models, commit)
    assert weights_status(models, MODEL).present and verify(models, MODEL) == []
    assert not list(checksums_path(models, MODEL).parent.glob("*.tmp"))


def test_a_blob_that_does_not_match_its_etag_is_removed_and_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub's ETag names the blob (sha256 of an LFS file): bytes that do not hash to it,
    e.g. a proxy's error page, are not recorded as the model."""
    models = tmp_path / "models"
    with running_hub(tmp_path, {MODEL: {}}, lie={"file": f"{MODEL}/{SHARD}"}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(WeightsCorruptError) as caught:
            download(MODEL, models, progress=False)
        commit = hub.commit()
    assert SHARD in one_line(caught.value) and "removed" in str(caught.value)
    assert not (snapshot_of(models, commit) / SHARD).exists()
    sha256 = hashlib.sha256((hub.repos[MODEL] / SHARD).read_bytes()).hexdigest()
    assert not (hub_cache(models) / repo_folder(MODEL) / "blobs" / sha256).exists()
    assert not weights_status(models, MODEL).present
    assert not checksums_path(models, MODEL).exists()


# ---------------------------------------------------------------------------- resuming


def test_a_cut_transfer_resumes_with_a_range_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    cut = {"file": f"{MODEL}/{SHARD}", "after": 15 * MIB, "times": 1}
    with running_hub(tmp_path, {MODEL: {}}, shard_mib=24, cut=cut) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        path = download(MODEL, models, progress=False)
        size = (hub.repos[MODEL] / SHARD).stat().st_size
        gets = [rng for name, rng in hub.stats()["gets"] if name == f"{MODEL}/{SHARD}"]
        assert gets == [None, f"bytes={CHUNK}-"]  # from the last whole chunk written
        assert hub.served(SHARD) == 15 * MIB + size - CHUNK
    assert (path / SHARD).read_bytes() == (hub.repos[MODEL] / SHARD).read_bytes()
    assert weights_status(models, MODEL).present


def test_after_a_failed_download_a_second_call_fetches_only_what_did_not_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    cut = {"file": f"{MODEL}/{SHARD}", "after": MIB, "times": 1, "then_fail": 1}
    with running_hub(tmp_path, {MODEL: {}}, cut=cut) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(HubUnreachableError) as caught:
            download(MODEL, models, progress=False)
        assert "503" in one_line(caught.value) and "run the command again" in caught.value.hint
        interrupted = weights_status(models, MODEL)
        assert not interrupted.present and interrupted.path is None
        assert "incomplete: 7 of 8 files" in interrupted.detail
        assert not checksums_path(models, MODEL).exists()
        others = {name: hub.served(name) for name in WANTED - {SHARD}}
        assert all(others[name] == (hub.repos[MODEL] / name).stat().st_size for name in others)
        assert bytes_on_disk(models, MODEL) == sum(others.values())  # no partial file kept

        path = download(MODEL, models, progress=False)
        assert {name: hub.served(name) for name in others} == others  # not fetched again
        size = (hub.repos[MODEL] / SHARD).stat().st_size
        assert hub.served(SHARD) == MIB + size  # the cut file again from its start
    assert (path / SHARD).read_bytes() == (hub.repos[MODEL] / SHARD).read_bytes()
    assert weights_status(models, MODEL).present and verify(models, MODEL) == []


# ---------------------------------------------------------------------------- refusals


def test_a_gated_model_without_a_token_is_one_line_with_the_licence_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    repos = {MODEL: {"gated": True, "granted": ["tok-granted"]}}
    with running_hub(tmp_path, repos, tokens=["tok-granted", "tok-other"]) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(GatedModelError) as caught:
            download(MODEL, models, progress=False)
        assert "gated" in one_line(caught.value) and "no token was sent" in str(caught.value)
        assert f"{hub.url}/{MODEL}" in caught.value.hint and "HF_TOKEN" in caught.value.hint
        assert exit_code_for(caught.value) == 6
        assert not weights_status(models, MODEL).present
        assert sum(hub.stats()["bytes"].values()) == 0

        monkeypatch.setenv("HF_TOKEN", "tok-other")
        with pytest.raises(GatedModelError) as caught:
            download(MODEL, models, progress=False)
        assert "the token sent has no access" in str(caught.value)
        assert "tok-other" not in str(caught.value) + str(caught.value.hint)

        monkeypatch.setenv("HF_TOKEN", "tok-granted")
        assert download(MODEL, models, progress=False).is_dir()
        assert weights_status(models, MODEL).present


def test_a_refused_token_is_named_and_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_hub(tmp_path, {MODEL: {}}, tokens=["tok-good"]) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_secret_but_wrong")
        with pytest.raises(HubTokenRefusedError) as caught:
            download(MODEL, tmp_path / "models", progress=False)
    text = one_line(caught.value) + str(caught.value.hint)
    assert "refused the token" in text and "hf_secret_but_wrong" not in text
    assert "https://huggingface.co/settings/tokens" in text


def test_a_token_in_the_models_dir_is_never_read_and_is_warned_of(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The models dir is mounted into the backend's container (--trust-remote-code, host
    network): a token there is never sent, even when HF_HOME (the hub's own token file) points
    into it; the root-only token file is."""
    models = tmp_path / "models"
    token_file = tmp_path / "etc" / "hf-token"
    monkeypatch.setattr(weights, "TOKEN_FILE", token_file)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(models / "hf" / "token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    (models / "hf").mkdir(parents=True)
    (models / "hf" / "token").write_text("tok-saved\n")
    with running_hub(tmp_path, {MODEL: {"private": True}}, tokens=["tok-saved"]) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(ModelNotOnHubError) as caught:
            download(MODEL, models, progress=False)
        assert "a private model needs HF_TOKEN" in caught.value.hint
        assert any("the backend's container can read" in r.message for r in caplog.records)
        assert weights.stray_token(models) is not None

        token_file.parent.mkdir()
        token_file.write_text("tok-saved\n")
        token_file.chmod(0o644)  # readable by anyone: refused
        with pytest.raises(PreflightError) as refused:
            download(MODEL, models, progress=False)
        assert "refusing the Hugging Face token" in one_line(refused.value)
        assert "chmod 600" in refused.value.hint and "tok-saved" not in str(refused.value)
        token_file.chmod(0o600)
        if os.geteuid() == 0:
            download(MODEL, models, progress=False)
            assert weights_status(models, MODEL).present
        else:  # not root's: refused as well
            with pytest.raises(PreflightError):
                download(MODEL, models, progress=False)


def test_an_unknown_model_is_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with running_hub(tmp_path, {MODEL: {}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(ModelNotOnHubError) as caught:
            download("acme/no-such-model", tmp_path / "models", progress=False)
    assert "acme/no-such-model was not found" in one_line(caught.value)
    assert "inference.vllm.model" in caught.value.hint
    assert exit_code_for(caught.value) == 5


def test_an_unreachable_hub_points_at_the_offline_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    models = tmp_path / "models"
    with pytest.raises(HubUnreachableError) as caught:
        download(MODEL, models, progress=False)
    assert "cannot be reached" in one_line(caught.value)
    assert "`appliance bundle install`" in caught.value.hint
    assert "inference.vllm.model" in caught.value.hint
    assert not weights_status(models, MODEL).present


def test_offline_mode_refuses_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_hub(tmp_path, {MODEL: {}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(HubUnreachableError) as caught:
            download(MODEL, tmp_path / "models", progress=False)
        assert "HF_HUB_OFFLINE" in one_line(caught.value)
        assert hub.stats()["gets"] == [] and hub.stats()["heads"] == 0
