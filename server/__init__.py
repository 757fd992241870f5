"""pvpn-server: the far end of personal VPNs (installed as pvpn.server)."""
