"""Heartbeats: one authenticated UDP stream per module on every heartbeat network.

`packet` is the wire format and the replay guard, `keys` the per-pair keys, `persisted`
what survives a restart (incarnation, replay marks), `service.HeartbeatService` the
sockets (send and receive loops), and `peers.PeerTable` what the valid heartbeats tell
the modules about each peer. See docs/mirror.md for the path from a packet to a VIP move.
"""
