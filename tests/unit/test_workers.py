"""pvpn-server's workers, the pure part: port slices, per-worker settings and limits, tokens
that name their worker, the listening groups' program, the rules of several queues."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from pvpn import firewall, workers
from pvpn.config import ServerConfig
from pvpn.errors import ConfigError


def config(**settings: object) -> ServerConfig:
    base = ServerConfig(Path("s.toml"), "server", [("0.0.0.0", 4433)], Path("c"), Path("k"),
                        Path("u"), 4000, (10000, 32767), "pvpns",
                        control=Path("/run/pvpn/server.ctl"),
                        state_file=Path("/var/lib/pvpn/server.state"))
    for key, value in settings.items():
        setattr(base, key, value)
    return base


def test_port_slices_are_disjoint_and_cover_the_range() -> None:
    for ports, n in (((10000, 32767), 2), ((61000, 64999), 3), ((2000, 2004), 5)):
        slices = workers.port_slices(ports, n)
        assert len(slices) == n
        assert slices[0][0] == ports[0] and slices[-1][1] == ports[1]
        for (_, high), (low, _) in zip(slices, slices[1:]):
            assert low == high + 1
        sizes = [h - lo + 1 for lo, h in slices]
        assert max(sizes) - min(sizes) <= 1
    assert workers.port_slices((10000, 32767), 1) == [(10000, 32767)]
    with pytest.raises(ConfigError):
        workers.port_slices((2000, 2001), 3)


def test_each_worker_gets_its_slice_queue_files_and_share_of_the_limits() -> None:
    c = config(workers=2, sessions_per_user=10, nat_flows_per_user=16384,
               nat_flows_per_session=8192)
    w0, w1 = workers.worker_config(c, 0), workers.worker_config(c, 1)
    assert (w0.nat_ports, w1.nat_ports) == ((10000, 21383), (21384, 32767))
    assert (w0.queue, w1.queue) == (4000, 4001)
    assert w0.state_file == Path("/var/lib/pvpn/server.state.w0")
    assert w1.control == Path("/run/pvpn/server.ctl.w1")
    assert (w0.worker, w1.worker) == (0, 1)
    # A user's sessions and mappings over the whole server stay within the setting.
    assert w0.sessions_per_user + w1.sessions_per_user == 10
    assert w0.nat_flows_per_user + w1.nat_flows_per_user == 16384
    assert w0.nat_flows_per_session == 8192
    small = workers.worker_config(config(workers=4, sessions_per_user=2, nat_flows_per_user=6,
                                         nat_flows_per_session=6), 3)
    assert small.sessions_per_user == 1 and small.nat_flows_per_user == 1
    assert small.nat_flows_per_session == 1
    assert c.nat_ports == (10000, 32767), "the parent's config is left as it was"
    with pytest.raises(ConfigError):
        workers.worker_config(c, 2)


def test_tokens_name_their_worker_only_with_several() -> None:
    random = bytes(range(200, 216))
    assert workers.worker_token(random, 0, 1) == random
    token = workers.worker_token(random, 1, 2)
    assert token[0] == 1 and token[1:] == random[1:]
    assert workers.token_worker(token, 2) == 1
    assert workers.token_worker(token, 1) is None
    assert workers.token_worker(bytes([7]) + random[1:], 2) is None, "no such worker"
    assert workers.token_worker(None, 2) is None
    assert workers.token_worker(b"\x01short", 2) is None


def ipv4_header(source: str) -> bytes:
    return bytes([0x45, 0, 0, 60, 0, 0, 0x40, 0, 64, 6, 0, 0]) + \
        ipaddress.ip_address(source).packed + bytes([10, 0, 0, 1])


def ipv6_header(source: str) -> bytes:
    return bytes([0x60, 0, 0, 0, 0, 20, 6, 64]) + ipaddress.ip_address(source).packed + \
        ipaddress.ip_address("fd00::1").packed


def test_the_program_routes_named_sources_and_hashes_the_rest() -> None:
    program = workers.redirect_program([("10.1.0.2", 1), ("fd77::5", 0), ("10.1.0.3", 0),
                                        ("::ffff:10.9.9.9", 1), ("fd77::6", 1)])
    run = workers.run_program
    assert run(program, ipv4_header("10.1.0.2")) == 1
    assert run(program, ipv4_header("10.1.0.3")) == 0
    assert run(program, ipv4_header("10.9.9.9")) == 1, "a mapped address is its IPv4 one"
    assert run(program, ipv4_header("10.1.0.4")) == workers.FALLBACK
    assert run(program, ipv6_header("fd77::5")) == 0
    assert run(program, ipv6_header("fd77::6")) == 1
    assert run(program, ipv6_header("fd77::7")) == workers.FALLBACK
    assert run(program, ipv6_header("fd78::5")) == workers.FALLBACK
    assert run(workers.redirect_program([]), ipv4_header("10.1.0.2")) == workers.FALLBACK
    assert len(workers.encode_program(program)) == 8 * len(program)
    # Bounded: at most MAX_REDIRECTS entries, and every jump fits classic BPF's 8 bits.
    many = workers.redirect_program((f"fd77::{i:x}", 1) for i in range(100))
    assert len(many) <= 3 + 2 + 9 * workers.MAX_REDIRECTS + 1
    assert all(jt < 256 and jf < 256 for _, jt, jf, _ in many)


def test_each_slice_replies_to_its_own_workers_queue() -> None:
    rules = firewall.server_worker_rules("pvpns", [(4000, (10000, 21383)),
                                                   (4001, (21384, 32767))])
    v4, v6 = rules.v4.splitlines(), rules.v6.splitlines()
    assert "-A PVPNS-IN -p tcp --dport 10000:21383 -j NFQUEUE --queue-num 4000" in v4
    assert "-A PVPNS-IN -p udp --dport 21384:32767 -j NFQUEUE --queue-num 4001" in v4
    assert "-A PVPNS-IN -p tcp --dport 21384:32767 -j NFQUEUE --queue-num 4001" in v6
    assert any("echo-reply" in r and "=21384:32767" in r and "queue-num 4001" in r for r in v4)
    assert any("packet-too-big" in r and "=10000:21383" in r and "queue-num 4000" in r
               for r in v6)
    assert any("--oif pvpns-big1" in r and "--dport 21384:32767" in r for r in v4)
    assert "-A PVPNS-OUT -o pvpns-big+ -m owner --uid-owner 0-4294967294 -j DROP" in v4
    assert "queue-bypass" not in rules.v4 + rules.v6, "never fail open"
    assert not any(r.startswith("-A PVPNS-IN -p icmp") and "NFQUEUE" in r and "=" not in r
                   for r in v4), "no ICMP of no slice is queued"
    kept = firewall.server_worker_rules("pvpns", [(4000, (10000, 21383))], icmp=False)
    assert not any("NFQUEUE" in r and "icmp" in r for r in kept.v4.splitlines())
    assert firewall.server_tun("pvpns") == "pvpns-big"
    assert firewall.server_tun("pvpns", 1) == "pvpns-big1"


def test_a_resume_of_another_workers_session_is_handed_over_never_served(
        tmp_path: Path) -> None:
    """Two workers of one server (in memory): alice's session is worker 1's; her resume
    reaching worker 0 is authenticated there, asked to be routed to worker 1 and closed
    without a CLOSE, and worker 0 makes no session of it; at worker 1 it resumes."""
    from test_protocol import SERVER_IP, Harness, make_node

    from net import authorized, first, make_pki, user_keys
    from pvpn.commands import ResumeElsewhere
    from pvpn.user import LinkEstablished

    ((crt, key),) = make_pki(tmp_path, {"server": SERVER_IP}).values()
    keys = user_keys("alice")
    p = {"ca": str(tmp_path / "ca" / "ca.crt"), "crt": str(crt), "key": str(key),
         "users": authorized(tmp_path / "users", keys), "keys": keys}

    def worker(index: int) -> Harness:
        node = make_node(p)
        node.config.workers = 2
        node.config = workers.worker_config(node.config, index)
        return Harness(p, node=node)

    w0, w1 = worker(0), worker(1)
    w1.connect(1, "alice")
    est = first(w1.events[1], LinkEstablished)
    assert est.token[0] == 1, "the token names its worker"
    handed: list[ResumeElsewhere] = []
    w0.net.carry_out = lambda name, cmd, carry=w0.net.carry_out: (  # type: ignore[method-assign]
        handed.append(cmd) if isinstance(cmd, ResumeElsewhere) else carry(name, cmd))
    w0.connect(1, "alice", resume=(est.session, est.token))
    assert [c.worker for c in handed] == [1]
    assert not any(isinstance(e, LinkEstablished) for e in w0.events[1])
    assert w0.node.sessions == {}, "worker 0 never holds worker 1's session"
    w0.node.hand_off(handed[0].link, w0.now)
    w0.transfer()
    assert 1 in w0.closed or w0.node.links[1].closed
    assert any(r.event == "link:closed" and "handed to worker 1" in str(r.reason)
               for r in w0.logs)
    # At its own worker the same resume resumes.
    w1.node.link_lost(1, w1.now)
    w1.closed.add(1)
    w1.connect(2, "alice", resume=(est.session, est.token))
    assert first(w1.events[2], LinkEstablished).resumed


def minimal_server_config(tmp_path: Path) -> tuple[Path, str]:
    """A server.toml path in ``tmp_path`` and the least [server] table it loads with (its
    files made), for a test of one more setting."""
    for name in ("server.crt", "server.key"):
        (tmp_path / name).write_text("x")
    (tmp_path / "users").mkdir()
    base = (f'[server]\nname = "server"\nlisten = ["127.0.0.1:4433"]\n'
            f'certificate = "{tmp_path}/server.crt"\nprivate_key = "{tmp_path}/server.key"\n'
            f'authorized_keys = "{tmp_path}/users"\n')
    return tmp_path / "server.toml", base


def test_the_workers_setting(tmp_path: Path) -> None:
    from pvpn.config import load_server_config

    path, base = minimal_server_config(tmp_path)
    path.write_text(base)
    assert load_server_config(path).workers == 1, "one process unless asked"
    path.write_text(base + "workers = 2\n")
    assert load_server_config(path).workers == 2
    for bad in ("workers = 0", "workers = 17", "workers = 2\nqueue = 65535",
                'workers = 3\nnat_ports = "2000-2001"'):
        path.write_text(base + bad + "\n")
        with pytest.raises(ConfigError, match="workers"):
            load_server_config(path)


def test_a_worker_that_never_served_stops_the_server_one_that_served_is_started_again() -> None:
    # Started again each second for ever, its share of new connections waiting unserved.
    failed, delay = 0, None
    for _ in range(workers.MAX_FAILED_STARTS):
        failed, delay = workers.after_end(failed, served=False, ever_served=False)
    assert failed == workers.MAX_FAILED_STARTS and delay is None
    # One that served and crashed: again at once, its count from zero.
    assert workers.after_end(failed, served=True, ever_served=True) == (0, workers.RESTART_DELAY)
    # One that served before and now fails to start (a config typo, then a crash): started
    # again later each time, never the whole server stopped for it.
    delays = []
    failed = 0
    for _ in range(12):
        failed, delay = workers.after_end(failed, served=False, ever_served=True)
        assert delay is not None
        delays.append(delay)
    assert delays[:3] == [1.0, 2.0, 4.0] and max(delays) == workers.MAX_RESTART_DELAY
