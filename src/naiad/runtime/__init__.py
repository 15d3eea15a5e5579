"""Running containers from lazily mounted naiad images with the OCI runtime `runc`.

`spec.py` turns an image config plus command-line options into an OCI runtime
spec (runc's `config.json`); it is a pure function, tested without runc.
`run.py` owns the life of one `naiad run`: lazy mount, a writable overlayfs on
top, the runc container, signal forwarding, and cleanup of all of it.
"""
