"""The naiad image format, v1: chunks, compression, blobs and the bootstrap.

Written down in docs/format.md; this room knows nothing of networks, FUSE or
registries.
"""
