"""Farm modules: one VIP held by every node, connections shared out by 256 hashed buckets.

See docs/farm.md. The daemon uses `FarmService`; the rest is its machinery.
"""

from ha_runtime.farm.member import Membership, PeerView, Transition
from ha_runtime.farm.service import FarmService, FarmStatus, MemberStatus
from ha_runtime.farm.spec import FarmSpec

__all__ = [
    "FarmService",
    "FarmSpec",
    "FarmStatus",
    "MemberStatus",
    "Membership",
    "PeerView",
    "Transition",
]
