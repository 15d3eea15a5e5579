"""Figures about a bootstrap: entries, chunks, dedup, compression, hints (for `naiad inspect`)."""

from __future__ import annotations

import stat
from typing import Any

from naiad.format.bootstrap import Bootstrap


def bootstrap_stats(bs: Bootstrap) -> dict[str, Any]:
    kinds: dict[str, int] = {"files": 0, "dirs": 0, "symlinks": 0, "other": 0}
    for (mode, n) in bs.query("SELECT mode & ?, count(*) FROM inodes GROUP BY mode & ?",
                              (0o170000, 0o170000)):
        key = {stat.S_IFREG: "files", stat.S_IFDIR: "dirs", stat.S_IFLNK: "symlinks"}.get(mode, "other")
        kinds[key] += n
    file_bytes = bs.query("SELECT coalesce(sum(size), 0) FROM inodes WHERE mode & ? = ?",
                          (0o170000, stat.S_IFREG))[0][0]
    referenced, referenced_bytes = bs.query(
        "SELECT count(*), coalesce(sum(c.usize), 0) FROM file_chunks f JOIN chunks c ON c.id = f.chunk"
    )[0]
    unique, unique_bytes, stored_bytes = bs.query(
        "SELECT count(*), coalesce(sum(usize), 0), coalesce(sum(csize), 0) FROM chunks"
    )[0]
    blobs = [
        {"digest": digest, "size": size, "compressor": comp, "chunks": n, "used_bytes": used,
         "uncompressed_bytes": ubytes}
        for digest, size, comp, n, used, ubytes in bs.query(
            "SELECT b.digest, b.size, b.compressor, count(c.id), coalesce(sum(c.csize), 0),"
            " coalesce(sum(c.usize), 0) FROM blobs b LEFT JOIN chunks c ON c.blob = b.id"
            " GROUP BY b.id ORDER BY b.id"
        )
    ]
    return {
        **kinds,
        "entries": bs.count("dentries") + 1,
        "file_bytes": file_bytes,
        "chunk_size": bs.chunk_size,
        "chunks": referenced,
        "unique_chunks": unique,
        "dedup_ratio": round(referenced_bytes / unique_bytes, 4) if unique_bytes else 1.0,
        "uncompressed_bytes": unique_bytes,
        "stored_bytes": stored_bytes,
        "compression_ratio": round(unique_bytes / stored_bytes, 4) if stored_bytes else 1.0,
        "prefetch_files": len({ino for ino, _ in bs.prefetch_list()}),
        "prefetch_bytes": sum(c.usize for c in bs.prefetch_chunks()),
        # Access hints (docs/format.md §10): rows, and the chunks that start a walk.
        "hints": bs.count("hints") if bs.has_hints else 0,
        "hint_triggers": bs.query("SELECT count(DISTINCT chunk) FROM hints")[0][0] if bs.has_hints else 0,
        "blobs": blobs,
    }
