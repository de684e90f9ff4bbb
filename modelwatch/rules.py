"""A root's rules, compiled once: how its units are scanned and how scans are remembered."""

from __future__ import annotations

import hashlib
import os

from modelwatch.config import RootConfig
from modelwatch.manifest import Manifest, PatternSet, scan_digest, scan_unit
from modelwatch.settle import Timing
from modelwatch.units import Unit

# With content_digest = "sha256", a scan digest is remembered only for files unchanged this
# long: writes through a shared mapping to a page that is already dirty move no timestamp until
# it is written back (the kernel's default dirty expiry is 30 s), and only hashing sees them.
# (Without content digests, fingerprints are made of the same timestamps: nothing to guard.)
DIGEST_MIN_AGE = 60.0
# Part of every stored digest: a new way to fingerprint or inspect units changes it, and with
# it every stored digest, so units are looked at again.
_DIGEST_FORMAT = 1


class RootRules:
    """A root's configuration with its patterns compiled once."""

    def __init__(self, root: RootConfig) -> None:
        self.config = root
        self.ignore = PatternSet(root.policy.ignore)
        self.in_progress = PatternSet(root.policy.in_progress)
        self.timing = Timing(root.policy.settle_seconds, root.policy.max_wait_seconds)
        # What a unit's fingerprint depends on besides its files: a digest stored under other
        # rules (a reload or restart changed them) never matches, so the unit is scanned again.
        policy = root.policy
        rules = (
            _DIGEST_FORMAT,
            policy.ignore,
            policy.in_progress,
            policy.content_digest,
            policy.max_files_per_unit,
        )
        self._key = hashlib.blake2b(repr(rules).encode(), digest_size=32).digest()

    def keyed(self, digest: bytes | None) -> bytes | None:
        """A scan digest as stored: keyed by the rules fingerprints depend on."""
        if digest is None:
            return None
        return hashlib.blake2b(digest, key=self._key, digest_size=16).digest()

    def digest(self, unit: Unit) -> bytes | None:
        """The unit's scan digest now, as stored (None: no shortcut, scan it)."""
        return self.keyed(
            scan_digest(
                unit.path,
                follow_top=unit.name == ".",
                ignore=self.ignore,
                max_files=self.config.policy.max_files_per_unit,
                watched_root=_above(unit),
            )
        )

    def to_store(self, manifest: Manifest, now: float) -> bytes | None:
        """The digest to remember with the fingerprint of `manifest` (scanned just before
        `now`, wall clock); with content digests, None while a file changed less than
        `DIGEST_MIN_AGE` ago."""
        young = manifest.newest_change_ns > (now - DIGEST_MIN_AGE) * 1e9
        if young and self.config.policy.content_digest != "none":
            return None
        return self.keyed(manifest.scan_digest)

    def scan(self, unit: Unit) -> Manifest:
        return scan_unit(
            unit.path,
            follow_top=unit.name == ".",
            ignore=self.ignore,
            in_progress=self.in_progress,
            max_files=self.config.policy.max_files_per_unit,
            watched_root=_above(unit),
        )


def _above(unit: Unit) -> str | None:
    """The root, for a unit more than one level below it (see `scan_unit`)."""
    return unit.root if os.sep in unit.name else None
