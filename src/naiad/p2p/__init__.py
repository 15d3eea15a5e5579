"""P2P distribution of blobs: a scheduler, peer daemons (registry mirror + piece server), seeds, preheat.

A *task* is one blob, named by its digest; it is cut into fixed *pieces*
(`pieces.piece_size_for`). Each node runs a peer daemon: local clients
(containerd, skopeo, the lazy filesystem) read blobs through its registry
mirror, and the daemon gets the pieces those reads cover from other peers,
or from the registry when no peer holds them. A scheduler names, per piece,
the parents to fetch from, or the one peer that goes back to the source;
bytes never pass through it. This package depends on `naiad.oci` only: it
moves opaque bytes, whatever the image format.
"""
