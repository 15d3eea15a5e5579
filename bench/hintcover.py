"""How well an image's access hints cover a recorded start, replayed offline (no network, no mount).

    .venv/bin/python bench/hintcover.py BOOTSTRAP.db TRACE.json [--read-ahead 128K 1M 2M]

BOOTSTRAP.db is a naiad bootstrap (a node keeps them in `$NAIAD_HOME/bootstraps/`), TRACE.json
the `[path, chunk index]` first reads of a FUSE-mode mount (`$NAIAD_HOME/mounts/*/trace.json`, as
`naiad optimize` records them). Printed: what the hints name when walked from every file the
start reads, how much of that the start does not read, and a replay of the start against the
blobs' layout: misses (range requests a reader waits for) and bytes, with read-ahead of each
size, without and with hints. The replay takes hinted chunks as arriving at once, so it bounds
what hints can do; `bench/datapath.py` measures what they do.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from naiad.format.bootstrap import Bootstrap, Chunk
from naiad.storage.hints import walk


def size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


class Replay:
    def __init__(self, bs: Bootstrap, trace: list[tuple[str, int]]):
        self.bs = bs
        inos = {p.decode(errors="surrogateescape"): a.ino for p, _, a in bs.walk()}
        self.reads: list[Chunk] = []
        for path, index in trace:
            if (ino := inos.get(path)) is not None and (c := bs.file_chunks(ino, index * bs.chunk_size, 1)):
                self.reads.append(c[0])
        self.layout: dict[int, list[Chunk]] = {}
        for c in bs.chunks():
            self.layout.setdefault(c.blob, []).append(c)
        self.position = {c.id: (c.blob, i) for blob in self.layout.values() for i, c in enumerate(blob)}

    def hinted(self, root: int, expanded: set[int], visited: set[tuple[int, int]]) -> list[Chunk]:
        """The chunks the hints of chunk `root` lead to, as a mount walks them."""
        walked = walk(self.bs, [iter(self.bs.hints_of(root))], expanded, visited)
        return [c for chunks in walked for c in chunks]

    def run(self, read_ahead: int, hints: bool) -> tuple[int, int]:
        """(misses, bytes fetched) of the start, read-ahead `read_ahead` stored bytes."""
        have: set[int] = set()
        expanded: set[int] = set()
        visited: set[tuple[int, int]] = set()
        misses = fetched = 0
        for c in self.reads:
            if c.id in have:
                continue
            if hints and c.id not in expanded:
                expanded.add(c.id)
                for h in self.hinted(c.id, expanded, visited):
                    if h.id not in have:
                        have.add(h.id)
                        fetched += h.csize
                if c.id in have:
                    continue
            misses += 1
            blob, i = self.position[c.id]
            chunks = self.layout[blob]
            budget = read_ahead
            j = i
            while j < len(chunks) and (j == i or (chunks[j].id not in have and budget >= chunks[j].csize)):
                if chunks[j].id not in have:
                    budget -= chunks[j].csize
                    have.add(chunks[j].id)
                    fetched += chunks[j].csize
                j += 1
        return misses, fetched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bootstrap")
    ap.add_argument("trace")
    ap.add_argument("--read-ahead", nargs="+", default=["128K", "512K", "1M", "2M"])
    args = ap.parse_args()
    bs = Bootstrap(args.bootstrap)
    replay = Replay(bs, json.loads(Path(args.trace).read_text()))
    touched = {c.id: c for c in replay.reads}
    expanded: set[int] = set()
    visited: set[tuple[int, int]] = set()
    closure: dict[int, Chunk] = {}
    for c in replay.reads:
        if c.id not in expanded:
            expanded.add(c.id)
            closure.update((h.id, h) for h in replay.hinted(c.id, expanded, visited))
    mb = 1e6
    unread = sum(c.csize for i, c in closure.items() if i not in touched)
    print(f"start reads {len(touched)} chunks, {sum(c.csize for c in touched.values()) / mb:.1f} MB stored; "
          f"hints name {len(closure)} chunks, {sum(c.csize for c in closure.values()) / mb:.1f} MB, "
          f"of which the start does not read {unread / mb:.1f} MB")
    print(f"{'read-ahead':>10} | {'misses':>6} {'MB':>6} | {'misses, hints':>13} {'MB':>6}")
    for text in args.read_ahead:
        plain, hinted = replay.run(size(text), False), replay.run(size(text), True)
        print(f"{text:>10} | {plain[0]:>6} {plain[1] / mb:>6.1f} | {hinted[0]:>13} {hinted[1] / mb:>6.1f}")


if __name__ == "__main__":
    main()
