"""Building naiad images: from an OCI image (convert) or a rootfs directory (build)."""
