"""OCI images: references, manifests, layer tars, layouts, archives and registries.

This room knows the OCI image and distribution specs and nothing of naiad's
own format.
"""
