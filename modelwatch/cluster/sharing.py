"""Which roots are shared (SPEC §12): those that say `shared = true`, and, when a cluster
backend is configured, those that leave `shared` unset and sit on a network filesystem (the
same test as `observer = "auto"`: the mount table, for the root or, while it does not exist
yet, the directory that will hold it)."""

from __future__ import annotations

from collections.abc import Callable

from modelwatch.config import Config
from modelwatch.mounts import is_network, root_filesystem


def shared_roots(
    config: Config, filesystem: Callable[[str], str | None] = root_filesystem
) -> list[str]:
    """Paths of the roots this daemon shares with other nodes through the backend."""
    if not config.cluster.enabled:
        return []
    return [
        root.path
        for root in config.roots
        if root.shared or (root.shared is None and is_network(filesystem(root.path)))
    ]
