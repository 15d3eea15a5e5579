"""Constants of format v1 that appear on the wire (see docs/format.md)."""

FORMAT_VERSION = 1

# Layer media types start with "application/vnd.oci.image.layer." because
# containerd only treats descriptors with that prefix as layers.
MEDIA_TYPE_BLOB = "application/vnd.oci.image.layer.naiad.blob.v1"
MEDIA_TYPE_BOOTSTRAP = "application/vnd.oci.image.layer.naiad.bootstrap.v1.sqlite+zstd"
# The bootstrap's EROFS view (docs/format.md §9), shipped so that nodes need not generate it.
MEDIA_TYPE_EROFS = "application/vnd.oci.image.layer.naiad.erofs.v1+zstd"

ANNOTATION_BLOB = "dev.naiad.blob"
ANNOTATION_BOOTSTRAP = "dev.naiad.bootstrap"
ANNOTATION_EROFS = "dev.naiad.erofs"
ANNOTATION_VERSION = "dev.naiad.version"
ANNOTATION_SOURCE = "dev.naiad.source.manifest"

DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 1 << 12
MAX_CHUNK_SIZE = 1 << 26


def check_chunk_size(size: int) -> int:
    from naiad.errors import FormatError

    if size < MIN_CHUNK_SIZE or size > MAX_CHUNK_SIZE or size & (size - 1):
        raise FormatError(
            f"chunk size {size} must be a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"
        )
    return size
