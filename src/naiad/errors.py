"""Errors that reach the user as one line, not a traceback.

Every failure caused by input (a bad tar, a wrong digest, a registry that
refuses us) is raised as a `NaiadError` subclass; the CLI prints its message
and exits non-zero. Anything else is a bug and keeps its traceback.
"""


class NaiadError(Exception):
    """A failure the user can act on; `str(err)` is the whole message."""

    exit_code = 1


class BadReferenceError(NaiadError):
    """An image reference that cannot be parsed or resolved."""


class InvalidLayerError(NaiadError):
    """A layer tar that is corrupt, truncated or unsafe to apply."""


class DigestMismatchError(NaiadError):
    """Content whose sha256 is not the one it was announced with."""


class FormatError(NaiadError):
    """A naiad bootstrap or blob that violates docs/format.md."""


class RegistryError(NaiadError):
    """A registry that refused, failed or dropped a request."""


class NotFoundError(NaiadError):
    """A manifest, tag or blob that does not exist where it was looked for."""
