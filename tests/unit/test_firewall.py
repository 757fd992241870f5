"""Firewall rules as data: what each session installs, and reading it back after a crash."""

from __future__ import annotations

import ipaddress

from pvpn import firewall

NETS = [ipaddress.ip_network("10.77.1.0/24"), ipaddress.ip_network("fd77:0:0:1::/64")]


def test_session_rules_feed_only_the_owner_and_ownerless_marked_packets() -> None:
    rules = firewall.client_session("pvpnc", 3, 1001, NETS, 3003, 0x40000, 0xFF0000, "pvpnc3")
    v4 = rules.v4.splitlines()
    assert "-A PVPNC-S3 -d 10.77.1.0/24 -m owner --uid-owner 1001 -j NFQUEUE --queue-num 3003" in v4
    assert ("-A PVPNC-S3 -d 10.77.1.0/24 -m owner ! --uid-owner 0-4294967294 -m connmark "
            "--mark 0x40000/0xff0000 -j NFQUEUE --queue-num 3003") in v4
    assert "-A PVPNC-IN -i pvpnc3 -j PVPNC-S3I" in v4
    assert "fd77:0:0:1::/64" in rules.v6 and "10.77.1.0/24" not in rules.v6
    assert "queue-bypass" not in rules.v4 + rules.v6, "never fail open"


def as_saved(text: str) -> str:
    """iptables-save prints what iptables-restore took, in the same syntax."""
    return text.replace("*mangle\n", "*mangle\n:PREROUTING ACCEPT [0:0]\n")


def test_installed_sessions_are_read_back() -> None:
    a = firewall.client_session("pvpnc", 0, 1001, NETS, 3000, 0x10000, 0xFF0000, "pvpnc0")
    b = firewall.client_session("pvpnc", 5, 1002, NETS[:1], 3005, 0x60000, 0xFF0000, "pvpnc5")
    base = firewall.client_base("pvpnc")
    v4 = base.v4 + as_saved(a.v4) + as_saved(b.v4) + ":PVPNC-S9 - [0:0]\n"
    v6 = base.v6 + as_saved(a.v6) + as_saved(b.v6)
    sessions, broken = firewall.parse_installed_sessions("pvpnc", [v4, v6])
    assert [(s.slot, s.uid, s.queue, s.mark, s.tun) for s in sessions] == [
        (0, 1001, 3000, 0x10000, "pvpnc0"), (5, 1002, 3005, 0x60000, "pvpnc5")]
    assert [str(n) for n in sessions[0].networks] == ["10.77.1.0/24", "fd77:0:0:1::/64"]
    assert broken == ["PVPNC-S9"]


def test_other_instances_are_not_ours() -> None:
    a = firewall.client_session("other", 0, 1001, NETS, 3000, 0x10000, 0xFF0000, "other0")
    assert firewall.parse_installed_sessions("pvpnc", [a.v4, a.v6]) == ([], [])
