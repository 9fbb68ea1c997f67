"""hapair runtime: heartbeats, virtual IPs, failover and replication on each node."""
