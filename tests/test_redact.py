"""`gradwatch.redact.redact`: credentials masked in URLs of every shape and in whole messages;
SQLite paths and texts without credentials untouched."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gradwatch.redact import MASK, redact

SECRET = "S3cr3t"

MASKED = [
    # (text, what it becomes)
    (f"postgresql+psycopg://u:{SECRET}@h/db", "postgresql+psycopg://u:***@h/db"),
    (f"postgresql+psycopg://u:{SECRET}@h:5432/db?sslmode=require",
     "postgresql+psycopg://u:***@h:5432/db?sslmode=require"),
    (f"postgresql+psycopg://u@h/db?password={SECRET}&sslmode=require",
     "postgresql+psycopg://u@h/db?password=***&sslmode=require"),
    (f"postgresql://u@h/db?sslpassword={SECRET}", "postgresql://u@h/db?sslpassword=***"),
    (f"postgresql://u:{SECRET}@[::1]:5432/db", "postgresql://u:***@[::1]:5432/db"),
    (f"postgresql://u:{SECRET}@[::1:5432/db", "postgresql://u:***@[::1:5432/db"),  # malformed IPv6
    (f"postgresql+psycopg://u:{SECRET}@[::1:5432", "postgresql+psycopg://u:***@[::1:5432"),
    (f"postgresql//u:{SECRET}@h/db", "postgresql//u:***@h/db"),  # the colon after the scheme forgotten
    (f"postgresql:u:{SECRET}@h/db", "postgresql:***@h/db"),
    (f"u:{SECRET}@h/db", "u:***@h/db"),  # no scheme at all
    (f"postgresql://u:p@{SECRET}@h/db", "postgresql://u:***@h/db"),  # an unescaped @ in the password
    (f"postgresql://u:p/{SECRET}@h/db", "postgresql://u:***@h/db"),  # SQLAlchemy takes a / there too
    (f"postgresql://u:p%40{SECRET}@h/db", "postgresql://u:***@h/db"),
    (f"postgresql://u:{SECRET}@h1:5432,h2:5433/db", "postgresql://u:***@h1:5432,h2:5433/db"),
    (f"mysql+pymysql://root:{SECRET}@db.internal/gw?charset=utf8mb4",
     "mysql+pymysql://root:***@db.internal/gw?charset=utf8mb4"),
    (f"https://admin:{SECRET}@gw:9091/metrics", "https://admin:***@gw:9091/metrics"),
    (f"http://gw:9091/metrics/job/x?token={SECRET}", "http://gw:9091/metrics/job/x?token=***"),
    (f"http://gw:9091/?a=1&access_token={SECRET}&b=2", "http://gw:9091/?a=1&access_token=***&b=2"),
    (f"https://gw/?api_key={SECRET}", "https://gw/?api_key=***"),
    (f"https://gw/?X-Amz-Signature={SECRET}&X-Amz-Credential={SECRET}",
     "https://gw/?X-Amz-Signature=***&X-Amz-Credential=***"),
    (f"https://gw/cb#access_token={SECRET}", "https://gw/cb#access_token=***"),
    (f"https://:{SECRET}@gw/", "https://:***@gw/"),
    (f"ftp://admin:{SECRET}@gw:9091", "ftp://admin:***@gw:9091"),
    (f"redis://:{SECRET}@cache:6379/0", "redis://:***@cache:6379/0"),
    # in messages
    (f"Error: not a database URL: 'postgresql//u:{SECRET}@h/db'",
     "Error: not a database URL: 'postgresql//u:***@h/db'"),
    (f"invalid configuration: pushgateway: Input should be http(s), got 'ftp://admin:{SECRET}@gw:9091'",
     "invalid configuration: pushgateway: Input should be http(s), got 'ftp://admin:***@gw:9091'"),
    (f'started url=http://127.0.0.1:9464 pushgateway="https://gw:9091/?token={SECRET}"',
     'started url=http://127.0.0.1:9464 pushgateway="https://gw:9091/?token=***"'),
    (f"host=db port=5432 password={SECRET} dbname=gw", "host=db port=5432 password=*** dbname=gw"),
    (f"cannot open the store postgresql://u@h/db?password={SECRET}: refused",
     "cannot open the store postgresql://u@h/db?password=***: refused"),
    (f"token={SECRET}.", "token=***."),
    (f"host=db password='{SECRET} x' dbname=gw", "host=db password='***' dbname=gw"),
    (f"{{'url': 'http://gw', 'password': '{SECRET}'}}", "{'url': 'http://gw', 'password': '***'}"),
    (f'{{"token": "{SECRET}", "n": 1}}', '{"token": "***", "n": 1}'),
    (f"Authorization: Bearer {SECRET}", "Authorization: ***"),
    (f"headers: authorization=Basic {SECRET}", "headers: authorization=***"),
    (f"Traceback:\n  File 'x.py', line 3\nValueError: cannot connect to postgresql://u:{SECRET}@h/db\n",
     "Traceback:\n  File 'x.py', line 3\nValueError: cannot connect to postgresql://u:***@h/db\n"),
]


@pytest.mark.parametrize(("text", "want"), MASKED, ids=[f"{i:02d}" for i in range(len(MASKED))])
def test_credentials_are_masked(text: str, want: str) -> None:
    assert redact(text) == want
    assert redact(want) == want  # idempotent


def test_a_bare_userinfo_inside_prose_is_left_but_a_url_is_masked() -> None:
    """The limit of pattern matching: `u:pw@h` quoted inside a sentence looks like a run name such
    as 'lr:0.1@bs64'. The store never writes one (its messages hold whole URLs, and an `@` in a
    password that would make the driver quote a piece of it is refused up front)."""
    text = f"bad netloc 'u:{SECRET}@h' in postgresql://u:{SECRET}@h/db"
    assert redact(text) == f"bad netloc 'u:{SECRET}@h' in postgresql://u:{MASK}@h/db"


KEPT = [
    "sqlite:////var/lib/gradwatch/gradwatch.db",
    "sqlite:///relative/dir/gradwatch.db",
    "sqlite:////tmp/odd:dir@host/x.db",  # a path with ':' and '@' has no authority
    "sqlite:///rel:ative@x.db",
    "sqlite:///file:/tmp/x.db?mode=ro&uri=true",
    "sqlite://",
    "postgresql+psycopg://postgres@127.0.0.1:5432/gw",
    "postgresql://[::1]:5432/db",
    "postgresql://[::1:5432/db",
    "postgresql+psycopg://u:***@h/db",
    "http://127.0.0.1:9091/metrics/job/gradwatch",
    "http://h/x:y@z",  # a path, not userinfo
    "FATAL:  password authentication failed for user \"u\"",
    "no run matches 'lr:0.1@bs64'",  # a run name inside a message
    "gradwatch: 2 corrupt records skipped while ingesting run logs",
    "run name with\nnewline and = sign",
    "",
]


@pytest.mark.parametrize("text", KEPT, ids=[f"{i:02d}" for i in range(len(KEPT))])
def test_text_without_credentials_is_kept(text: str) -> None:
    assert redact(text) == text


def test_redact_is_light() -> None:
    """The agent may use it: it imports nothing beyond the standard library."""
    code = ("import sys, gradwatch.redact; bad = {'torch', 'sqlalchemy', 'numpy', 'click', 'pydantic'} & "
            "set(sys.modules); print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
