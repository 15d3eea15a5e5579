"""Presenting a naiad image as a filesystem: materialised (unpack) or lazily mounted."""
