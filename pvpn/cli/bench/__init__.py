"""``pvpn bench``: pvpn measured beside a direct path and other VPNs, in labs of its own.

``paths`` sets up each path (direct routing, pvpn over one hop and through gateways,
OpenVPN, wireguard-go, sshuttle) in a lab of network namespaces; ``load`` is the traffic that
runs inside them (WebStone-style HTTP load, round trips, an echo server); ``measure`` runs one
measurement; ``scale`` makes the scale test's temporary users; ``run`` puts a whole run
together and always tears it down; ``report`` (pure) turns the raw results into medians,
ratios, targets and tables; ``cli`` is ``pvpn bench``.
"""
