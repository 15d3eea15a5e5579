"""Chunk dictionaries: chunks already stored in other images' blobs, to reference instead of store.

A dictionary is loaded from naiad images (on a registry or in an OCI layout)
or from a dictionary file that `naiad chunkdict build` wrote (an SQLite
database, docs/format.md section 8). A build looks each chunk digest up in
it: a hit is not compressed or stored again, the new bootstrap points at the
dictionary blob, and the new manifest lists that blob as a layer. Each blob
remembers the image it came from, so that a push can mount it from that
repository, and a layout target can copy it from there.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from collections.abc import Iterable, Iterator

from naiad.errors import FormatError, NaiadError
from naiad.format import spec
from naiad.format.bootstrap import Chunk
from naiad.format.chunk import decode_chunk
from naiad.oci.image import Descriptor, ImageSource, Platform, RegistryOptions, open_source
from naiad.oci.reference import Reference, parse_reference
from naiad.storage.image import NaiadImage
from naiad.storage.ranges import contiguous_runs, read_run

DICT_FORMAT = "naiad-chunkdict"
DICT_VERSION = 1
# Adjacent chunks are fetched together (for --min-blob-use copies) up to this many bytes.

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE sources (id INTEGER PRIMARY KEY, ref TEXT NOT NULL, manifest TEXT NOT NULL);
CREATE TABLE blobs (id INTEGER PRIMARY KEY, digest TEXT NOT NULL UNIQUE, size INTEGER NOT NULL,
                    compressor TEXT NOT NULL, source INTEGER NOT NULL);
CREATE TABLE chunks (digest BLOB PRIMARY KEY, blob INTEGER NOT NULL, offset INTEGER NOT NULL,
                     csize INTEGER NOT NULL, usize INTEGER NOT NULL, uoffset INTEGER NOT NULL) WITHOUT ROWID;
"""


@dataclasses.dataclass(frozen=True, slots=True)
class DictSource:
    """An image a dictionary was made from: its reference and manifest digest."""

    ref: str
    manifest: str


@dataclasses.dataclass(frozen=True, slots=True)
class DictBlob:
    digest: str
    size: int
    compressor: str
    source: int  # index into ChunkDict.sources

    def descriptor(self) -> Descriptor:
        return Descriptor(spec.MEDIA_TYPE_BLOB, self.digest, self.size,
                          {spec.ANNOTATION_BLOB: str(spec.FORMAT_VERSION)})


@dataclasses.dataclass(frozen=True, slots=True)
class DictChunk:
    blob: str  # blob digest
    offset: int
    csize: int
    usize: int
    uoffset: int  # in the blob's uncompressed space, as its own image laid it out


class ChunkDict:
    """Chunks by digest, the blobs holding them and the images those came from.

    Where two dictionaries hold the same chunk, the first one given wins.
    Sources are opened on first use (to mount or copy blobs) and closed by `close()`.
    """

    def __init__(self, registry: RegistryOptions | None = None):
        self.registry = registry or RegistryOptions()
        self.sources: list[DictSource] = []
        self.blobs: dict[str, DictBlob] = {}
        self.chunks: dict[bytes, DictChunk] = {}
        self._open: dict[int, ImageSource] = {}

    # --- loading -------------------------------------------------------

    @classmethod
    def load(cls, refs: Iterable[str], registry: RegistryOptions | None = None,
             platform: Platform | None = None) -> ChunkDict:
        cd = cls(registry)
        try:
            for text in refs:
                if os.path.isfile(text):
                    cd.add_file(text)
                else:
                    cd.add_image(parse_reference(text), platform)
        except BaseException:
            cd.close()
            raise
        return cd

    def add_image(self, ref: Reference, platform: Platform | None = None) -> None:
        """Every chunk of the naiad image `ref`."""
        source: ImageSource | None = None
        try:
            try:
                source = open_source(ref, self.registry)
                img = NaiadImage.open(source, platform)
            except NaiadError as e:
                # The message names the option: the image being built is not the one at fault.
                msg = str(e).removeprefix(f"{ref}: ")
                raise FormatError(f"--chunk-dict {ref}: {msg}") from None
            try:
                index = self._add_source(DictSource(str(ref), img.image.manifest_digest))
                self._open[index] = source
                source = None
                by_id = {}
                for b in img.blobs.values():
                    by_id[b.id] = b.digest
                    self.blobs.setdefault(b.digest, DictBlob(b.digest, b.size, b.compressor, index))
                for c in img.bootstrap.chunks():
                    self.chunks.setdefault(c.digest, DictChunk(by_id[c.blob], c.offset, c.csize, c.usize,
                                                               c.uoffset))
            finally:
                img.close()
        finally:
            if source is not None:
                source.close()

    def add_file(self, path: str) -> None:
        """Every chunk of a dictionary file (`naiad chunkdict build`)."""
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        except sqlite3.Error as e:
            raise FormatError(f"--chunk-dict {path}: cannot open: {e}") from None
        try:
            try:
                meta = dict(db.execute("SELECT key, value FROM meta"))
            except sqlite3.DatabaseError:
                meta = {}
            if meta.get("format") != DICT_FORMAT:
                raise FormatError(f"--chunk-dict {path}: not a naiad chunk dictionary "
                                  "(nor a reference to a naiad image)")
            if meta.get("version") != str(DICT_VERSION):
                raise FormatError(f"--chunk-dict {path}: dictionary version {meta.get('version')} "
                                  "is not supported")
            sources = {sid: self._add_source(DictSource(ref, manifest))
                       for sid, ref, manifest in db.execute("SELECT id, ref, manifest FROM sources")}
            blobs = {}
            for bid, digest, size, comp, sid in db.execute(
                    "SELECT id, digest, size, compressor, source FROM blobs ORDER BY id"):
                blobs[bid] = digest
                self.blobs.setdefault(digest, DictBlob(digest, size, comp, sources[sid]))
            for digest, bid, offset, csize, usize, uoffset in db.execute(
                    "SELECT digest, blob, offset, csize, usize, uoffset FROM chunks ORDER BY digest"):
                self.chunks.setdefault(bytes(digest), DictChunk(blobs[bid], offset, csize, usize, uoffset))
        except (sqlite3.DatabaseError, KeyError) as e:
            raise FormatError(f"--chunk-dict {path}: damaged dictionary: {e}") from None
        finally:
            db.close()

    def _add_source(self, source: DictSource) -> int:
        if source in self.sources:
            return self.sources.index(source)
        self.sources.append(source)
        return len(self.sources) - 1

    # --- writing -------------------------------------------------------

    def write(self, path: str) -> None:
        """Write the dictionary file; the same dictionary always gives the same bytes."""
        from naiad.format.bootstrap import _normalise_header

        tmp = path + ".tmp"
        if os.path.exists(tmp):
            os.unlink(tmp)
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode = OFF")
            db.executescript(SCHEMA)
            db.execute("BEGIN")
            db.executemany("INSERT INTO meta VALUES (?, ?)",
                           [("format", DICT_FORMAT), ("version", str(DICT_VERSION))])
            db.executemany("INSERT INTO sources VALUES (?, ?, ?)",
                           ((i + 1, s.ref, s.manifest) for i, s in enumerate(self.sources)))
            blob_ids = {d: i + 1 for i, d in enumerate(sorted(self.blobs))}
            db.executemany("INSERT INTO blobs VALUES (?, ?, ?, ?, ?)",
                           ((blob_ids[d], d, b.size, b.compressor, b.source + 1)
                            for d, b in sorted(self.blobs.items())))
            db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?)",
                           ((d, blob_ids[c.blob], c.offset, c.csize, c.usize, c.uoffset)
                            for d, c in sorted(self.chunks.items())))
            db.execute("COMMIT")
            db.execute("VACUUM")
        finally:
            db.close()
        _normalise_header(tmp)
        os.replace(tmp, path)

    # --- using ---------------------------------------------------------

    def usable(self, compressor: str) -> dict[bytes, DictChunk]:
        """The chunks a build with `compressor` can reference (a blob has one compressor)."""
        ok = {d for d, b in self.blobs.items() if b.compressor == compressor}
        return {d: c for d, c in self.chunks.items() if c.blob in ok}

    def source_of(self, digest: str) -> ImageSource:
        """The (opened) image a dictionary blob came from."""
        index = self.blobs[digest].source
        src = self._open.get(index)
        if src is None:
            src = open_source(parse_reference(self.sources[index].ref), self.registry)
            self._open[index] = src
        return src

    def locate(self, desc: Descriptor) -> ImageSource | None:
        """For oci.copy: where a blob the build did not write can be read (or mounted) from."""
        return self.source_of(desc.digest) if desc.digest in self.blobs else None

    def fetch_stored(self, digests: list[bytes]) -> Iterator[tuple[bytes, bytes]]:
        """(digest, stored bytes) of dictionary chunks, each verified; runs read with one request."""
        found = sorted(((d, self.chunks[d]) for d in digests), key=lambda dc: (dc[1].blob, dc[1].offset))
        digest_of = {id(c): d for d, c in found}
        for run in contiguous_runs(c for _, c in found):
            blob = self.blobs[run[0].blob]
            for c, stored in read_run(self.source_of(blob.digest), blob.digest, run):
                d = digest_of[id(c)]
                decode_chunk(stored, Chunk(0, d, 0, c.offset, c.csize, c.usize, c.uoffset), blob.compressor)
                yield d, stored

    def close(self) -> None:
        for src in self._open.values():
            src.close()
        self._open.clear()

    def __enter__(self) -> ChunkDict:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_dict(refs: Iterable[str], path: str, registry: RegistryOptions | None = None,
               platform: Platform | None = None) -> ChunkDict:
    """`naiad chunkdict build`: one dictionary file from naiad images (or other dictionaries)."""
    with ChunkDict.load(refs, registry, platform) as cd:
        if not cd.chunks:
            raise NaiadError("the dictionary would be empty: the images hold no chunks")
        cd.write(path)
        return cd
