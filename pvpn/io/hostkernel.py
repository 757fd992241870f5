"""The client host's kernel, thin: one instance's iptables rules (counted), the sessions'
TCP sockets through sock_diag (aborted, or made to answer), and all that ClientHost asks of
the kernel in one object (:class:`ClientKernel`).

What to do with what the kernel says (recover sessions after a restart, put back rules someone
removed, quarantine a slot, when to abort or reset) is pvpn.nodes.client.ClientHost's; these
only ask and act (and :func:`watch_rules` asks again and again)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
from typing import Callable

from pvpn import firewall
from pvpn import packet as pk
from pvpn.errors import PvpnError
from pvpn.io import conntrack, rules, sockdiag
from pvpn.io.sessiondevices import SessionDevices, Take
from pvpn.io.sockdiag import SocketOwners
from pvpn.io.tun import PLAIN_HDR
from pvpn.nodes.client import RuleRunner, SlotSession
from pvpn.reset import tcp_probe

#: How often the kernel's rules are compared with the sessions held (seconds): someone else's
#: firewall reload or `iptables -t mangle -F` takes them away; they are put back within this.
RULES_CHECK_EVERY = 5.0


class InstanceRules:
    """The rules of one pvpn-client instance (pvpn.nodes.client.RuleRunner), its sessions'
    among them. Every change pvpn-client makes to them bumps ``epoch``: a check of the
    kernel's rules read before a change is not acted on (it would "repair" that change)."""

    def __init__(self, instance: str, mark_mask: int) -> None:
        self.instance = instance
        self.mark_mask = mark_mask
        self.epoch = 0

    def install_session(self, session: SlotSession) -> None:
        """The session's rules, fully formed, in one step (PvpnError)."""
        self.apply(firewall.client_session(
            self.instance, session.slot, session.uid, session.networks, session.queue,
            session.mark, self.mark_mask, session.tun))

    def remove_session(self, session: SlotSession) -> list[str]:
        """The session's rules go; the errors."""
        p = firewall.chain_prefix(self.instance)
        errors = self.remove(firewall.client_session_removal(
            self.instance, session.slot, session.uid, session.mark, self.mark_mask,
            session.tun))
        if errors:  # a jump of another shape (say, one an older version left): find them all
            chains = list(firewall.session_chains(self.instance, session.slot))
            errors = self.remove_chains(chains, f"{p}-OUT") + self.remove_chains(
                chains, f"{p}-IN")
        return errors

    def write_id(self, session: SlotSession) -> str | None:
        """Write the session's id into its rules (a restarted pvpn-client reads it); why not."""
        try:
            self.apply(firewall.client_session_attached(
                self.instance, session.slot, session.mark, self.mark_mask, session.session_id))
        except PvpnError as exc:
            return str(exc)
        return None

    def saved(self) -> list[str]:
        """iptables-save of each family, IPv4 then IPv6."""
        return [rules.saved(4), rules.saved(6)]

    def apply(self, ruleset: firewall.RuleSet) -> None:
        self.epoch += 1
        rules.apply(ruleset)

    def remove(self, commands: list[list[str]]) -> list[str]:
        self.epoch += 1
        return rules.remove(commands)

    def run_each(self, commands: list[list[str]], versions: tuple[int, ...]) -> list[str]:
        self.epoch += 1
        return rules.run_each(commands, versions)

    def remove_chains(self, chains: list[str], referring: str) -> list[str]:
        self.epoch += 1
        return rules.remove_chains(chains, referring)

    def ensure_jump(self, builtin: str, chain: str) -> None:
        self.epoch += 1
        rules.ensure_jump(builtin, chain)

    def ensure_rule(self, rule: str) -> None:
        self.epoch += 1
        rules.ensure_rule(rule)

    def remove_instance(self) -> list[str]:
        self.epoch += 1
        return rules.remove_instance(self.instance)


class ClientKernel:
    """What pvpn.nodes.client.ClientHost asks of the kernel (its HostKernel): each session's
    TUN device and queue (``devices``, the queue's packets to ``take(session)``), its rules,
    the marks of its connections (conntrack) and its user's TCP sockets (sock_diag)."""

    def __init__(self, rules: InstanceRules, devices: SessionDevices, owners: SocketOwners,
                 take: Callable[[SlotSession], Take]) -> None:
        self.instance_rules = rules
        self.rules: RuleRunner = rules  # as ClientHost runs them
        self.devices = devices
        self.owners = owners
        self.take = take

    def install(self, session: SlotSession) -> None:
        """TUN device, queue, then rules: the rules go in last, fully formed, in one step."""
        self.attach_devices(session)
        self.instance_rules.install_session(session)

    def attach_devices(self, session: SlotSession) -> None:
        self.devices.attach(session, self.take(session))

    def has_devices(self, session: SlotSession) -> bool:
        return self.devices.attached(session)

    def uninstall(self, session: SlotSession) -> list[str]:
        errors = self.instance_rules.remove_session(session)
        self.devices.detach(session)
        return errors

    def write_id(self, session: SlotSession) -> str | None:
        return self.instance_rules.write_id(session)

    def marked(self, mark: int) -> int:
        return conntrack.count_marked(mark, self.instance_rules.mark_mask)

    def forget_marked(self, mark: int) -> int:
        return conntrack.forget_marked(mark, self.instance_rules.mark_mask)

    def forget_marks(self, session: SlotSession) -> int | str:
        """The marks the session's connections carry are forgotten (conntrack)."""
        try:
            return conntrack.forget_marked(session.mark, self.instance_rules.mark_mask)
        except PvpnError as exc:  # the slot is checked again before it is given out
            return f"failed: {exc}"

    def abort_connections(self, session: SlotSession) -> int | str:
        return abort_connections(self.owners, session)

    def reset_connections(self, session: SlotSession) -> int:
        fd = self.devices.tun_fds.get(session.slot)
        return 0 if fd is None else probe_connections(self.owners, session, fd,
                                                      fd in self.devices.vnet)


def abort_connections(owners: SocketOwners, session: SlotSession) -> int | str:
    """Abort each TCP connection of the session's user that the session carried (connected
    or connecting), by the cookie that names exactly that socket (SOCK_DESTROY): the
    application's next call fails with ECONNABORTED. An orphan of hers is aborted too: a
    socket her program closed that still retransmits its FIN would send it in clear once the
    session's rules are gone (SOCK_DESTROY aborts an orphan in FIN_WAIT1 as `ss -K` does; seen
    on Linux 6.18). Listeners and other users' sockets on the same ports are left alone. How
    many, or what failed."""
    aborted = 0
    for flow in [f for f in session.flows if f.proto == pk.PROTO_TCP]:
        try:
            found = owners.find(flow)
            holder = found.uid if found.made_by is None else found.made_by
            if holder != session.uid or found.state not in sockdiag.TCP_CONNECTION:
                continue
            owners.abort(flow, found.cookie)
        except PvpnError as exc:
            return f"failed after {aborted}: {exc}"
        aborted += 1
    return aborted


def probe_connections(owners: SocketOwners, session: SlotSession, tun: int,
                      vnet: bool = False) -> int:
    """Write a probe (pvpn.reset.tcp_probe) into the session's TUN device for each
    synchronized TCP socket of the session's user, as if from its remote end: it answers
    with a challenge ACK, which the server resets. A connecting socket is not probed (it
    would take the SYN for a simultaneous open). How many were probed."""
    probed = 0
    for flow in [f for f in session.flows if f.proto == pk.PROTO_TCP]:
        try:
            uid, state = owners.socket(flow)
        except PvpnError:
            continue
        if uid != session.uid or state not in sockdiag.TCP_SYNCHRONIZED:
            continue
        try:
            # ``vnet``: the device takes a virtio_net_hdr before each packet (sessiondevices).
            os.write(tun, (PLAIN_HDR if vnet else b"") + tcp_probe(flow, int.from_bytes(os.urandom(4), "big")))
        except OSError:
            break
        probed += 1
    return probed


async def watch_rules(rules: InstanceRules, stop: asyncio.Event, any_held: Callable[[], bool],
                      check: Callable[[list[str], int], object],
                      warn: Callable[[str], object]) -> None:
    """Every RULES_CHECK_EVERY seconds while sessions are held, until ``stop``: the kernel's
    rules to ``check`` (ClientHost.check_rules), with the epoch they were read at.
    iptables-save runs in a thread of its own, so the packet path does not wait for it; the
    thread is made at once and lives as long as the watch (one, whatever happens)."""
    loop = asyncio.get_running_loop()
    reader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rules")
    reader.submit(lambda: None).result()
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=RULES_CHECK_EVERY)
                return
            except asyncio.TimeoutError:
                pass
            if not any_held():
                continue
            epoch = rules.epoch
            try:
                saved = await loop.run_in_executor(reader, rules.saved)
            except (PvpnError, OSError, subprocess.SubprocessError) as exc:
                warn(f"cannot read the rules: {exc}")
                continue
            check(saved, epoch)
    finally:
        reader.shutdown(wait=False)
