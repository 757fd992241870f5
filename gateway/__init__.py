"""pvpn-gateway: splices personal VPNs through a chain of hops (installed as pvpn.gateway)."""
