"""Journal-based synchronous file replication (issue 4); entry point: ``service.ReplicationService``."""
