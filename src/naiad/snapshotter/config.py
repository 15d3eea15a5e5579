"""The containerd configuration that registers naiad as a proxy snapshotter (and points CRI at it)."""

from __future__ import annotations

PLUGIN_NAME = "naiad"
DEFAULT_ADDRESS = "/run/naiad/snapshotter.sock"
DEFAULT_ROOT = "/var/lib/naiad/snapshotter"


def containerd_config(address: str = DEFAULT_ADDRESS) -> str:
    """The lines to add to /etc/containerd/config.toml (version 2)."""
    return f"""\
# naiad remote snapshotter (`naiad snapshotter --address {address}`)
[proxy_plugins.{PLUGIN_NAME}]
  type = "snapshot"
  address = "{address}"

# Kubernetes (CRI): pull and run images through naiad. Snapshot annotations must be on:
# they tell the snapshotter which image and layer containerd is pulling.
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "{PLUGIN_NAME}"
  disable_snapshot_annotations = false
"""
