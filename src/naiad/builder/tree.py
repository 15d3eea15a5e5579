"""The filesystem tree a build produces, with OCI layer semantics.

Layers are applied in order onto one in-memory tree: whiteouts and opaque
markers first (they only hide what lower layers made), then the layer's
entries sorted by path, then its hard links. Sorting makes the result
independent of the order of entries in the tar. Nodes are shared between
names for hard links. This is build-time state; mounting never builds it.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator

from naiad.errors import InvalidLayerError
from naiad.oci.layer import KIND_TO_IFMT, LayerEntry


class Node:
    """An inode under construction; directories hold their children by name."""

    __slots__ = ("children", "chunks", "gid", "mode", "mtime_ns", "rdev", "size", "target", "uid", "xattrs")

    def __init__(self, mode: int, uid: int = 0, gid: int = 0, mtime_ns: int = 0):
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.size = 0
        self.rdev = 0
        self.target: bytes | None = None
        self.xattrs: dict[bytes, bytes] = {}
        self.chunks: list[bytes] = []  # sha256 digests of the file's chunks, in order
        self.children: dict[bytes, Node] | None = {} if stat.S_ISDIR(mode) else None

    @property
    def is_dir(self) -> bool:
        return self.children is not None


def node_from_entry(entry: LayerEntry, chunks: list[bytes] | None = None) -> Node:
    node = Node(KIND_TO_IFMT[entry.kind] | entry.mode, entry.uid, entry.gid, entry.mtime_ns)
    node.xattrs = dict(entry.xattrs)
    if entry.kind == "reg":
        node.size = entry.size
        node.chunks = chunks or []
    elif entry.kind == "symlink":
        node.target = entry.link
    else:
        node.rdev = entry.rdev
    return node


class Tree:
    def __init__(self) -> None:
        self.root = Node(stat.S_IFDIR | 0o755)

    def _show(self, path: bytes) -> str:
        return repr("/" + path.decode("utf-8", "backslashreplace"))

    def _parent(self, path: bytes, what: str, create: bool) -> tuple[Node | None, bytes]:
        """The directory node holding `path`'s last component, walking without following symlinks."""
        parts = path.split(b"/")
        node = self.root
        for i, part in enumerate(parts[:-1]):
            assert node.children is not None
            child = node.children.get(part)
            if child is None:
                if not create:
                    return None, parts[-1]
                # Parents missing from the tar are made like `mkdir -p` would,
                # with fixed attributes so the result stays reproducible.
                child = node.children[part] = Node(stat.S_IFDIR | 0o755)
            elif stat.S_ISLNK(child.mode):
                raise InvalidLayerError(
                    f"{what}: {self._show(path)} escapes the root through the symlink "
                    f"{self._show(b'/'.join(parts[: i + 1]))}"
                )
            elif not child.is_dir:
                raise InvalidLayerError(
                    f"{what}: parent {self._show(b'/'.join(parts[: i + 1]))} of {self._show(path)} "
                    "is not a directory"
                )
            node = child
        return node, parts[-1]

    def apply_layer(self, entries: list[tuple[LayerEntry, list[bytes] | None]], what: str) -> None:
        """Apply one layer's entries (each with its file's chunk digests) onto the tree."""
        hidden = [e for e, _ in entries if e.kind in ("whiteout", "opaque")]
        for entry in sorted(hidden, key=lambda e: (e.path, e.kind)):
            self._hide(entry, what)
        plain = [(e, c) for e, c in entries if e.kind not in ("whiteout", "opaque", "hardlink")]
        # A stable sort: repeated paths in one tar keep their tar order (last one wins).
        for entry, chunks in sorted(plain, key=lambda ec: ec[0].path):
            self._put(entry.path, entry, node_from_entry(entry, chunks), what)
        links = [e for e, _ in entries if e.kind == "hardlink"]
        for entry in sorted(links, key=lambda e: e.path):
            target = self.get(entry.link, what)
            if target is None:
                raise InvalidLayerError(
                    f"{what}: hard link {self._show(entry.path)} points at missing {self._show(entry.link)}"
                )
            if target.is_dir:
                raise InvalidLayerError(f"{what}: hard link {self._show(entry.path)} points at a directory")
            self._put(entry.path, entry, target, what)

    def get(self, path: bytes, what: str) -> Node | None:
        """The node at `path`, or None; InvalidLayerError if the way there crosses a symlink."""
        if not path:
            return self.root
        parent, name = self._parent(path, what, create=False)
        return None if parent is None or parent.children is None else parent.children.get(name)

    def _hide(self, entry: LayerEntry, what: str) -> None:
        if not entry.path and entry.kind == "whiteout":
            raise InvalidLayerError(f"{what}: a whiteout cannot delete the root")
        target = self.root if not entry.path else None
        if target is None:
            parent, name = self._parent(entry.path, what, create=False)
            if parent is None or parent.children is None:
                return
            if entry.kind == "whiteout":
                parent.children.pop(name, None)
                return
            target = parent.children.get(name)
        if target is not None and target.children is not None:
            target.children.clear()

    def _put(self, path: bytes, entry: LayerEntry, node: Node, what: str) -> None:
        if not path:
            if entry.kind != "dir":
                raise InvalidLayerError(f"{what}: the root must be a directory")
            self._update_dir(self.root, node)
            return
        parent, name = self._parent(path, what, create=True)
        assert parent is not None and parent.children is not None
        old = parent.children.get(name)
        if old is not None and old.is_dir and node.is_dir and entry.kind == "dir":
            self._update_dir(old, node)
        else:
            parent.children[name] = node

    @staticmethod
    def _update_dir(old: Node, new: Node) -> None:
        # A directory over a directory merges: new attributes, old children kept.
        for attr in ("mode", "uid", "gid", "mtime_ns", "xattrs"):
            setattr(old, attr, getattr(new, attr))

    def walk(self) -> Iterator[tuple[bytes, Node, Node]]:
        """(path, parent, node) depth first, children sorted bytewise: the canonical order."""
        stack: list[tuple[bytes, Node]] = [(b"", self.root)]
        while stack:
            prefix, dnode = stack.pop()
            assert dnode.children is not None
            names = sorted(dnode.children)
            for name in names:
                child = dnode.children[name]
                yield prefix + b"/" + name, dnode, child
            stack.extend(
                (prefix + b"/" + n, dnode.children[n]) for n in reversed(names) if dnode.children[n].is_dir
            )
