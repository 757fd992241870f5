"""The user's tunnel process in memory (pvpn.user.UserTunnel, what `pvpn connect` decides):
no socket, no clock. Scripted as conversations: pvpn-client's envelopes and the chain's events
in, envelopes and commands out."""

from __future__ import annotations

from pvpn.envelope import MsgType
from pvpn.events import ChainFailed, ChainUp, LinkEstablished, PacketsReceived
from pvpn.user import (
    Capture, CloseChain, CloseLocalLink, Finish, Reconnect, Reregister, Say, UserTunnel,
)

from net import DaemonEnd, ScriptedChain

UID = 1001
PROPOSED, ACCEPTED = bytes(16), bytes(range(16))
REGISTER = {"prefixes": ["10.77.1.0/24"], "server": "vpn.example:4433", "via": []}


def up(resumed: bool = False) -> ChainUp:
    return ChainUp(LinkEstablished(ACCEPTED, b"token", ["10.77.1.0/24"], "server", resumed),
                   ["server"])


def registered(capturing: bool = False) -> tuple[UserTunnel, DaemonEnd]:
    tunnel, daemon = UserTunnel(UID, PROPOSED, REGISTER, capturing), DaemonEnd(UID)
    tunnel.local_opening()
    tunnel.local_opened()
    ((mtype, fields),) = daemon.heard(tunnel)
    assert mtype is MsgType.REGISTER and fields["prefixes"] == REGISTER["prefixes"]
    daemon.say(tunnel, MsgType.REGISTERED, {"slot": 0, "queue": 3000, "uid": UID, "user": "a"})
    assert tunnel.registered is not None and not tunnel.registering
    return tunnel, daemon


def chained(tunnel: UserTunnel, resumed: bool = False) -> ScriptedChain:
    chain = ScriptedChain()
    tunnel.new_chain(chain)  # type: ignore[arg-type]
    chain.up, chain.nodes = True, ["server"]
    chain.events = [up(resumed)]
    tunnel.receive_remote(b"accept", 0.0)
    assert tunnel.chain_up is not None and not tunnel.chain_pending
    tunnel.accepted(tunnel.chain_up)
    return chain


def test_attach_waits_for_both_ends_and_goes_once_per_registration() -> None:
    tunnel, daemon = registered()
    tunnel.attach()
    assert daemon.heard(tunnel) == [], "no chain yet"
    chained(tunnel)
    tunnel.attach()
    tunnel.attach()
    ((mtype, fields),) = daemon.heard(tunnel)
    assert mtype is MsgType.ATTACH and fields == {"session": ACCEPTED, "nodes": ["server"]}


def test_packets_pass_both_ways_and_are_captured_when_asked() -> None:
    tunnel, daemon = registered(capturing=True)
    chain = chained(tunnel)
    assert tunnel.receive_local(daemon.channel.packet(b"", UID, b"out")) is True
    assert chain.sent == [b"out"]
    chain.events = [PacketsReceived([b"in1", b"in2"])]
    tunnel.receive_remote(b"...", 1.0)
    assert daemon.heard(tunnel) == [(MsgType.PACKET, b"in1"), (MsgType.PACKET, b"in2")]
    assert tunnel.commands == [Capture([b"out"]), Capture([b"in1", b"in2"])]


def test_nothing_goes_to_a_chain_not_up_nor_to_a_congested_daemon() -> None:
    tunnel, daemon = registered()
    assert tunnel.receive_local(daemon.channel.packet(b"", UID, b"out")) is False
    chain = chained(tunnel)
    tunnel.local_congested = True
    chain.events = [PacketsReceived([b"in"])]
    tunnel.receive_remote(b"...", 1.0)
    assert daemon.heard(tunnel) == [] and tunnel.commands == []


def test_a_refused_registration_says_why() -> None:
    tunnel, daemon = UserTunnel(UID, PROPOSED, REGISTER), DaemonEnd(UID)
    tunnel.local_opening()
    tunnel.local_opened()
    daemon.heard(tunnel)
    daemon.say(tunnel, MsgType.ERROR, {"code": "refused", "reason": "all slots in use"})
    assert tunnel.registered is None and tunnel.refused == "pvpn-client refused: all slots in use"
    lost = UserTunnel(UID, PROPOSED, REGISTER)
    lost.local_opening()
    lost.local_opened()
    lost.local_lost()
    assert lost.refused == "pvpn-client closed the connection" and lost.commands == []


def test_a_lost_or_stopping_pvpn_client_is_held_for_and_registered_with_again() -> None:
    tunnel, daemon = registered()
    chained(tunnel)
    daemon.say(tunnel, MsgType.ERROR, {"code": "daemon-stopping", "reason": "stopping"})
    assert tunnel.commands == [Say("stopping; holding your protected traffic until "
                                   "pvpn-client is back"), CloseLocalLink()]
    tunnel.commands.clear()
    tunnel.local_lost()
    assert type(tunnel.commands[0]) is Say and tunnel.commands[1] == Reregister()
    assert not tunnel.finished
    # The next connection starts afresh: numbered from 0, registered and attached again.
    tunnel.commands.clear()
    daemon = DaemonEnd(UID)
    tunnel.local_opening()
    tunnel.local_opened()
    daemon.say(tunnel, MsgType.REGISTERED, {"slot": 0, "queue": 3000, "uid": UID, "user": "a"})
    tunnel.attach()
    assert [mtype for mtype, _ in daemon.heard(tunnel)] == [MsgType.REGISTER, MsgType.ATTACH]


def test_a_disconnect_ends_the_vpn_with_0_and_another_error_with_1() -> None:
    for code, status in (("disconnected", 0), ("expired", 1)):
        tunnel, daemon = registered()
        chain = chained(tunnel)
        daemon.say(tunnel, MsgType.ERROR, {"code": code, "reason": "by root"})
        assert chain.closed == "by root", "CLOSE to the server through the chain"
        assert tunnel.commands == [Say("by root"), CloseChain(), CloseLocalLink(), Finish(status)]
        assert daemon.heard(tunnel) == [], "no UNREGISTER: pvpn-client ended it"


def test_the_users_end_unregisters_and_a_held_answer_is_said() -> None:
    tunnel, daemon = registered()
    chained(tunnel)
    tunnel.end(0, "ended by the user")
    assert tunnel.finished and tunnel.commands == [CloseChain(), Finish(0)]
    ((mtype, fields),) = daemon.heard(tunnel)
    assert mtype is MsgType.UNREGISTER and fields == {"reason": "ended by the user"}
    assert not tunnel.unregistered
    tunnel.commands.clear()
    daemon.say(tunnel, MsgType.STATUS_REPLY, {"sessions": [{"state": "held (dropping)"}],
                                              "more": False})
    assert tunnel.unregistered and type(tunnel.commands[0]) is Say
    tunnel.end(1, "again")
    assert tunnel.commands[1:] == [], "ends once"


def test_ending_without_pvpn_client_says_the_session_stays_held() -> None:
    tunnel, _ = registered()
    tunnel.local_lost()
    tunnel.commands.clear()
    tunnel.end(0, "ended by the user")
    (close, said, finish) = tunnel.commands
    assert close == CloseChain() and finish == Finish(0)
    assert type(said) is Say and "stays held" in said.text
    assert tunnel.unregistered


def test_a_chain_that_fails_before_it_is_up_is_the_opener_s_to_report() -> None:
    tunnel, _ = registered()
    chain = ScriptedChain()
    tunnel.new_chain(chain)  # type: ignore[arg-type]
    tunnel.remote_lost("connection refused")
    assert tunnel.chain_failure is not None and not tunnel.chain_pending
    assert tunnel.commands == [CloseChain()] and not tunnel.finished


def test_a_chain_that_goes_down_is_rebuilt_unless_fatal_and_a_new_session_attaches_again(
        ) -> None:
    tunnel, daemon = registered()
    chained(tunnel)
    tunnel.attach()
    daemon.heard(tunnel)
    tunnel.remote_lost("the first hop closed the connection")
    assert tunnel.commands[0] == CloseChain() and tunnel.commands[2] == Reconnect()
    tunnel.commands.clear()
    chained(tunnel, resumed=True)
    tunnel.renewed(up(resumed=True))
    assert daemon.heard(tunnel) == [], "resumed: the same server session, no new ATTACH"
    tunnel.remote_lost("again")
    chained(tunnel, resumed=False)
    tunnel.renewed(up(resumed=False))
    assert [mtype for mtype, _ in daemon.heard(tunnel)] == [MsgType.ATTACH]
    tunnel.commands.clear()
    fatal = ScriptedChain()
    tunnel.new_chain(fatal)  # type: ignore[arg-type]
    fatal.up = True
    fatal.events = [up()]
    tunnel.receive_remote(b"", 0.0)
    fatal.events = [ChainFailed(0, "server", "refused: revoked (auth-failed)", True)]
    tunnel.receive_remote(b"", 1.0)
    assert tunnel.finished and tunnel.commands[-1] == Finish(1)
