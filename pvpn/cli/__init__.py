"""The tools around the nodes: the `pvpn` command (keys, connect, status, disconnect, trace),
the lab of network namespaces and the benchmark. They may open sockets, run programs and read
the clock; the core (``pvpn``) and its adapters (``pvpn.io``) never import them."""
