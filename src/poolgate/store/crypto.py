"""Upstream secrets encrypted at rest with a master key (Fernet: AES-128-CBC + HMAC-SHA256)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from poolgate.store.db import warn_if_accessible_by_others

MASTER_KEY_ENV = "POOLGATE_MASTER_KEY"
MASTER_KEY_FILE = "master.key"


class SecretBoxError(Exception):
    pass


class SecretBox:
    def __init__(self, key: bytes) -> None:
        try:
            self._fernet = Fernet(key)
        except ValueError:
            raise SecretBoxError(
                f"{MASTER_KEY_ENV} is not a valid key: generate one with "
                "`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`"
            ) from None

    def encrypt(self, secret: str) -> bytes:
        return self._fernet.encrypt(secret.encode())

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(token).decode()
        except InvalidToken:
            raise SecretBoxError(
                "a stored secret cannot be decrypted: the master key differs from the one it was stored with"
            ) from None


def open_box(data_dir: Path, stored: bytes | None) -> SecretBox:
    """The box for a store's secrets, checked against `stored`, one it already holds (None: it holds none).

    A store with secrets and no master key is refused rather than given a new key file (which could never
    read them: the gateway then blamed a "different" key, and a later start found the new file); a damaged
    key file is named as such (it was reported as an invalid POOLGATE_MASTER_KEY, unset, whose advice to
    generate a new key would have lost every stored secret)."""
    path = data_dir / MASTER_KEY_FILE
    from_env = bool(os.environ.get(MASTER_KEY_ENV))
    if stored is not None and not from_env and not path.exists():
        raise SecretBoxError(
            f"the store holds encrypted secrets but there is no master key: set {MASTER_KEY_ENV} or restore {path}"
        )
    key = load_master_key(data_dir)
    try:
        box = SecretBox(key)
    except SecretBoxError:
        if from_env:
            raise
        raise SecretBoxError(
            f"{path} is not a valid master key (damaged?): restore it from a backup"
            + (" (a new key cannot decrypt the secrets the store holds)" if stored is not None else "")
        ) from None
    if stored is not None:
        box.decrypt(stored)
    return box


def load_master_key(data_dir: Path) -> bytes:
    """The master key from the environment, else from `<data_dir>/master.key`, created 0600 on first use."""
    from_env = os.environ.get(MASTER_KEY_ENV)
    if from_env:
        return from_env.encode()
    path = data_dir / MASTER_KEY_FILE
    if path.exists():
        key = path.read_bytes().strip()
        # A key file made 0644 (copied, restored from a backup) was taken without a word.
        warn_if_accessible_by_others(path, "whoever can read it can decrypt the stored upstream secrets")
        return key
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Fernet.generate_key()
    # Written whole to a file of its own, then linked into place, which fails if the name exists: of two
    # processes starting at once, one key wins and the other process reads it complete (created in place
    # with O_EXCL, the file could be read while still empty).
    fd, written = tempfile.mkstemp(dir=data_dir, prefix=".master.key.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(key + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(written, path)
        except FileExistsError:
            return path.read_bytes().strip()
        except OSError:  # a file system without hard links (SMB, some FUSE mounts): create it in place
            return _create_in_place(path, key)
    finally:
        os.unlink(written)
    return key


def _create_in_place(path: Path, key: bytes) -> bytes:
    # O_EXCL: two processes starting at once must not each write a different key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as handle:
        handle.write(key + b"\n")
    return key
