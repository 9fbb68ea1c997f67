"""Mirror modules: one primary holding the VIP and the application, one SECOND.

The path of a heartbeat to a VIP move is drawn in docs/mirror.md. `module.MirrorModule`
runs a mirror module on this node: it feeds `decision.decide` (pure) with the peer's last
heartbeat, the data `ha_runtime.generation` and the operator's requests, and applies the
`Decision` (scripts, VIP, generation file, events). `supervisor.ReplicationSupervisor`
starts and stops the replication children (`ha_runtime.replication`) of its directories.
"""
