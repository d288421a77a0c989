"""The fleet's generated secrets (embedded Redis password, Flower login) and URL masking.

A secret lives in a file of its own in the state folder, mode 0600, created once (atomically:
written under a temporary name, then hard-linked into place, so two `fleet up` never end up
with different passwords) and reused on every start. Nothing here is ever printed or logged:
URLs are shown through ``mask_url``.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from fleet.errors import ConfigError

REDIS_PASSWORD_FILE = "redis.password"
FLOWER_PASSWORD_FILE = "flower.password"


def read_secret(path: Path) -> str | None:
    """The secret in ``path``; None when the file does not exist."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    if st.st_mode & 0o077:
        raise ConfigError(f"{path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}): "
                          f"run `chmod 600 {path}`, or delete it to get a new secret")
    if not text:
        raise ConfigError(f"{path} is empty: delete it to get a new secret")
    return text


def ensure_secret(path: Path) -> str:
    """The secret in ``path``, generated (``secrets.token_urlsafe``) and stored mode 0600 if absent."""
    found = read_secret(path)
    if found is not None:
        return found
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode only applies to a new file
        os.write(fd, (secrets.token_urlsafe(32) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process created it first: theirs wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    found = read_secret(path)
    assert found is not None
    return found


def with_password(url: str, password: str | None) -> str:
    """``url`` with ``password`` as its password (``redis://:pw@host...``); unchanged for None."""
    if not password:
        return url
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def mask_url(url: str) -> str:
    """``url`` fit to print: its password, if any, replaced by ``***`` (a user part without a
    colon too: some clients read ``redis://secret@host`` as a password)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    auth, _, host = parts.netloc.rpartition("@")
    user, colon, _ = auth.partition(":")
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}" if colon else f"***@{host}"))
