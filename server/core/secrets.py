"""Development secrets: generated once under DATA_DIR when not configured, never hard-coded."""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


def load_or_create_secret(data_dir: Path, name: str, configured: str | None) -> bytes:
    """Return the configured secret, or one generated once and kept in DATA_DIR with mode 0600."""
    if configured:
        return _decode(configured)
    path = data_dir / "secrets" / name
    if path.exists():
        return _decode(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    # O_EXCL: two processes starting together must not overwrite each other's secret.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _decode(path.read_text().strip())
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    log.warning("generated_dev_secret", secret=name.upper(), path=str(path),
                hint=f"set {name.upper()} in production; this one is for development only")
    return _decode(value)


def _decode(value: str) -> bytes:
    """Accept a base64url (32 bytes) secret or any other string used as raw bytes."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        if len(raw) == 32:
            return raw
    except ValueError:
        pass
    return value.encode()
