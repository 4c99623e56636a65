"""One redaction function for every URL kvtier shows: no part of a password survives,
whatever characters it holds."""

from __future__ import annotations

import pytest

from kvtier.core.urls import redact

PASSWORDS = [
    "simple",
    "1234567890",
    "p#ss",
    "p/ss",
    "p?ss",
    "p@ss",
    "p:ss",
    "p&s=s",
    "p%40ss",
    "p ss",
    "pässwörd",
    "#/?@:",
]
FORMS = [
    "redis://:{}@cache:6379/0",
    "redis://kvtier:{}@cache:6379/0",
    "rediss://kvtier:{}@cache:6380/1",
    "redis+cluster://kvtier:{}@h1:6379,h2:6379",
    "unix://kvtier:{}@/run/valkey.sock",
    "http://user:{}@minio:9000",
    "s3://bucket/prefix?secret_key={}",
    "http://host/x?token={}&n=1",
    "etcd://h:2379?password={}",
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("password", PASSWORDS)
def test_no_part_of_a_password_survives(form: str, password: str) -> None:
    shown = redact(form.format(password))
    pieces = {password, *password.split("#"), *password.split("/"), *password.split("@")}
    assert not any(len(p) > 2 and p in shown for p in pieces), shown
    assert "***" in shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:secret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://kv:s#cr/t@cache", "redis://kv:***@cache"),
        ("http://h/x?token=abc&n=1", "http://h/x?token=***&n=1"),
        ("redis://kv@cache:6379", "redis://kv@cache:6379"),
        ("file:///var/cache/kv", "file:///var/cache/kv"),
        ("cpu://", "cpu://"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("not a url", "not a url"),
    ],
)
def test_what_is_kept(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_redact_escapes_control_characters_so_a_url_cannot_forge_log_lines() -> None:
    assert redact("redis://:pw@h:1/0\nkvtier: all good") == "redis://:***@h:1/0\\nkvtier: all good"
    assert redact("cpu://a\x00b") == "cpu://a\\x00b"
