"""The lab's hosts, links and addresses, as plain data (no I/O).

Addressing follows docs/design.md "Lab addressing": hosts in chain order client, gw1..gwN,
server, target; link k joins host k and host k+1 with 10.77.k.0/24 and fd77:0:0:k::/64, host k
is .1 / ::1 on it, host k+1 is .2 / ::2.  Every host but the target has a default route to its
right-hand neighbour; IP forwarding is off everywhere, so without pvpn no host reaches past its
neighbour.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from pvpn.cli.lab.errors import LabError

DEFAULT_NAME = "pvpnlab"
# The name prefixes namespaces and veth names; IFNAMSIZ is 16 bytes with the NUL, so an
# interface name has at most 15 characters: 10 (name) + "-" + 2 (link) + 1 (side) = 14.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]{0,9}")  # fullmatch: "t\n" is no name
# Links are numbered 0..N+1 and written as decimal digits in the IPv6 group
# (fd77:0:0:k::/64), which stays unambiguous only below 10.
MAX_GATEWAYS = 8

LAB_ROOT = Path("/run/pvpn-lab")

PVPN_PORT = 4433
HTTP_PORT = 80
IPERF_PORT = 5201
ECHO_PORT = 7
SSH_PORT = 22

LAB_USERS: tuple[str, ...] = ("alice", "bob", "carol")
# Users whose pvpn key is authorised at the nodes; carol's key is authorised nowhere.
AUTHORIZED_USERS: tuple[str, ...] = ("alice", "bob")


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid lab name, else raise :class:`LabError`."""
    if not NAME_PATTERN.fullmatch(name):
        raise LabError(
            f"invalid lab name {name!r}: use 1 to 10 characters, a lower-case letter "
            "followed by lower-case letters or digits (it prefixes namespace and "
            "interface names)"
        )
    return name


@dataclass(frozen=True)
class Host:
    """One lab host: a network namespace named ``<lab>-<role>``."""

    role: str  # "client", "gw1".., "server", "target"
    index: int  # position in the chain, 0 = client
    namespace: str


@dataclass(frozen=True)
class Link:
    """The veth link k between host k (left end) and host k+1 (right end)."""

    index: int
    left: Host
    right: Host
    left_ifname: str
    right_ifname: str
    subnet4: ipaddress.IPv4Network
    subnet6: ipaddress.IPv6Network

    @property
    def left4(self) -> ipaddress.IPv4Address:
        return self.subnet4.network_address + 1

    @property
    def right4(self) -> ipaddress.IPv4Address:
        return self.subnet4.network_address + 2

    @property
    def left6(self) -> ipaddress.IPv6Address:
        return self.subnet6.network_address + 1

    @property
    def right6(self) -> ipaddress.IPv6Address:
        return self.subnet6.network_address + 2


@dataclass(frozen=True)
class Topology:
    """All hosts and links of one lab, plus the paths of its state directory."""

    name: str
    gateways: int
    hosts: tuple[Host, ...]
    links: tuple[Link, ...]

    @property
    def root(self) -> Path:
        return LAB_ROOT / self.name

    def host(self, role: str) -> Host:
        for host in self.hosts:
            if host.role == role:
                return host
        roles = ", ".join(h.role for h in self.hosts)
        raise LabError(f"lab {self.name} has no host {role!r} (hosts: {roles})")

    def host_dir(self, role: str) -> Path:
        return self.root / role

    def left_link(self, role: str) -> Link | None:
        """The link on the host's left (towards the client), None for the client."""
        index = self.host(role).index
        return self.links[index - 1] if index > 0 else None

    def right_link(self, role: str) -> Link | None:
        """The link on the host's right (towards the target), None for the target."""
        index = self.host(role).index
        return self.links[index] if index < len(self.links) else None

    def addresses(self, role: str) -> dict[str, dict[str, str]]:
        """The host's interface addresses, keyed by interface name."""
        out: dict[str, dict[str, str]] = {}
        left, right = self.left_link(role), self.right_link(role)
        # The host is the right end of the link on its left, the left end of the one on its right.
        if left is not None:
            out[left.right_ifname] = _interface(left, left.right4, left.right6, left.left)
        if right is not None:
            out[right.left_ifname] = _interface(right, right.left4, right.left6, right.right)
        return out

    # The chain a user's session takes.
    @property
    def gateway_roles(self) -> tuple[str, ...]:
        """``gw1``..``gwN`` in chain order."""
        return tuple(f"gw{i}" for i in range(1, self.gateways + 1))

    @property
    def chain_roles(self) -> tuple[str, ...]:
        """The pvpn nodes a session passes after the client: the gateways, then the server."""
        return (*self.gateway_roles, "server")

    def listen_link(self, role: str) -> Link:
        """The link a gateway or the server listens on: the one on its left."""
        link = self.left_link(role)
        if link is None or role not in self.chain_roles:
            raise LabError(f"{role!r} is not a pvpn node that listens in lab {self.name}")
        return link

    def endpoints(self, role: str) -> list[str]:
        """Where a gateway or the server listens: ``V4:PORT`` and ``[V6]:PORT``."""
        link = self.listen_link(role)
        return [f"{link.right4}:{PVPN_PORT}", f"[{link.right6}]:{PVPN_PORT}"]

    def next_hop(self, role: str) -> str:
        """The role of the host right of ``role`` (a gateway's next hop)."""
        link = self.right_link(role)
        if link is None:
            raise LabError(f"{role!r} is the last host of lab {self.name}")
        return link.right.role

    # The addresses the lab's story needs most.
    @property
    def server_link(self) -> Link:
        """The link on the server's left: where the server listens."""
        link = self.left_link("server")
        if link is None:  # the server is never first in the chain
            raise LabError("lab topology has no link left of the server")
        return link

    @property
    def target_link(self) -> Link:
        """The link between the server and the target (the protected subnet)."""
        return self.links[-1]


def _interface(link: Link, ipv4: ipaddress.IPv4Address, ipv6: ipaddress.IPv6Address,
               peer: Host) -> dict[str, str]:
    return {"link": str(link.index), "ipv4": f"{ipv4}/{link.subnet4.prefixlen}",
            "ipv6": f"{ipv6}/{link.subnet6.prefixlen}", "peer": peer.role}


def build_topology(name: str, gateways: int = 0) -> Topology:
    """Compute the hosts and links of a lab named ``name`` with ``gateways`` gateways."""
    check_name(name)
    if not 0 <= gateways <= MAX_GATEWAYS:
        raise LabError(f"--gateways must lie between 0 and {MAX_GATEWAYS}, not {gateways}")
    roles = ["client", *(f"gw{i}" for i in range(1, gateways + 1)), "server", "target"]
    hosts = tuple(Host(role, i, f"{name}-{role}") for i, role in enumerate(roles))
    links = tuple(
        Link(
            index=k,
            left=hosts[k],
            right=hosts[k + 1],
            # "a" is link k's end on host k, "b" its end on host k+1.
            left_ifname=f"{name}-{k}a",
            right_ifname=f"{name}-{k}b",
            subnet4=ipaddress.IPv4Network(f"10.77.{k}.0/24"),
            subnet6=ipaddress.IPv6Network(f"fd77:0:0:{k}::/64"),
        )
        for k in range(len(hosts) - 1)
    )
    return Topology(name=name, gateways=gateways, hosts=hosts, links=links)


NAMESPACE_ROLE = re.compile(r"^(client|server|target|gw[1-9][0-9]?)$")


def is_lab_namespace(name: str, namespace: str) -> bool:
    """True if ``namespace`` belongs to lab ``name`` (so ``down`` finds it after a crash)."""
    prefix = f"{name}-"
    return namespace.startswith(prefix) and bool(
        NAMESPACE_ROLE.match(namespace[len(prefix):])
    )
