"""Farm modules: one VIP held by every node, connections shared out by 256 hashed buckets.

See docs/farm.md. The daemon uses `FarmService`; the rest is its machinery.
"""

from ha_runtime.farm.member import Membership, PeerView, Transition
from ha_runtime.farm.service import FarmService, FarmStatus, MemberStatus
from ha_runtime.farm.spec import FarmRule, FarmSettings, FarmSpec, parse_farm_section

__all__ = [
    "FarmRule",
    "FarmService",
    "FarmSettings",
    "FarmSpec",
    "FarmStatus",
    "MemberStatus",
    "Membership",
    "PeerView",
    "Transition",
    "parse_farm_section",
]
