"""RSA user authentication: keys on disk, signed challenges, the authorized-keys directory."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pvpn import auth, pki
from pvpn.errors import AuthError, ConfigError
from pvpn.tls import TlsSession, make_client_context, make_server_context

from net import transfer

BINDING = bytes(range(32))


@pytest.fixture(scope="module")
def alice_key() -> rsa.RSAPrivateKey:
    return auth.generate_user_key(2048)


@pytest.fixture(scope="module")
def bob_key() -> rsa.RSAPrivateKey:
    return auth.generate_user_key(2048)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def same(a: rsa.RSAPublicKey, b: rsa.RSAPublicKey) -> bool:
    return a.public_numbers() == b.public_numbers()


# --- keys -------------------------------------------------------------------------------------


def test_generate_user_key_default_and_floor() -> None:
    assert auth.generate_user_key.__defaults__ == (3072,)
    with pytest.raises(ConfigError, match="too weak"):
        auth.generate_user_key(1024)


def test_private_key_round_trip_modes(alice_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "home" / ".pvpn" / "id_rsa"
    auth.save_private_key(alice_key, path)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700 and mode(path.parent.parent) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    loaded = auth.load_private_key(path)
    assert loaded.private_numbers() == alice_key.private_numbers()


def test_private_key_is_created_0600_even_under_a_lax_umask(
    alice_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    old = os.umask(0)
    try:
        auth.save_private_key(alice_key, tmp_path / "k")
    finally:
        os.umask(old)
    assert mode(tmp_path / "k") == 0o600


def test_save_private_key_refuses_to_overwrite(
    alice_key: rsa.RSAPrivateKey, bob_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    path = tmp_path / "id_rsa"
    auth.save_private_key(alice_key, path)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        auth.save_private_key(bob_key, path)
    assert auth.load_private_key(path).private_numbers() == alice_key.private_numbers()


def test_load_private_key_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run `pvpn keygen`"):
        auth.load_private_key(tmp_path / "nope")


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660])
def test_load_private_key_refuses_readable_by_others(
    alice_key: rsa.RSAPrivateKey, tmp_path: Path, bad_mode: int
) -> None:
    path = tmp_path / "id_rsa"
    auth.save_private_key(alice_key, path)
    path.chmod(bad_mode)
    with pytest.raises(ConfigError) as info:
        auth.load_private_key(path)
    assert f"chmod 600 {path}" in str(info.value)
    assert f"{bad_mode:04o}" in str(info.value)
    path.chmod(0o400)  # read-only for the owner is fine
    auth.load_private_key(path)


def test_load_private_key_not_rsa_or_garbage_or_encrypted(tmp_path: Path) -> None:
    ec_path = tmp_path / "ec"
    ec_key = ec.generate_private_key(ec.SECP256R1())
    auth.write_new_file(
        ec_path,
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    with pytest.raises(ConfigError, match="not an RSA key"):
        auth.load_private_key(ec_path)

    junk = tmp_path / "junk"
    auth.write_new_file(junk, b"-----BEGIN PRIVATE KEY-----\nnope\n", 0o600)
    with pytest.raises(ConfigError, match="not a readable"):
        auth.load_private_key(junk)

    encrypted = tmp_path / "encrypted"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    auth.write_new_file(
        encrypted,
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
        0o600,
    )
    with pytest.raises(ConfigError, match="encrypted"):
        auth.load_private_key(encrypted)


def test_load_private_key_accepts_openssh_format(alice_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "id_rsa"
    auth.write_new_file(
        path,
        alice_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    assert auth.load_private_key(path).private_numbers() == alice_key.private_numbers()


def test_public_key_openssh_line_round_trip(alice_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "users" / "alice.pub"
    auth.save_public_key(alice_key, path, "alice@laptop")
    assert mode(path) == 0o644
    line = path.read_text()
    assert re.fullmatch(r"ssh-rsa AAAA[A-Za-z0-9+/=]+ alice@laptop\n", line)
    (loaded,) = auth.load_public_keys(path)
    assert same(loaded, alice_key.public_key())
    with pytest.raises(ConfigError, match="one line"):
        auth.save_public_key(alice_key, tmp_path / "x.pub", "two\nlines")


def test_load_public_keys_comments_blanks_and_several(
    alice_key: rsa.RSAPrivateKey, bob_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    def line(key: rsa.RSAPrivateKey) -> str:
        return key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ).decode()

    path = tmp_path / "keys.pub"
    path.write_text(
        f"# alice's laptop and phone\n\n{line(alice_key)} laptop\n   \n"
        f"  {line(bob_key)}   phone with spaces  \n{line(alice_key)}\n"
    )
    keys = auth.load_public_keys(path)
    assert len(keys) == 3
    assert same(keys[0], alice_key.public_key()) and same(keys[1], bob_key.public_key())


def test_load_public_keys_pem(alice_key: rsa.RSAPrivateKey, bob_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "keys.pem"
    path.write_bytes(
        b"".join(
            k.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            for k in (alice_key, bob_key)
        )
    )
    keys = auth.load_public_keys(path)
    assert [k.public_numbers() for k in keys] == [
        alice_key.public_key().public_numbers(),
        bob_key.public_key().public_numbers(),
    ]


@pytest.mark.parametrize(
    ("third_line", "words"),
    [
        ("ssh-rsa !!!notbase64!!! x", "line 3"),
        ("ssh-rsa", "line 3"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPvGZm3jx3pr6T5HJr1c5ksJ7OGsJkk8gdzUaR5Ix9Ie x", "only RSA"),
        ('from="10.0.0.1" ssh-rsa AAAA x', "line 3"),
        ("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIPvGZm3jx3pr6T5HJr1c5ksJ7OGsJkk8gdzUaR5Ix9Ie x", "line 3"),
    ],
)
def test_load_public_keys_bad_line(
    alice_key: rsa.RSAPrivateKey, tmp_path: Path, third_line: str, words: str
) -> None:
    path = tmp_path / "alice.pub"
    good = alice_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    path.write_text(f"# comment\n{good}\n{third_line}\n")
    with pytest.raises(ConfigError) as info:
        auth.load_public_keys(path)
    assert str(path) in str(info.value)
    assert words in str(info.value)


def test_load_public_keys_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no public key file"):
        auth.load_public_keys(tmp_path / "nope.pub")


def test_fingerprint_format(alice_key: rsa.RSAPrivateKey, bob_key: rsa.RSAPrivateKey) -> None:
    fp = auth.fingerprint(alice_key.public_key())
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", fp)
    assert auth.fingerprint(alice_key) == fp
    assert auth.fingerprint(bob_key) != fp


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_fingerprint_matches_ssh_keygen(alice_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "alice.pub"
    auth.save_public_key(alice_key, path, "alice")
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(path)],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    assert auth.fingerprint(alice_key) in out


# --- challenges and signatures ----------------------------------------------------------------


def test_signed_message_is_domain_separated_and_unambiguous() -> None:
    challenge = b"c" * 32
    message = auth.signed_message(challenge, BINDING, "alice", "gw1")
    assert message.startswith(b"pvpn-user-auth-v1\0")
    assert auth.signed_message(challenge, BINDING, "alic", "egw1") != message
    assert auth.signed_message(challenge, BINDING, "alice", "gw1") == message
    with pytest.raises(AuthError):
        auth.signed_message(b"short", BINDING, "alice", "gw1")
    with pytest.raises(AuthError):
        auth.signed_message(challenge, BINDING, "a" * 300, "gw1")


def test_sign_verify_round_trip(alice_key: rsa.RSAPrivateKey, bob_key: rsa.RSAPrivateKey) -> None:
    challenge = os.urandom(auth.CHALLENGE_SIZE)
    signature = auth.sign_challenge(alice_key, challenge, BINDING, "alice", "server")
    assert len(signature) == 256
    keys = [bob_key.public_key(), alice_key.public_key()]
    matched = auth.verify_signature(keys, signature, challenge, BINDING, "alice", "server")
    assert same(matched, alice_key.public_key())
    # PSS is randomised: two signatures differ, both verify.
    again = auth.sign_challenge(alice_key, challenge, BINDING, "alice", "server")
    assert again != signature
    auth.verify_signature(keys, again, challenge, BINDING, "alice", "server")


@pytest.mark.parametrize("what", ["key", "binding", "challenge", "user", "node", "signature"])
def test_verify_refuses_anything_different(
    alice_key: rsa.RSAPrivateKey, bob_key: rsa.RSAPrivateKey, what: str
) -> None:
    challenge = os.urandom(auth.CHALLENGE_SIZE)
    signature = auth.sign_challenge(alice_key, challenge, BINDING, "alice", "server")
    args: dict[str, object] = dict(
        public_keys=[alice_key.public_key()], signature=signature, challenge=challenge,
        binding=BINDING, user="alice", node="server",
    )
    changes: dict[str, tuple[str, object]] = {
        "key": ("public_keys", [bob_key.public_key()]),
        "binding": ("binding", bytes(32)),
        "challenge": ("challenge", os.urandom(auth.CHALLENGE_SIZE)),
        "user": ("user", "bob"),
        "node": ("node", "gw1"),
        "signature": ("signature", signature[:-1] + bytes([signature[-1] ^ 1])),
    }
    name, value = changes[what]
    args[name] = value
    with pytest.raises(AuthError):
        auth.verify_signature(**args)  # type: ignore[arg-type]


def test_verify_bounds(alice_key: rsa.RSAPrivateKey) -> None:
    challenge = os.urandom(auth.CHALLENGE_SIZE)
    with pytest.raises(AuthError, match="no authorised keys"):
        auth.verify_signature([], b"x" * 256, challenge, BINDING, "alice", "server")
    with pytest.raises(AuthError, match="too long"):
        auth.verify_signature([alice_key.public_key()], b"x" * 5000, challenge, BINDING, "alice", "server")
    with pytest.raises(AuthError):
        auth.verify_signature([alice_key.public_key()], b"", challenge, BINDING, "alice", "server")


def test_signature_is_bound_to_its_tls_session(alice_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    # A signature made in one TLS session doesn't verify with another session's binding.
    pki.create_ca(tmp_path / "ca")
    cert, key = pki.issue_certificate(tmp_path / "ca", "server", tmp_path)
    bindings = []
    for _ in range(2):
        server = TlsSession(make_server_context(str(cert), str(key)), server_side=True)
        client = TlsSession(
            make_client_context(ca_file=str(tmp_path / "ca" / "ca.crt")),
            server_side=False, server_name="server",
        )
        client.start()
        transfer(client, server)
        assert client.binding() == server.binding()
        bindings.append(server.binding())
    challenge = os.urandom(auth.CHALLENGE_SIZE)
    signature = auth.sign_challenge(alice_key, challenge, bindings[0], "alice", "server")
    auth.verify_signature([alice_key.public_key()], signature, challenge, bindings[0], "alice", "server")
    with pytest.raises(AuthError):
        auth.verify_signature([alice_key.public_key()], signature, challenge, bindings[1], "alice", "server")


# --- AuthorizedKeys ---------------------------------------------------------------------------


@pytest.fixture
def users(alice_key: rsa.RSAPrivateKey, tmp_path: Path) -> Path:
    directory = tmp_path / "users"
    auth.save_public_key(alice_key, directory / "alice.pub", "alice@laptop")
    return directory


def test_authorized_keys_for_known_user(users: Path, alice_key: rsa.RSAPrivateKey) -> None:
    keys = auth.AuthorizedKeys(users)
    (key,) = keys.keys_for("alice")
    assert same(key, alice_key.public_key())
    assert keys.keys_for("alice") is keys.keys_for("alice")  # cached while unchanged


def test_authorized_keys_unknown_user(users: Path) -> None:
    with pytest.raises(AuthError, match="unknown user 'bob'"):
        auth.AuthorizedKeys(users).keys_for("bob")
    with pytest.raises(AuthError, match="unknown user"):
        auth.AuthorizedKeys(users / "missing-dir").keys_for("alice")


@pytest.mark.parametrize(
    "name", ["../x", "Alice", "", "a/b", "..", ".alice", "-alice", "x" * 33, "alice\n", "al ice", "ali\0ce"]
)
def test_authorized_keys_bad_names(users: Path, name: str) -> None:
    (users / "Alice.pub").write_text((users / "alice.pub").read_text())
    with pytest.raises(AuthError, match="invalid user name"):
        auth.AuthorizedKeys(users).keys_for(name)


def test_authorized_keys_good_names(users: Path) -> None:
    for name in ["_svc", "bob.smith", "carol-1", "d" * 32]:
        shutil.copy(users / "alice.pub", users / f"{name}.pub")
        assert len(auth.AuthorizedKeys(users).keys_for(name)) == 1


def test_authorized_keys_sees_edits_and_removals(
    users: Path, alice_key: rsa.RSAPrivateKey, bob_key: rsa.RSAPrivateKey
) -> None:
    keys = auth.AuthorizedKeys(users)
    assert len(keys.keys_for("alice")) == 1
    path = users / "alice.pub"
    bob_line = bob_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    stamp = path.stat().st_mtime_ns
    with path.open("ab") as handle:
        handle.write(bob_line + b" phone\n")
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    found = keys.keys_for("alice")
    assert [k.public_numbers() for k in found] == [
        alice_key.public_key().public_numbers(),
        bob_key.public_key().public_numbers(),
    ]
    # A broken edit refuses this user with AuthError (the server keeps serving others).
    path.write_text("ssh-rsa garbage\n")
    with pytest.raises(AuthError, match="cannot load the keys of user 'alice'"):
        keys.keys_for("alice")
    path.unlink()
    with pytest.raises(AuthError, match="unknown user"):
        keys.keys_for("alice")


def test_keys_under_2048_bits_are_skipped_with_a_warning(
    users: Path, alice_key: rsa.RSAPrivateKey
) -> None:
    """Issue 9 point 9: authorised RSA keys under 2048 bits were accepted. They are skipped at
    load, with a warning the node logs; the user's other keys keep working."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = users / "alice.pub"
    weak_line = weak.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path.write_bytes(weak_line + b" old\n" + path.read_bytes())
    (key,) = auth.load_public_keys(path)
    assert same(key, alice_key.public_key())
    heard: list[tuple[str, str]] = []
    keys = auth.AuthorizedKeys(users, warn=lambda user, message: heard.append((user, message)))
    (key,) = keys.keys_for("alice")
    assert same(key, alice_key.public_key())
    ((user, message),) = heard
    assert user == "alice" and "1024 bits" in message and "line 1" in message
    keys.keys_for("alice")
    assert len(heard) == 1, "said once per change of the file"
    # Only weak keys: the user has none (refused like an unknown key, the server serves on).
    path.write_bytes(weak_line + b"\n")
    with pytest.raises(AuthError, match="no authorised keys"):
        auth.verify_signature(auth.AuthorizedKeys(users).keys_for("alice"), b"", bytes(32),
                              b"b" * 32, "alice", "server")
