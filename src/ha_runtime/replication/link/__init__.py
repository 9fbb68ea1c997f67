"""The replication link: framing (``framing``), TLS (``tls``), the primary's end
(``primary``) and the wire part of the secondary's session (``secondary``)."""
