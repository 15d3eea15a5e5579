"""Preheat: have the seed peers fetch every blob of an image before any node asks for it.

The command line resolves the image (an index: every platform's manifest;
naiad images are ordinary OCI manifests, so their bootstrap and data blobs
are simply layers) and hands the blob list to the schedulers; each scheduler
picks a seed peer per blob. With `wait`, it then polls until a seed holds
each blob whole and verified.
"""

from __future__ import annotations

import json
import time
from typing import Any

from naiad.errors import BadReferenceError
from naiad.oci import mediatypes as mt
from naiad.oci.image import RegistryOptions
from naiad.oci.reference import Reference
from naiad.oci.registry import RegistryClient
from naiad.p2p.client import Ring, scheduler_call
from naiad.p2p.pieces import P2PError

POLL = 0.5


def image_blobs(ref: Reference, options: RegistryOptions) -> list[dict[str, Any]]:
    """[{digest, size}] of the config and layers of `ref` (every manifest of an index)."""
    if not ref.is_registry:
        raise BadReferenceError(f"{ref}: preheat needs a registry reference (HOST/REPO:TAG)")
    blobs: dict[str, int] = {}
    with RegistryClient(ref.host, options) as client:
        todo = [ref.reference]
        while todo:
            data, media_type = client.get_manifest(ref.repo, todo.pop())
            try:
                doc = json.loads(data)
            except ValueError:
                raise P2PError(f"{ref}: manifest is not JSON") from None
            if media_type in mt.INDEX_TYPES or "manifests" in doc:
                todo += [m["digest"] for m in doc.get("manifests", [])]
                continue
            for desc in [doc.get("config", {}), *doc.get("layers", [])]:
                if desc.get("digest"):
                    blobs[desc["digest"]] = int(desc["size"])
    return [{"digest": d, "size": s} for d, s in blobs.items()]


def preheat(ref: Reference, options: RegistryOptions, schedulers: list[str], token: str, *,
            wait: float | None) -> dict[str, Any]:
    """Ask the seeds (through the schedulers) to fetch `ref`; then wait up to `wait` s."""
    blobs = image_blobs(ref, options)
    ring = Ring(schedulers)
    by_scheduler: dict[str, list[dict[str, Any]]] = {}
    for blob in blobs:
        by_scheduler.setdefault(ring.owner(blob["digest"]), []).append(blob)
    seeds: dict[str, str] = {}
    for addr, group in by_scheduler.items():
        answer = scheduler_call(addr, token, "POST", "/api/v1/preheat",
                                {"registry": ref.host, "repo": ref.repo, "blobs": group})
        for seed, digests in answer.get("seeds", {}).items():
            seeds.update({d: seed for d in digests})
    result = {"ref": str(ref), "blobs": len(blobs), "bytes": sum(b["size"] for b in blobs), "seeds": seeds,
              "done": False}
    if wait is None:
        return result
    deadline = time.monotonic() + wait
    while True:
        done = set()
        for addr in by_scheduler:
            status = scheduler_call(addr, token, "GET", "/api/v1/status")
            done |= {t["digest"] for t in status["tasks"] if seeds.get(t["digest"]) in t["complete"]}
        if done >= set(seeds):
            result["done"] = True
            return result
        if time.monotonic() >= deadline:
            raise P2PError(f"preheat of {ref}: {len(done)} of {len(seeds)} blobs on the seeds "
                           f"after {wait:.0f} s")
        time.sleep(POLL)
