"""naiad: container images that push in seconds, start lazily and spread peer to peer."""

__version__ = "0.1.0"
