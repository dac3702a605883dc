"""The federation store and its protocol: layout, backends, signatures, verification."""

from edgefed.sync.backends import open_store
from edgefed.sync.manifest import Federation, Schedule
from edgefed.sync.signing import DeviceKey
from edgefed.sync.store import KeyExists, KeyMissing, Store
from edgefed.sync.verify import Rejected, Verifier

__all__ = [
    "DeviceKey",
    "Federation",
    "KeyExists",
    "KeyMissing",
    "Rejected",
    "Schedule",
    "Store",
    "Verifier",
    "open_store",
]
