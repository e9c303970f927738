"""Who may use the inference edge server: bearer tokens kept as hashes, their scopes, their rates.

The tokens file holds one line per client, `<client name> sha256:<hex digest> [clusters=0,2]`: the
SHA-256 of the token, never the token itself (a stolen file lets nobody in), compared in constant
time. `write_new_tokens` creates the file with mode 0600 and hands the secrets back once; a file
that its group or other users can read is refused. A token is 24 random bytes, so a plain SHA-256
is as strong as a slow password hash would be.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedaigc.errors import UserError

PREFIX = "sha256:"


@dataclass(frozen=True)
class Client:
    name: str
    digest: str  # hex SHA-256 of the token
    clusters: frozenset[int] | None = None  # the clusters this token may use; None = all of them


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A URL-safe secret that never starts with "-" (argparse would take it for an option)."""
    while (token := secrets.token_urlsafe(24)).startswith("-"):
        pass
    return token


def _scope(field: str, where: str) -> frozenset[int] | None:
    key, _, value = field.partition("=")
    if key != "clusters" or not value:
        raise UserError(f"{where}: expected 'clusters=<id>,<id>,..' or 'clusters=*', got {field!r}")
    if value == "*":
        return None
    try:
        ids = frozenset(int(x) for x in value.split(","))
    except ValueError:
        raise UserError(f"{where}: cluster ids must be integers, got {value!r}") from None
    if any(k < 0 for k in ids):
        raise UserError(f"{where}: cluster ids must be >= 0, got {value!r}")
    return ids


def read_tokens(path: Path) -> list[Client]:
    """The clients of a tokens file, refusing a file others can read, plaintext tokens and bad lines."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokens file not found: {path} (create one with: fedaigc serve --new-tokens N --tokens {path})")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise UserError(f"{path}: readable by group or others (mode {mode:04o}); run: chmod 600 {path}")
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"cannot read tokens file {path}: {e}") from None
    clients, names = [], set()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{path}:{n}"
        digest = parts[1].removeprefix(PREFIX) if len(parts) > 1 else ""
        if len(parts) not in (2, 3) or not parts[1].startswith(PREFIX) or len(digest) != 64:
            raise UserError(
                f"{where}: expected '<client name> sha256:<64 hex digits> [clusters=..]' (the file holds hashes of "
                "the tokens, not tokens: create one with fedaigc serve --new-tokens N)"
            )
        try:
            bytes.fromhex(digest)
        except ValueError:
            raise UserError(f"{where}: the digest is not hexadecimal") from None
        if parts[0] in names:
            raise UserError(f"{where}: client name {parts[0]!r} appears twice")
        names.add(parts[0])
        clients.append(Client(parts[0], digest.lower(), _scope(parts[2], where) if len(parts) == 3 else None))
    if not clients:
        raise UserError(f"{path}: no tokens")
    return clients


def write_new_tokens(path: Path, n: int, clusters: frozenset[int] | None = None) -> dict[str, str]:
    """Create `path` (mode 0600 from its creation on) with the hashes of `n` fresh tokens, scoped to
    `clusters` (None: all); returns {client name: token}, the only time the tokens are seen."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 100_000:
        raise UserError(f"--new-tokens must be between 1 and 100000, got {n}")
    if clusters is not None and (not clusters or min(clusters) < 0):
        raise UserError(f"--clusters: expected cluster ids >= 0, got {sorted(clusters)}")
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist")
    tokens = {f"client-{i}": new_token() for i in range(n)}
    scope = "" if clusters is None else " clusters=" + ",".join(map(str, sorted(clusters)))
    text = "".join(f"{name} {PREFIX}{token_digest(t)}{scope}\n" for name, t in tokens.items())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UserError(f"{path} exists; not overwriting its tokens") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return tokens


class TokenStore:
    """Finds the client of a presented token: hash it, compare with every stored digest in
    constant time (no early exit, so the time says nothing about which digest came close)."""

    def __init__(self, clients: list[Client]):
        self.clients = clients

    @classmethod
    def of(cls, tokens: dict[str, str]) -> TokenStore:
        """From {token: client name}, for services started inside a process (demo, tests)."""
        return cls([Client(name, token_digest(t)) for t, name in tokens.items()])

    def find(self, token: str) -> Client | None:
        presented = token_digest(token).encode()
        found = None
        for client in self.clients:
            if hmac.compare_digest(client.digest.encode(), presented):
                found = client
        return found


class RateLimiter:
    """A token bucket per client: `rate` requests a second on average, bursts of `burst`."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, time)
        self.lock = threading.Lock()

    def retry_after(self, name: str) -> int:
        """0 when the request may go now (and counts it), else the seconds until it may."""
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(name, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1:
                self.buckets[name] = (tokens - 1, now)
                return 0
            self.buckets[name] = (tokens, now)
            return max(1, math.ceil((1 - tokens) / self.rate))
