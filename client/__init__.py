"""pvpn-client and `pvpn connect`: the client host's programs (installed as pvpn.client)."""
