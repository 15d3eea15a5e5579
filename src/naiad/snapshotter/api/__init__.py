"""Generated gRPC stubs of containerd's snapshots API (scripts/gen-protos.sh); do not edit."""
