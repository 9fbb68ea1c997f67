"""Per-pair heartbeat keys: a node can authenticate heartbeats only to and from its peers.

With one site key, any node of a farm of three or more can sign packets in another node's
name. The deploy therefore makes one random key per pair of nodes (hapair.cluster.runtime)
and gives each node only the keys of the pairs it belongs to, next to the site key:
`<dir of site_key>/heartbeat/<peer>.key`, root-only like the site key. A MAC made with the
key of {a, b} can only come from a or b, so node c cannot pass as a to b.

A node without the file of a peer (a site deployed before pair keys) uses the site key with
that peer, as before. The two are reconciled at run time (service.py): a receiver accepts
a peer's site-key packets only until that peer has sent one packet with the pair key (then
never again, saved in state_dir), and a sender sends both forms until it has received a
pair-keyed packet from the peer, so a rolling restart never makes a node look dead.
Residual: until the first pair-keyed packet of a peer has arrived, a holder of the site key
can still forge that peer's heartbeats, as with the site key alone. (Deriving per-node keys
from the site key would not help: every node holds the site key and could derive them.)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ha_runtime.security import MIN_KEY_BYTES, InsecureFile, check_private

PAIR_KEYS_DIR = "heartbeat"


def pair_key_path(site_key: Path, peer: str) -> Path:
    return site_key.parent / PAIR_KEYS_DIR / f"{peer}.key"


def read_pair_keys(site_key: Path, peers: Iterable[str]) -> dict[str, bytes]:
    """The pair key of each peer that has one; InsecureFile names a bad file and the fix."""
    keys: dict[str, bytes] = {}
    for peer in peers:
        path = pair_key_path(site_key, peer)
        if not path.exists():
            continue
        check_private(path, f"heartbeat key of {peer}")
        key = path.read_bytes().rstrip(b"\r\n")
        if len(key) < MIN_KEY_BYTES:
            raise InsecureFile(
                f"heartbeat key of {peer} {path} is too short: expected at least"
                f" {MIN_KEY_BYTES} bytes"
            )
        keys[peer] = key
    return keys
