"""rke2certd: keeps an RKE2 node's certificates valid and rotates its CAs safely."""

__version__ = "0.1.0"
