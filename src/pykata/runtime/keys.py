"""Sandbox keys: what names a pod's state on the host.

Kept free of pykata's other modules: the shim's `start`, which containerd
waits for before every container, computes a key with nothing but hashlib.
"""

from __future__ import annotations

import hashlib


def pod_key(*parts: str) -> str:
    """A sandbox key from what identifies a pod: containerd's address, the
    namespace and the pod's id. The same id in two namespaces, or under two
    containerd instances, gets two keys."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]
