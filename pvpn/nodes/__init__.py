"""The nodes a user's link reaches: the shared handshake (:mod:`pvpn.nodes.base`), the server
(:mod:`pvpn.nodes.server`) and the gateway (:mod:`pvpn.nodes.gateway`)."""
