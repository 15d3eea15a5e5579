"""Reading naiad images' bytes: bootstraps, blobs and verified chunks.

Every chunk is checked against its sha256 before anyone sees it.
"""
