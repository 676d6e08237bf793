"""Who the debug console lets in: an authorized-keys file read with bounds (hostile or broken lines
skipped, an oversized file lets nobody in), the audit log's lines, and the listen address checked."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import paramiko
import pytest

from kvmsandbox.config import ConfigError, ConsoleConfig
from kvmsandbox.console import audit
from kvmsandbox.console.audit import AuditLog, authorized


def test_only_a_listed_key_of_the_same_type_gets_in(tmp_path: Path) -> None:
    key, other = paramiko.ECDSAKey.generate(), paramiko.ECDSAKey.generate()
    keys = tmp_path / "keys"
    keys.write_text(
        "\n".join(
            [
                "# comment",
                "garbage",
                "ssh-ed25519 !!!not-base64!!!",
                f"ssh-rsa {key.get_base64()} right blob, wrong type",
                f'command="x" {key.get_name()} {key.get_base64()} options are not supported',
                f"{other.get_name()} {other.get_base64()}",
                f"{key.get_name()} {key.get_base64()} ops@example with spaces",
            ]
        )
    )
    assert authorized(keys, key) == f"{key.fingerprint} ops@example with spaces"
    assert authorized(keys, paramiko.ECDSAKey.generate()) is None
    assert authorized(tmp_path / "missing", key) is None


def test_an_oversized_keys_file_lets_nobody_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = paramiko.ECDSAKey.generate()
    keys = tmp_path / "keys"
    keys.write_text(f"{key.get_name()} {key.get_base64()}\n" + "#" * 2000)
    monkeypatch.setattr(audit, "MAX_KEYS_FILE", 1000)
    assert authorized(keys, key) is None


def test_audit_lines_are_json_and_the_log_is_private(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    log.event("session-start", who="x", pod='p\n"injected', command=base64.b64encode(b"\x00").decode())
    (line,) = (tmp_path / "audit.log").read_text().splitlines()
    assert json.loads(line)["pod"] == 'p\n"injected'
    assert (tmp_path / "audit.log").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("listen", ["", "127.0.0.1:2222", "[::1]:22", "unix:/run/kvmsandbox/ssh.sock"])
def test_console_listen_accepts_off_loopback_and_unix(listen: str) -> None:
    ConsoleConfig(listen=listen)


@pytest.mark.parametrize("listen", ["0.0.0.0:22", "10.0.0.1:22", "127.0.0.1", "127.0.0.1:0", "host:22", "unix:rel"])
def test_console_listen_refuses_anything_else(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"console\.listen"):
        ConsoleConfig(listen=listen)
