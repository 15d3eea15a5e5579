"""Resolving a path inside an image with its symlinks followed, never out of the image's root.

Generic over the tree it walks (the builder's access hints walk its in-memory tree; a bootstrap
would do too): a symlink's absolute target starts again at the image's root, and ".." stops
there, as in a chroot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

MAX_SYMLINKS = 16  # as many as a path may pass through before it is taken for a loop

N = TypeVar("N")


def follow(path: bytes, root: N, child: Callable[[N, bytes], N | None],
           link: Callable[[N], bytes | None]) -> N | None:
    """The node at `path`, or None. `child(dir, name)` looks a name up in a directory (None when
    there is no such entry or `dir` is no directory); `link(node)` is a symlink's target, else None."""
    todo = [p for p in reversed(path.split(b"/")) if p]
    stack = [root]
    hops = 0
    while todo:
        part = todo.pop()
        if part == b".":
            continue
        if part == b"..":
            if len(stack) > 1:
                stack.pop()
            continue
        node = child(stack[-1], part)
        if node is None:
            return None
        target = link(node)
        if target is None:
            stack.append(node)
            continue
        hops += 1
        if hops > MAX_SYMLINKS or not target:
            return None
        if target.startswith(b"/"):
            stack = [root]
        todo.extend(p for p in reversed(target.split(b"/")) if p)
    return stack[-1]
