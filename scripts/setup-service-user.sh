#!/usr/bin/env bash
# Idempotent: the unprivileged system user whose rootless Podman runs the sandboxes.
# Creates the user (nologin shell), its subordinate uid/gid ranges, a runtime dir, and a
# containers.conf that pins runc (crun refuses the hybrid cgroup layout here) and cgroupfs/file
# events (there is no systemd session for a system user). Needs root.
# Usage: scripts/setup-service-user.sh [USER]   (default: appliance; env APPLIANCE_SANDBOX_HOME)
set -euo pipefail

USER_NAME="${1:-${APPLIANCE_SANDBOX_USER:-appliance}}"
HOME_DIR="${APPLIANCE_SANDBOX_HOME:-/var/lib/appliance-sandbox}"
RANGE=65536

if [ "$(id -u)" != 0 ]; then
  echo "setup-service-user: needs root; skipped (run: sudo $0 $USER_NAME)" >&2
  exit 0
fi

if ! id -u "$USER_NAME" >/dev/null 2>&1; then
  echo "setup-service-user: creating system user $USER_NAME (home $HOME_DIR)"
  useradd --system --user-group --home-dir "$HOME_DIR" --create-home \
    --shell /usr/sbin/nologin --comment "appliance sandboxes (rootless podman)" "$USER_NAME"
fi
uid="$(id -u "$USER_NAME")"
gid="$(id -g "$USER_NAME")"
mkdir -p "$HOME_DIR"
chown "$uid:$gid" "$HOME_DIR"
chmod 0700 "$HOME_DIR"

# Next free subordinate range: after the highest start+count already allocated (min 100000).
next_free() {
  awk -F: 'BEGIN { m = 100000 } { e = $2 + $3; if (e > m) m = e } END { print m }' "$1" 2>/dev/null \
    || echo 100000
}
touch /etc/subuid /etc/subgid
if ! grep -q "^$USER_NAME:" /etc/subuid && ! grep -q "^$uid:" /etc/subuid; then
  start="$(next_free /etc/subuid)"
  usermod --add-subuids "$start-$((start + RANGE - 1))" "$USER_NAME"
fi
if ! grep -q "^$USER_NAME:" /etc/subgid && ! grep -q "^$uid:" /etc/subgid; then
  start="$(next_free /etc/subgid)"
  usermod --add-subgids "$start-$((start + RANGE - 1))" "$USER_NAME"
fi

# No systemd/logind here, so no `loginctl enable-linger`: make the runtime dir ourselves. /run is
# a tmpfs on most hosts, so this is also done again by the control plane when it starts podman.
RUNTIME_DIR="/run/user/$uid"
install -d -m 0755 /run/user
install -d -m 0700 -o "$uid" -g "$gid" "$RUNTIME_DIR"

CONF_DIR="$HOME_DIR/.config/containers"
install -d -m 0700 -o "$uid" -g "$gid" "$HOME_DIR/.config" "$CONF_DIR"
write_if_changed() {  # path content: rewrite only when different, so re-runs touch nothing
  if [ ! -f "$1" ] || [ "$(cat "$1")" != "$2" ]; then
    printf '%s\n' "$2" >"$1"
    chown "$uid:$gid" "$1"
    chmod 0600 "$1"
    echo "setup-service-user: wrote $1"
  fi
}
write_if_changed "$CONF_DIR/containers.conf" '# Written by scripts/setup-service-user.sh
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[containers]
# The host has no systemd session for this user; keep podman from trying to talk to it.
log_driver = "k8s-file"'
# Storage: the kernel's own overlayfs works in a user namespace on >= 5.13 (measured: "Native
# Overlay Diff: true" on 6.x), so no fuse-overlayfs (and /dev/fuse is 0600 on these hosts anyway).
# vfs, podman's fallback, copies every layer in full. Chosen only before the store exists: switching
# the driver of an initialised store makes podman refuse to start.
kver="$(uname -r | cut -d. -f1-2)"
if [ ! -d "$HOME_DIR/.local/share/containers/storage" ] \
    && printf '%s\n5.13\n' "$kver" | sort -V -C -r 2>/dev/null; then
  write_if_changed "$CONF_DIR/storage.conf" '# Written by scripts/setup-service-user.sh
[storage]
driver = "overlay"'
fi

if command -v podman >/dev/null; then
  # First run migrates/creates the storage; errors here point at subuid or runtime-dir problems.
  # The user's own environment only: our XDG_CONFIG_HOME/XDG_DATA_HOME (sudo -E, a test's) would
  # send its podman to dirs it cannot create, or to another storage.conf.
  if ! (cd / && runuser -u "$USER_NAME" -- env -i PATH="$PATH" HOME="$HOME_DIR" \
      XDG_RUNTIME_DIR="$RUNTIME_DIR" \
      podman info --format '{{.Store.GraphDriverName}} {{.Host.OCIRuntime.Name}}' >/dev/null); then
    echo "setup-service-user: 'podman info' as $USER_NAME failed" >&2
    exit 1
  fi
fi
echo "setup-service-user: $USER_NAME ready (uid $uid, runtime dir $RUNTIME_DIR)"
