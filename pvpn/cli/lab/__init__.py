"""The lab: pvpn on one machine, built from network namespaces (``pvpn lab``).

``topology`` computes hosts and addresses, ``commands`` runs every external command,
``netns`` builds namespaces and links, ``users`` manages the lab's local users, ``services``
writes the node and target configurations, ``lab`` puts it together (up, down, exec, info),
``demo`` tells the story, ``cli`` is the command line.
"""
