"""The backends: what they should serve, one reconciler each, and the routing table."""
