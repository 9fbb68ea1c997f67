"""ha-lab: a lab of real Linux servers (systemd-nspawn nodes) on one machine."""
