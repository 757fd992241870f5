"""RSA user authentication, like SSH's authorized_keys.

The 2002 thesis lists per-user authentication as item 1 of its never-built future work; this
module builds it. A user holds an RSA private key; the server holds one ``<user>.pub`` file per
authorised user (OpenSSH public key lines). After the TLS handshake the server sends a random
challenge and the client signs :func:`signed_message`, which binds the challenge to

* the TLS session, through :meth:`pvpn.tls.TlsSession.binding` (an RFC 5705 / RFC 8446 §7.5
  exporter value that differs for every TLS session), so a signature made for one session can
  neither be replayed into a later one nor relayed by a man in the middle into another;
* the user name and the node name, so a signature for alice at gw1 is not one for bob or for
  the server.

Everything here works on key objects and bytes; only the explicit load/save functions touch
files. Nothing reads a file or the clock at import.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from pvpn.errors import AuthError, ConfigError
from pvpn.records import USER_NAME

__all__ = [
    "CHALLENGE_SIZE",
    "DEFAULT_KEY_BITS",
    "MESSAGE_PREFIX",
    "AuthorizedKeys",
    "fingerprint",
    "generate_user_key",
    "load_private_key",
    "load_public_keys",
    "save_private_key",
    "save_public_key",
    "sign_challenge",
    "signed_message",
    "verify_signature",
    "write_new_file",
]

CHALLENGE_SIZE = 32
#: The size of a new user key (pvpn keygen --bits): NIST SP 800-57's 128-bit security level.
DEFAULT_KEY_BITS = 3072
MESSAGE_PREFIX = b"pvpn-user-auth-v1\0"

_MIN_BITS = 2048
# A 16384-bit RSA signature is 2048 bytes; anything longer is garbage, refused before any
# big-number arithmetic.
_MAX_SIGNATURE = 2048
# Bound on a single field of the signed message (user and node names are short; challenge and
# binding are 32 bytes).
_MAX_FIELD = 255
# Bound on the AuthorizedKeys cache (one entry per user file seen).
_MAX_CACHED_USERS = 4096
_MAX_KEY_FILE = 1 << 20

# RSA-PSS with SHA-256, MGF1-SHA-256 and a salt as long as the digest (RFC 8017 §9.1;
# the parameters TLS 1.3 uses for rsa_pss_rsae_sha256, RFC 8446 §4.2.3).
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


# --- files -----------------------------------------------------------------------------------


def write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create *path* with exactly *mode* and write *data*; never overwrite an existing file.

    The file is created by ``os.open(O_CREAT | O_EXCL, mode)`` so a private key is never,
    even for an instant, readable with wider permissions. ``O_NOFOLLOW`` stops a planted
    symlink from redirecting the write.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise ConfigError(
            f"refusing to overwrite the existing file {path}: move it away first"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from exc
    try:
        # The umask may have removed bits from *mode* (e.g. 0644 under umask 077); set it
        # exactly. This never widens a 0600 file beyond 0600.
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc
    os.close(fd)


def _make_private_dirs(directory: Path) -> None:
    """Create *directory* and any missing parents with mode 0700 (existing ones are left)."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for new_dir in reversed(missing):
        try:
            new_dir.mkdir(mode=0o700)
        except FileExistsError:
            pass  # created concurrently; its mode is its creator's business
        except OSError as exc:
            raise ConfigError(f"cannot create directory {new_dir}: {exc.strerror}") from exc


# --- keys ------------------------------------------------------------------------------------


def generate_user_key(bits: int = DEFAULT_KEY_BITS) -> rsa.RSAPrivateKey:
    """A new RSA user key (public exponent 65537)."""
    if bits < _MIN_BITS:
        raise ConfigError(f"an RSA key of {bits} bits is too weak: use at least {_MIN_BITS}")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def save_private_key(key: rsa.RSAPrivateKey, path: Path) -> None:
    """Write *key* as unencrypted PEM PKCS#8 to a new file of mode 0600.

    Missing parent directories are created with mode 0700. An existing file is never
    overwritten (ConfigError), so a key cannot be lost by running keygen twice.
    """
    data = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    _make_private_dirs(path.parent)
    write_new_file(path, data, 0o600)


def _openssh_line(key: rsa.RSAPublicKey, comment: str) -> bytes:
    if "\n" in comment or "\r" in comment:
        raise ConfigError(f"a public key comment must be one line, got {comment!r}")
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        line += b" " + comment.encode("utf-8")
    return line + b"\n"


def save_public_key(key: rsa.RSAPrivateKey | rsa.RSAPublicKey, path: Path, comment: str) -> None:
    """Write one OpenSSH line ``ssh-rsa AAAA... comment`` to a new file of mode 0644."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    line = _openssh_line(public, comment)
    _make_private_dirs(path.parent)
    write_new_file(path, line, 0o644)


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    """Read the user's RSA private key (PEM PKCS#8/PKCS#1, or an OpenSSH private key).

    Like ssh, a key file readable by group or others is refused: the key is the user's
    identity, and a key others could read must be assumed stolen.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise ConfigError(
            f"no private key at {path}: run `pvpn keygen` to create one"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the private key {path}: {exc.strerror}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"the private key {path} is not a regular file")
        if mode & 0o077:
            raise ConfigError(
                f"the private key {path} is readable by others "
                f"(mode {stat.S_IMODE(mode):04o}): run `chmod 600 {path}`"
            )
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(_MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_FILE:
        raise ConfigError(f"{path} is too large to be a private key")
    key: object
    try:
        if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography raises TypeError when the key is encrypted and no password is given.
        raise ConfigError(
            f"the private key {path} is encrypted; pvpn needs an unencrypted key "
            f"(run `pvpn keygen` for a new one)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"{path} is not a readable PEM or OpenSSH private key ({exc}): "
            f"run `pvpn keygen` to create one"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(
            f"the private key {path} is not an RSA key (found {type(key).__name__}): "
            f"run `pvpn keygen` to create an RSA key"
        )
    return key


_PEM_BLOCK = re.compile(
    rb"-----BEGIN (?:RSA )?PUBLIC KEY-----.+?-----END (?:RSA )?PUBLIC KEY-----", re.DOTALL
)


def _usable(key: rsa.RSAPublicKey, where: str, keys: list[rsa.RSAPublicKey],
            skipped: list[str] | None) -> None:
    """Keep ``key`` unless it is too weak: an RSA key under 2048 bits (the floor of NIST
    SP 800-131A; OpenSSH's RequiredRSASize makes it a setting) is skipped, saying so, and the
    file's other keys keep working."""
    if key.key_size < _MIN_BITS:
        if skipped is not None:
            skipped.append(f"{where}: RSA key of {key.key_size} bits skipped (under {_MIN_BITS}; "
                           f"{fingerprint(key)}); give the user a new key (pvpn keygen)")
        return
    keys.append(key)


def _parse_public_keys(data: bytes, source: str,
                       skipped: list[str] | None = None) -> list[rsa.RSAPublicKey]:
    keys: list[rsa.RSAPublicKey] = []
    if b"-----BEGIN" in data:
        blocks = _PEM_BLOCK.findall(data)
        if not blocks:
            raise ConfigError(f"{source}: no PEM public key block found")
        for number, block in enumerate(blocks, start=1):
            try:
                key = serialization.load_pem_public_key(block)
            except (ValueError, UnsupportedAlgorithm) as exc:
                raise ConfigError(f"{source}: PEM block {number} is not a public key ({exc})") from None
            if not isinstance(key, rsa.RSAPublicKey):
                raise ConfigError(f"{source}: PEM block {number} is not an RSA key")
            _usable(key, f"{source} PEM block {number}", keys, skipped)
        return keys
    for number, raw in enumerate(data.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        fields = line.split(None, 2)
        if fields[0] != b"ssh-rsa":
            kind = fields[0].decode("ascii", "replace")
            raise ConfigError(
                f"{source} line {number}: expected an `ssh-rsa AAAA... comment` line, "
                f"found {kind!r} (only RSA keys are supported; no authorized_keys options)"
            )
        if len(fields) < 2:
            raise ConfigError(f"{source} line {number}: the key data after ssh-rsa is missing")
        try:
            key = serialization.load_ssh_public_key(b"ssh-rsa " + fields[1])
        except (ValueError, UnsupportedAlgorithm, binascii.Error) as exc:
            raise ConfigError(f"{source} line {number}: not a valid ssh-rsa key ({exc})") from None
        if not isinstance(key, rsa.RSAPublicKey):
            raise ConfigError(f"{source} line {number}: not an RSA key")
        _usable(key, f"{source} line {number}", keys, skipped)
    return keys


def load_public_keys(path: Path, skipped: list[str] | None = None) -> list[rsa.RSAPublicKey]:
    """Read RSA public keys: OpenSSH lines (blank and ``#`` lines ignored) or PEM blocks.
    Keys under 2048 bits are left out (and said so in ``skipped``)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise ConfigError(f"no public key file at {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > _MAX_KEY_FILE:
        raise ConfigError(f"{path} is too large to be a public key file")
    return _parse_public_keys(data, str(path), skipped)


def fingerprint(key: rsa.RSAPublicKey | rsa.RSAPrivateKey) -> str:
    """``SHA256:<base64, no padding>`` of the SSH key blob, as ``ssh-keygen -l`` prints it."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


# --- challenge and signature ---------------------------------------------------------------


def _field(value: bytes, what: str) -> bytes:
    if len(value) > _MAX_FIELD:
        raise AuthError(f"{what} is too long ({len(value)} bytes)")
    return struct.pack("!I", len(value)) + value


def signed_message(challenge: bytes, binding: bytes, user: str, node: str) -> bytes:
    """The exact bytes a user signs.

    ``MESSAGE_PREFIX`` separates this domain from every other use of the key (a signature
    here is never a valid signature of anything else pvpn or ssh signs); each field is
    length-prefixed (4 bytes, big endian) so no two different field tuples give the same
    message.
    """
    if len(challenge) != CHALLENGE_SIZE:
        raise AuthError(f"the challenge must be {CHALLENGE_SIZE} bytes, got {len(challenge)}")
    return b"".join(
        (
            MESSAGE_PREFIX,
            _field(challenge, "challenge"),
            _field(binding, "binding"),
            _field(user.encode("utf-8"), "user name"),
            _field(node.encode("utf-8"), "node name"),
        )
    )


def sign_challenge(
    key: rsa.RSAPrivateKey, challenge: bytes, binding: bytes, user: str, node: str
) -> bytes:
    """RSA-PSS (SHA-256, MGF1-SHA-256, salt = digest length) over :func:`signed_message`."""
    return key.sign(signed_message(challenge, binding, user, node), _PSS, hashes.SHA256())


def verify_signature(
    public_keys: Sequence[rsa.RSAPublicKey],
    signature: bytes,
    challenge: bytes,
    binding: bytes,
    user: str,
    node: str,
) -> rsa.RSAPublicKey:
    """Return the first of *public_keys* that verifies *signature*; AuthError if none does."""
    if not public_keys:
        raise AuthError(f"user {user!r} has no authorised keys")
    if len(signature) > _MAX_SIGNATURE:
        raise AuthError(f"the signature is too long ({len(signature)} bytes)")
    message = signed_message(challenge, binding, user, node)
    for key in public_keys:
        try:
            key.verify(signature, message, _PSS, hashes.SHA256())
        except InvalidSignature:
            continue
        return key
    raise AuthError(f"the signature does not verify with any authorised key of user {user!r}")


# --- the server's key directory -------------------------------------------------------------


class AuthorizedKeys:
    """A directory with one ``<user>.pub`` file per authorised user.

    Driven by the server's authentication step, which calls :meth:`keys_for` with the user
    name the client claims. Names must match :data:`pvpn.records.USER_NAME` (no "/", no "..",
    no upper case), so a name off the wire can't escape the directory. Files are re-read when
    their mtime, size or inode change, so an administrator's edits (or an atomic replace) take
    effect on the next login without a restart, while a stable file costs one ``stat`` per
    login.
    """

    def __init__(self, directory: Path,
                 warn: Callable[[str, str], None] | None = None) -> None:
        """``warn(user, message)`` hears of every key skipped as too weak, once per change of
        the user's file (the node logs it)."""
        self.directory = directory
        self._warn = warn
        self._cache: dict[str, tuple[tuple[int, int, int], list[rsa.RSAPublicKey]]] = {}

    def path_for(self, user: str) -> Path:
        """The key file of *user* (AuthError if the name is not allowed)."""
        if not USER_NAME.fullmatch(user):
            raise AuthError(f"invalid user name {user!r}")
        return self.directory / f"{user}.pub"

    def keys_for(self, user: str) -> list[rsa.RSAPublicKey]:
        """The public keys of *user*; AuthError if the user is unknown or the file is bad."""
        path = self.path_for(user)
        try:
            info = path.stat()
        except FileNotFoundError:
            self._cache.pop(user, None)
            raise AuthError(f"unknown user {user!r} (no {path})") from None
        except OSError as exc:
            raise AuthError(f"cannot read the keys of user {user!r}: {exc.strerror}") from exc
        version = (info.st_mtime_ns, info.st_size, info.st_ino)
        cached = self._cache.get(user)
        if cached is not None and cached[0] == version:
            return cached[1]
        skipped: list[str] = []
        try:
            keys = load_public_keys(path, skipped)
        except ConfigError as exc:
            # An operator's typo in one user's file must refuse that user, not stop the server.
            self._cache.pop(user, None)
            raise AuthError(f"cannot load the keys of user {user!r}: {exc}") from exc
        if self._warn is not None:
            for message in skipped:
                self._warn(user, message)
        if len(self._cache) >= _MAX_CACHED_USERS:
            self._cache.clear()
        self._cache[user] = (version, keys)
        return keys
