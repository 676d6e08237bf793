"""Who may use the debug console (an authorized-keys file) and what they did (an audit log)."""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import os
import threading
from pathlib import Path

import paramiko

# An authorized-keys file larger than this is not read (nobody gets in, and the log says why).
MAX_KEYS_FILE = 1 << 20


def authorized(keys_file: Path, key: paramiko.PKey) -> str | None:
    """Who ``key`` is ("<fingerprint> <comment>") if a line of ``keys_file`` holds it, else None.
    Lines are OpenSSH's ``type base64 [comment]``; options before the type are not supported (such
    a line is skipped). A missing or unreadable file lets nobody in."""
    try:
        with open(keys_file, "rb") as f:
            text = f.read(MAX_KEYS_FILE + 1)
    except OSError:
        return None
    if len(text) > MAX_KEYS_FILE:
        return None
    wanted = key.asbytes()
    for raw in text.decode(errors="replace").splitlines():
        fields = raw.strip().split(None, 2)
        if len(fields) < 2 or fields[0].startswith("#"):
            continue
        try:
            blob = base64.b64decode(fields[1], validate=True)
        except (binascii.Error, ValueError):
            continue
        if blob == wanted and key.get_name() == fields[0]:
            return f"{key.fingerprint} {fields[2] if len(fields) > 2 else ''}".strip()
    return None


class AuditLog:
    """One JSON object per line: the time, the event and its facts. Appended, 0600."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def event(self, kind: str, **facts: object) -> None:
        """Raises nothing: an audit log that cannot be written is reported by the next reader."""
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        line = json.dumps({"time": now, "event": kind, **facts}) + "\n"
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    os.write(fd, line.encode())
                finally:
                    os.close(fd)
            except OSError:
                pass
