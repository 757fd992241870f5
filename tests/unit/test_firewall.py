"""Firewall rules as data: what each session installs, and reading it back after a crash."""

from __future__ import annotations

import ipaddress
from typing import Any

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


# ---------------------------------------------------------------- issue 9: whose packets cross


def rules_of(text: str, chain: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"-A {chain} ")]


def test_a_session_chain_is_entered_only_by_its_owner_and_its_ownerless_packets() -> None:
    """Every packet of every user crossed every session's chain (up to 34c7490): the jumps
    into a session's chain now match its uid, or no owner and its connection mark."""
    rules = firewall.client_session("pvpnc", 3, 1001, NETS, 3003, 0x40000, 0xFF0000, "pvpnc3")
    for text in (rules.v4, rules.v6):
        assert rules_of(text, "PVPNC-OUT") == [
            "-A PVPNC-OUT -m owner --uid-owner 1001 -j PVPNC-S3",
            "-A PVPNC-OUT -m owner ! --uid-owner 0-4294967294 -m connmark "
            "--mark 0x40000/0xff0000 -j PVPNC-S3",
        ]
    removal = firewall.client_session_removal("pvpnc", 3, 1001, 0x40000, 0xFF0000, "pvpnc3")
    assert ["-D", "PVPNC-OUT", "-m", "owner", "--uid-owner", "1001", "-j", "PVPNC-S3"] in removal
    assert ["-X", "PVPNC-S3"] in removal and ["-X", "PVPNC-S3I"] in removal


# What pvpn-client at 34c7490 installed for one session (firewall.client_session then), as
# iptables-save prints it: the same chains, and an unconditional jump into the session's chain.
LEGACY_V4 = """*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:PVPNC-IN - [0:0]
:PVPNC-OUT - [0:0]
:PVPNC-S2 - [0:0]
:PVPNC-S2I - [0:0]
-A PREROUTING -j PVPNC-IN
-A OUTPUT -j PVPNC-OUT
-A PVPNC-IN -i pvpnc2 -j PVPNC-S2I
-A PVPNC-OUT -j PVPNC-S2
-A PVPNC-S2 -d 10.77.1.0/24 -m owner --uid-owner 1001 -j NFQUEUE --queue-num 3002
-A PVPNC-S2 -d 10.77.1.0/24 -m owner ! --uid-owner 0-4294967294 -m connmark --mark 0x30000/0xff0000 -j NFQUEUE --queue-num 3002
-A PVPNC-S2I -j CONNMARK --set-xmark 0x30000/0xff0000
COMMIT
"""
LEGACY_V6 = (LEGACY_V4.replace("10.77.1.0/24", "fd77:0:0:1::/64"))


def test_rules_of_the_previous_version_are_recovered_and_converted_in_one_step() -> None:
    (found,), broken = firewall.parse_installed_sessions("pvpnc", [LEGACY_V4, LEGACY_V6])
    assert broken == []
    assert (found.slot, found.uid, found.queue, found.mark, found.tun) == (
        2, 1001, 3002, 0x30000, "pvpnc2")
    assert found.legacy and found.session_id == b"", "nothing says whether it was up"
    repair = firewall.client_jumps_repair("pvpnc", found, 0xFF0000)
    assert repair is not None
    for text in (repair.v4, repair.v6):
        # One transaction per family: the old jump goes as the new ones come.
        assert text.startswith("*mangle\n") and text.endswith("COMMIT\n")
        assert text.count("COMMIT") == 1
        assert "-D PVPNC-OUT -j PVPNC-S2" in text
        assert "-A PVPNC-OUT -m owner --uid-owner 1001 -j PVPNC-S2" in text
        assert ("-A PVPNC-OUT -m owner ! --uid-owner 0-4294967294 -m connmark --mark "
                "0x30000/0xff0000 -j PVPNC-S2") in text


def test_rules_of_this_version_need_no_conversion_and_carry_the_session_id() -> None:
    sid = bytes(range(16))
    base = firewall.client_base("pvpnc")
    rules = firewall.client_session("pvpnc", 4, 1002, NETS, 3004, 0x50000, 0xFF0000, "pvpnc4")
    attached = firewall.client_session_attached("pvpnc", 4, 0x50000, 0xFF0000, sid)
    # ATTACH rewrites the inbound chain in one transaction: the marking rule, then the record.
    assert rules_of(attached.v4, "PVPNC-S4I") == [
        "-A PVPNC-S4I -j CONNMARK --set-xmark 0x50000/0xff0000",
        f"-A PVPNC-S4I -m comment --comment pvpn-session={sid.hex()}"]
    assert "-F PVPNC-S4I" in attached.v4.splitlines()
    # iptables-save quotes the comment; what it prints is what parse reads back.
    saved = [as_saved(base.v4 + rules.v4) + rules_of(attached.v4, "PVPNC-S4I")[1].replace(
        "--comment ", '--comment "') + '"\n', as_saved(base.v6 + rules.v6)]
    (found,), _ = firewall.parse_installed_sessions("pvpnc", saved)
    assert found.session_id == sid and not found.legacy
    assert firewall.client_jumps_repair("pvpnc", found, 0xFF0000) is None
    # Without the record: a session that never came up.
    (bare,), _ = firewall.parse_installed_sessions(
        "pvpnc", [as_saved(base.v4 + rules.v4), as_saved(base.v6 + rules.v6)])
    assert bare.session_id == b"" and not bare.legacy


def test_a_sessions_rules_of_one_family_are_repaired_in_one_transaction() -> None:
    (found,), _ = firewall.parse_installed_sessions("pvpnc", [LEGACY_V4, LEGACY_V6])
    held = firewall.InstalledSession(found.slot, found.uid, found.networks, found.queue,
                                     found.mark, found.tun, b"\x01" * 16)
    for version, saved in ((4, LEGACY_V4), (6, LEGACY_V6)):
        text = firewall.client_session_repair("pvpnc", held, 0xFF0000, version, saved)
        lines = text.splitlines()
        assert lines[0] == "*mangle" and lines[-1] == "COMMIT" and text.count("COMMIT") == 1
        assert lines[1:3] == [":PVPNC-S2 - [0:0]", ":PVPNC-S2I - [0:0]"], "made or emptied"
        assert "-D PVPNC-OUT -j PVPNC-S2" in lines, "the old jump goes as the new ones come"
        assert "-D PVPNC-IN -i pvpnc2 -j PVPNC-S2I" in lines
        whole = firewall.client_session("pvpnc", 2, 1001, found.networks, 3002, 0x30000,
                                        0xFF0000, "pvpnc2", b"\x01" * 16)
        wanted = whole.v4 if version == 4 else whole.v6
        assert [l for l in lines if l.startswith("-A")] == [
            l for l in wanted.splitlines() if l.startswith("-A")]
    # Nothing of another session, or of a chain whose name only starts like its own, goes.
    other = LEGACY_V4.replace("COMMIT", "-A PVPNC-OUT -j PVPNC-S21\n-A PVPNC-IN -i x -j "
                              "PVPNC-S2X\nCOMMIT")
    text = firewall.client_session_repair("pvpnc", held, 0xFF0000, 4, other)
    assert "PVPNC-S21" not in text and "PVPNC-S2X" not in text
    assert firewall.client_session_repair("pvpnc", held, 0xFF0000, 4, "").count("-D") == 0


def test_a_lost_or_doubled_jump_is_put_right() -> None:
    rules = firewall.client_session("pvpnc", 1, 1001, NETS, 3001, 0x20000, 0xFF0000, "pvpnc1")
    v4 = "\n".join(line for line in rules.v4.splitlines()
                   if not line.startswith("-A PVPNC-OUT -m owner !"))
    jump = rules_of(rules.v6, "PVPNC-OUT")[0]
    v6 = rules.v6.replace(jump, f"{jump}\n{jump}")
    (found,), _ = firewall.parse_installed_sessions("pvpnc", [v4, v6])
    repair = firewall.client_jumps_repair("pvpnc", found, 0xFF0000)
    assert repair is not None
    assert repair.v6.count("-D PVPNC-OUT -m owner --uid-owner 1001 -j PVPNC-S1") == 2
    assert repair.v4.count("-A PVPNC-OUT") == 2


def test_what_someone_else_wrote_in_our_chains_cannot_break_recovery() -> None:
    rules = firewall.client_session("pvpnc", 0, 1001, NETS, 3000, 0x10000, 0xFF0000, "pvpnc0")
    junk = ('-A PVPNC-S0 -d not-an-address -m owner --uid-owner x -j NFQUEUE --queue-num y\n'
            '-A PVPNC-S0I -m comment --comment "unbalanced\n'
            '-A PVPNC-S0I -m comment --comment pvpn-session=zz\n')
    (found,), _ = firewall.parse_installed_sessions("pvpnc", [rules.v4 + junk, rules.v6])
    assert found.session_id == b"" and found.uid == 1001


def test_no_rule_text_carries_a_line_break() -> None:
    """Whatever a rule is built from, it stays one line of iptables-restore input: a value
    with a line break in it (an IPv6 zone could carry one) is refused, not installed."""
    import pytest

    from pvpn.errors import LocalProtocolError

    class Odd:
        version = 6

        def __str__(self) -> str:
            return "fe80::1%x\nCOMMIT\n*filter\n-I INPUT 1 -j ACCEPT\nCOMMIT\n*mangle\n-A X"

    with pytest.raises(LocalProtocolError, match="line break"):
        firewall.client_session("pvpnc", 0, 1001, [Odd()], 3000,  # type: ignore[list-item]
                                0x10000, 0xFF0000, "pvpnc0")


def saved_form(*rule_sets: str) -> str:
    """iptables-save's text of what these restore texts installed: one table, appends only."""
    lines = ["*mangle", ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    for text in rule_sets:
        for line in text.splitlines():
            if line in ("*mangle", "COMMIT", "") or line.startswith(":PREROUTING"):
                continue
            lines.append(line.replace("-I OUTPUT 1 ", "-A OUTPUT ")
                         .replace("-I PREROUTING 1 ", "-A PREROUTING "))
    return "\n".join([*lines, "COMMIT", ""])


def held(slot: int, uid: int, nets: list[Any], mark: int) -> firewall.InstalledSession:
    return firewall.InstalledSession(slot, uid, nets, 3000 + slot, mark, f"pvpnc{slot}")


def kernel_rules(*sessions: firewall.InstalledSession) -> list[str]:
    base = firewall.client_base("pvpnc")
    made = [firewall.client_session("pvpnc", s.slot, s.uid, s.networks, s.queue, s.mark,
                                    0xFF0000, s.tun) for s in sessions]
    return [saved_form(base.v4, *(m.v4 for m in made)),
            saved_form(base.v6, *(m.v6 for m in made))]


def test_rules_someone_else_removed_are_found_family_by_family() -> None:
    """A firewall reload or `iptables -t mangle -F` took a session's rules away while
    pvpn-client said "up", and its protected traffic left in clear. check_rules says what to
    put back: nothing while the rules are whole; the sessions a family lost; a family whose
    hook chains are gone or unhooked. A family a session protects nothing of needs nothing."""
    alice = held(0, 1001, NETS, 0x10000)
    bob = held(1, 1002, NETS[:1], 0x20000)  # IPv4 only
    intact = kernel_rules(alice, bob)
    assert not firewall.check_rules("pvpnc", intact, [alice, bob], 0xFF0000)
    # IPv6 flushed (ip6tables -t mangle -F, then -X): alice's IPv6 protection is gone, bob
    # had none there.
    flushed6 = [intact[0], saved_form()]
    found = firewall.check_rules("pvpnc", flushed6, [alice, bob], 0xFF0000)
    assert found.unbased == [6] and found.broken == {6: [0]} and not found.unhooked
    # Only the hook into OUTPUT removed, chains left: hooked again, sessions whole.
    unhooked = [intact[0].replace("-A OUTPUT -j PVPNC-OUT\n", ""), intact[1]]
    found = firewall.check_rules("pvpnc", unhooked, [alice, bob], 0xFF0000)
    assert found.unhooked == [4] and not found.broken and not found.unbased
    # One rule of bob's chain deleted: that session, that family.
    cut = [intact[0].replace("-A PVPNC-S1 -d 10.77.1.0/24 -m owner --uid-owner 1002 -j "
                             "NFQUEUE --queue-num 3001\n", ""), intact[1]]
    assert firewall.check_rules("pvpnc", cut, [alice, bob], 0xFF0000).broken == {4: [1]}
    # A jump into a session's chain of another shape (say, someone's -I of the old one).
    odd = [intact[0].replace("-A PVPNC-OUT -m owner --uid-owner 1001 -j PVPNC-S0",
                             "-A PVPNC-OUT -j PVPNC-S0"), intact[1]]
    assert firewall.check_rules("pvpnc", odd, [alice, bob], 0xFF0000).broken == {4: [0]}


def test_datagrams_too_large_for_the_queue_are_copied_out_of_the_sessions_tun_device() -> None:
    rules = firewall.client_session("pvpnc", 3, 1001, NETS, 3003, 0x40000, 0xFF0000, "pvpnc3")
    v4, v6 = rules.v4.splitlines(), rules.v6.splitlines()
    tee4 = ('-A PVPNC-S3 -d 10.77.1.0/24 -m owner --uid-owner 1001 -m u32 --u32 '
            '"0&0xFFFF=65532:65535" -j TEE --gateway 192.0.2.1 --oif pvpnc3')
    tee6 = ('-A PVPNC-S3 -d fd77:0:0:1::/64 -m owner --uid-owner 1001 -m u32 --u32 '
            '"4>>16=65492:65535" -j TEE --gateway fe80::1 --oif pvpnc3')
    # Before the queue's rule: the copy is made, then the cut original is queued and dropped.
    assert v4.index(tee4) + 1 == v4.index(
        "-A PVPNC-S3 -d 10.77.1.0/24 -m owner --uid-owner 1001 -j NFQUEUE --queue-num 3003")
    assert tee6 in v6
    # No user's socket sends out of any of the instance's TUN devices; only the kernel's
    # copies, which no socket owns, leave there.
    guard = "-A PVPNC-OUT -o pvpnc+ -m owner --uid-owner 0-4294967294 -j DROP"
    base = firewall.client_base("pvpnc")
    assert guard in base.v4.splitlines() and guard in base.v6.splitlines()
    # Read back after a restart, the copying rules are not taken for the queue's.
    sessions, broken = firewall.parse_installed_sessions(
        "pvpnc", [base.v4 + as_saved(rules.v4), base.v6 + as_saved(rules.v6)])
    assert [(s.slot, s.queue, len(s.networks)) for s in sessions] == [(3, 3003, 2)]
    assert broken == []


def test_the_server_reassembles_in_the_kernel_and_copies_the_largest_replies_out() -> None:
    rules = firewall.server_rules("pvpns", 4000, (61000, 64999))
    for text, tee in ((rules.v4, '-A PVPNS-IN -m u32 --u32 "0&0xFFFF=65532:65535" -j TEE '
                       '--gateway 192.0.2.1 --oif pvpns-big'),
                      (rules.v6, '-A PVPNS-IN -m u32 --u32 "4>>16=65492:65535" -j TEE '
                       '--gateway fe80::1 --oif pvpns-big')):
        lines = text.splitlines()
        appended = [line for line in lines if line.startswith("-A PVPNS-IN ")]
        assert appended[0] == tee  # before the queue's rules, which drop the cut original
        assert any(line.startswith("-A PVPNS-DEFRAG -m socket ") for line in lines)
        assert not any("-j PVPNS-DEFRAG" in line for line in lines)  # never entered
        assert "-A PVPNS-OUT -o pvpns-big -m owner --uid-owner 0-4294967294 -j DROP" in lines
        assert "conntrack" not in text  # reassembly, not connection tracking
    # The guard's chain is entered from OUTPUT (the jumps are kept apart, so a restart
    # replaces the chains without a moment when nothing leads into them).
    assert ["OUTPUT", "-j", "PVPNS-OUT"] in firewall.server_jumps("pvpns")
