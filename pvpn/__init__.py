"""pvpn: a personal VPN. The core in this package opens no socket and reads no clock."""

__version__ = "0.1.0"
