"""The containerd remote snapshotter: a gRPC proxy plugin serving containerd's snapshots API.

Plain OCI layers are directories stacked with overlayfs, as containerd's own overlayfs
snapshotter does. The layers of a naiad image are never downloaded: the data-blob layers
become empty committed snapshots, and the bootstrap layer's snapshot is a lazy FUSE mount of
the image (one `naiad mount` daemon per image, shared and reference counted).

    api/        generated gRPC stubs (scripts/gen-protos.sh)
    store.py    the SQLite metadata store (crash-safe; keys are never file names)
    filters.py  containerd's filter syntax, as List sends it
    remote.py   which layers belong to a naiad image (from the labels containerd forwards)
    lazy.py     the lazy mounts: spawn, share, re-attach after a restart, release
    snapshots.py the snapshotter itself (directories, mounts, the remote path)
    service.py  the gRPC service and server
    config.py   the containerd configuration that registers the plugin
"""
