"""Journal-based synchronous file replication (issue 4).

Entry point for the node daemon: ``service.ReplicationService``.
"""
