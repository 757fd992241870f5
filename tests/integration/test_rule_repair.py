"""pvpn-client's repair of a session's rules, in a real kernel (issue 11): whatever is left of a
session in one family (the format before 34c7490, an emptied chain, a lost jump, nothing), one
iptables-restore makes it whole, and a transaction the kernel refuses changes nothing. A repair
made of removal, then installation, left half a session to a pvpn-client killed between the
two: the next one recovered it with the prefixes it found, and the others were not protected."""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from pvpn import firewall

pytestmark = pytest.mark.integration

INSTANCE, MASK, SID = "pvpnc", 0xFF0000, bytes(range(16))
NETS = [ipaddress.ip_network("10.77.1.0/24"), ipaddress.ip_network("fd77:0:0:1::/64")]
HELD = firewall.InstalledSession(2, 1001, NETS, 3002, 0x30000, "pvpnc2", SID)
TOOLS = {4: ("iptables-restore", "iptables-save"), 6: ("ip6tables-restore", "ip6tables-save")}


@pytest.fixture
def namespace(lab_usable: None) -> Iterator[str]:
    name = f"pvrr{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=10)


def restore(namespace: str, version: int, text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", namespace, TOOLS[version][0], "--noflush"],
                          input=text, text=True, capture_output=True, timeout=30)


def saved(namespace: str, version: int) -> str:
    return subprocess.run(["ip", "netns", "exec", namespace, TOOLS[version][1], "-t", "mangle"],
                          check=True, capture_output=True, text=True, timeout=30).stdout


def family(ruleset: firewall.RuleSet, version: int) -> str:
    return ruleset.v4 if version == 4 else ruleset.v6


def whole_now(namespace: str) -> list[str]:
    """What firewall.check_rules finds missing of HELD in the kernel (nothing: [])."""
    found = firewall.check_rules(INSTANCE, [saved(namespace, 4), saved(namespace, 6)], [HELD],
                                 MASK)
    return [f"IPv{v} slot {s}" for v, slots in found.broken.items() for s in slots] + [
        f"IPv{v} base" for v in found.unbased + found.unhooked]


def legacy(version: int) -> str:
    """The session as pvpn-client at 34c7490 left it: an unconditional jump, no id."""
    text = family(firewall.client_session(INSTANCE, 2, 1001, NETS, 3002, 0x30000, MASK,
                                          "pvpnc2"), version)
    jumps = firewall.session_jumps(INSTANCE, 2, 1001, 0x30000, MASK)
    for jump in jumps:
        text = text.replace(f"-A {jump}\n", "")
    return text.replace("COMMIT", "-A PVPNC-OUT -j PVPNC-S2\nCOMMIT")


def emptied(version: int) -> str:
    """The session's outbound chain emptied and its jumps gone (a removal cut short)."""
    return "*mangle\n:PVPNC-S2 - [0:0]\nCOMMIT\n"


def jump_lost(version: int) -> str:
    """Whole but for its jump from PVPNC-IN, and one of its jumps doubled."""
    whole = family(firewall.client_session(INSTANCE, 2, 1001, NETS, 3002, 0x30000, MASK,
                                           "pvpnc2", SID), version)
    jump = firewall.session_jumps(INSTANCE, 2, 1001, 0x30000, MASK)[0]
    return whole.replace("-A PVPNC-IN -i pvpnc2 -j PVPNC-S2I\n", "").replace(
        "COMMIT", f"-A {jump}\nCOMMIT")


def nothing(version: int) -> str:
    return ""


@pytest.mark.parametrize("left", [legacy, emptied, jump_lost, nothing])
def test_what_is_left_of_a_session_is_made_whole_in_one_transaction(
        namespace: str, left: object) -> None:
    base = firewall.client_base(INSTANCE)
    for version in (4, 6):
        assert restore(namespace, version, family(base, version)).returncode == 0
        text = left(version)  # type: ignore[operator]
        if text:
            done = restore(namespace, version, text)
            assert done.returncode == 0, done.stderr
    assert whole_now(namespace) == ["IPv4 slot 2", "IPv6 slot 2"]
    for version in (4, 6):
        repair = firewall.client_session_repair(INSTANCE, HELD, MASK, version,
                                                saved(namespace, version))
        assert repair.count("COMMIT") == 1
        done = restore(namespace, version, repair)
        assert done.returncode == 0, done.stderr
    assert whole_now(namespace) == []
    (found,), broken = firewall.parse_installed_sessions(
        INSTANCE, [saved(namespace, 4), saved(namespace, 6)])
    assert broken == [] and found.session_id == SID and not found.legacy
    assert sorted(found.networks, key=str) == sorted(NETS, key=str)


def test_a_repair_the_kernel_refuses_changes_nothing(namespace: str) -> None:
    base = firewall.client_base(INSTANCE)
    assert restore(namespace, 4, base.v4).returncode == 0
    assert restore(namespace, 4, legacy(4)).returncode == 0
    before = saved(namespace, 4)
    repair = firewall.client_session_repair(INSTANCE, HELD, MASK, 4, before)
    # Someone else deletes the old jump after pvpn-client read the rules: the transaction
    # names a rule that is gone, and iptables-restore applies none of it.
    gone = subprocess.run(["ip", "netns", "exec", namespace, "iptables", "-t", "mangle", "-D",
                           "PVPNC-OUT", "-j", "PVPNC-S2"], capture_output=True, timeout=30)
    assert gone.returncode == 0
    during = saved(namespace, 4)
    refused = restore(namespace, 4, repair)
    assert refused.returncode != 0
    strip = lambda text: [l for l in text.splitlines() if not l.startswith("#")]  # noqa: E731
    assert strip(saved(namespace, 4)) == strip(during), "not a rule of it applied"
    # The next check reads the rules anew, and its repair goes through.
    again = firewall.client_session_repair(INSTANCE, HELD, MASK, 4, during)
    assert restore(namespace, 4, again).returncode == 0
    assert "IPv4 slot 2" not in whole_now(namespace)
