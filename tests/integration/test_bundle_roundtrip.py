"""Bundle round trip: create a bundle here, then, inside a network namespace with no network at
all (`unshare -n`, loopback only), install it with its own install.sh into a fresh virtualenv,
install again (nothing changes), start the appliance and get one real completion from the
embedded model through the gateway. The bundle's wheel must carry every data file the packages
read at run time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.bundle_fixtures import REPO, bundle_skip_reason, ensure_bundle

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("bundle")]


@pytest.fixture(scope="module")
def bundle() -> Path:
    if (reason := bundle_skip_reason()) is not None:
        pytest.skip(reason)
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("unshare and ip (util-linux, iproute2) are needed for a network namespace")
    return ensure_bundle()


def test_the_bundle_verifies_and_lists_what_it_carries(bundle: Path) -> None:
    from appliance.packaging.bundle import read_manifest, verify_bundle

    assert verify_bundle(bundle).ok
    sections = read_manifest(bundle)["sections"]
    assert sections["wheels"]["pins"][0] == "gpu-appliance==0.1.0"
    assert any(p.startswith("torch==") for p in sections["wheels"]["pins"])
    # Every image a shipped blueprint pins is in the bundle.
    pins = {row["image"].split("@")[1] for row in sections["blueprints"]}
    assert pins and pins <= {row["pin"] for row in sections["images"]}
    assert sections["debs"]["count"] > 20
    assert (bundle / "debs" / "Packages").is_file()
    assert (bundle / "ansible" / "playbooks" / "site.yml").is_file()


def test_the_wheel_carries_every_data_file(bundle: Path) -> None:
    wheel = next((bundle / "wheels").glob("gpu_appliance-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(
        ["git", "ls-files", "appliance", "inference", "sandbox", "blueprints", "hardware"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    missing = [p for p in tracked if p not in names]
    assert not missing, f"not in {wheel.name}: {missing}"


def test_install_and_serve_with_no_network(
    bundle: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    venv, state, out, models = (tmp_path / n for n in ("venv", "state", "out", "models"))
    out.mkdir()
    models.mkdir()
    # Share converted weights with the embedded backend's tests: conversion costs ~20 s.
    (models / "cache").symlink_to(request.config.cache.mkdir("embedded-models"))
    script = textwrap.dedent(
        f"""\
        set -eu
        export APPLIANCE_STATE_DIR={state} APPLIANCE_SYSTEM_CONFIG={tmp_path}/none.yaml
        export APPLIANCE_MODELS_DIR={models}
        export XDG_CONFIG_HOME={tmp_path}/xdg CLI_LINK=
        ip link set lo up
        # No network at all: only loopback exists.
        ip -o link show | grep -v ' lo:' && exit 90
        python3 -c "import socket; socket.create_connection(('pypi.org', 443), 3)" 2>/dev/null \\
          && exit 92
        sh {bundle}/install.sh {venv} --no-images --json > {out}/install1.json
        {venv}/bin/appliance bundle install {bundle} --venv {venv} --no-images --json \\
          > {out}/install2.json
        trap '{venv}/bin/appliance down >/dev/null 2>&1 || true' EXIT
        {venv}/bin/appliance up --timeout 300 > {out}/up.txt 2>&1
        {venv}/bin/appliance status --json > {out}/status.json
        {venv}/bin/appliance keys create roundtrip --json > {out}/key.json
        {venv}/bin/python - <<'EOF' > {out}/completion.json
        import json, httpx
        key = json.load(open("{out}/key.json"))["secret"]
        r = httpx.post(
            "http://127.0.0.1:8080/v1/chat/completions",
            headers={{"Authorization": f"Bearer {{key}}"}},
            json={{"model": "nemotron", "max_tokens": 8, "temperature": 0,
                   "messages": [{{"role": "user", "content": "Say hello."}}]}},
            timeout=120,
        )
        print(json.dumps({{"status": r.status_code, "body": r.json()}}))
        EOF
        """
    )
    proc = subprocess.run(
        ["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, timeout=900
    )
    logs = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(out.iterdir()))
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}\n{logs}"

    first = json.loads((out / "install1.json").read_text())
    # install.sh installed the pins, then stamped the appliance's wheel; nothing else is asked for
    assert first["changed"] is True and list(first["steps"]) == ["wheels"], first
    second = json.loads((out / "install2.json").read_text())
    assert second["changed"] is False and "already in" in second["steps"]["wheels"], second
    status = json.loads((out / "status.json").read_text())
    assert status["inference"]["state"] == "ready", status["inference"]
    assert status["gateway"]["state"] == "ready", status["gateway"]
    result = json.loads((out / "completion.json").read_text())
    assert result["status"] == 200, result
    body = result["body"]
    assert body["choices"][0]["message"]["content"].strip()
    assert body["usage"]["completion_tokens"] > 0
