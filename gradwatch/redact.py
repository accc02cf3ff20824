"""`redact(text)`: credentials out of anything gradwatch prints (errors, log lines, tracebacks).

One function for every printer, so a secret given in a URL or a connection string cannot
reach a terminal or a log by a path someone forgot. It masks with ``***``:

- the password of a URL's userinfo (``scheme://user:***@host``, the user is kept), in any URL
  inside the text, malformed ones included (``postgresql//u:***@h``, ``[::1:5432``); a
  password may hold ``@`` or ``/`` (SQLAlchemy accepts them), so the userinfo ends at the last
  ``@`` before the path, query or fragment that follows the first ``@``;
- a whole text without spaces that has no ``//`` but a ``user:password@`` (a URL typed
  without its scheme);
- the value of every ``key=value`` (URL queries and fragments, libpq conninfo strings) and
  every quoted ``'key': value`` (dict and JSON reprs) whose key names a credential: it holds
  pass, pwd, token, secret, key, auth, sig, credential, cookie, session or jwt;
- what follows ``Authorization:``.

SQLite paths (``sqlite:///path``, ``sqlite:////abs/path``) have no authority and stay intact.
It errs on the side of masking: an ``@`` in a URL's path may hide the host too. A bare
``user:password@host`` inside a sentence is not recognised (it reads like a run name such as
``lr:0.1@bs64``): print whole URLs. Standard library only, so the agent may use it as well.
"""

from __future__ import annotations

import re

__all__ = ["MASK", "redact"]

MASK = "***"

# bounded repeats: a long word must not make the search quadratic
_SECRET_KEY = r"[\w.-]{0,64}?(?:pass|pwd|token|secret|key|auth|sig|credential|cookie|session|jwt)[\w.-]{0,64}"
_VALUE = r"""(?:"[^"]*"|'[^']*'|[^\s&;#,'"<>()\[\]{}]*[^\s&;#,'"<>()\[\]{}:.])"""  # a ':' or '.' after it is prose
_KEY_VALUE = re.compile(rf"(?i)(?<![\w.-])(?P<key>{_SECRET_KEY})(?P<eq>\s*=\s*)(?P<value>{_VALUE})")
_QUOTED_KEY = re.compile(rf"""(?i)(?P<key>(?P<q>['"]){_SECRET_KEY}(?P=q))(?P<eq>\s*:\s*)(?P<value>{_VALUE})""")
_AUTH_HEADER = re.compile(r"(?i)(?P<key>\b(?:proxy-)?authorization)(?P<eq>\s*[:=]\s*)(?P<value>(?:\w+\s+)?[^\s'\"]+)")
_AUTHORITY = re.compile(r"""(?<!/)//(?!/)(?P<rest>[^\s'"<>]*)""")


def redact(text: str) -> str:
    """`text` with every credential masked (see the module docstring); idempotent."""
    if not text:
        return text
    out = _AUTHORITY.sub(lambda m: "//" + _mask_userinfo(m.group("rest")), text)
    if "//" not in out and not any(c.isspace() for c in out):
        out = _mask_userinfo(out)
    for pattern in (_AUTH_HEADER, _KEY_VALUE, _QUOTED_KEY):  # the header first: its value has a space
        out = pattern.sub(_mask_value, out)
    return out


def _mask_userinfo(rest: str) -> str:
    """`user:***@host...` for `user:password@host...`; `rest` unchanged without a password."""
    first = rest.find("@")
    if first < 0:
        return rest
    ends = [i for i in (rest.find(c, first) for c in "/?#") if i >= 0]
    last = rest.rfind("@", 0, min(ends, default=len(rest)))
    user, colon, _ = rest[:last].partition(":")
    if not colon or "/" in user:  # no password, or a path: no parser reads `h/x:y@z` as userinfo
        return rest
    return f"{user}:{MASK}{rest[last:]}"


def _mask_value(m: re.Match[str]) -> str:
    value = m.group("value")
    quote = value[0] if value[:1] in ("'", '"') and len(value) > 1 and value[-1] == value[0] else ""
    return f"{m.group('key')}{m.group('eq')}{quote}{MASK}{quote}"
