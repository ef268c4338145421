"""Who may open a tunnel into a router, and for which origins.

A router may have one shared token (``--token``: it may register any
origin) and a tokens file mapping tokens to the origins each may register
(``--tokens-file``)::

    # token              origins it may register (* = any, and the default pool)
    k3y-for-the-api      https://api.example.com
    k3y-for-the-sites    https://www.example.com https://blog.example.com
    k3y-for-anything     *

Blank lines and ``#`` comments are ignored. A token restricted to named
origins may not join the default pool (that would hand it every request no
origin claims). Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
from typing import Dict, FrozenSet, Iterable, Mapping, Optional, Tuple

from .origins import ANY, normalize_origin

__all__ = ["TunnelAccess", "load_tokens_file"]


class TunnelAccess:
    """The router's rule for new tunnels: open (no token at all) or by token, per origin."""

    def __init__(self, token: Optional[str] = None, tokens: Optional[Mapping[str, Iterable[str]]] = None) -> None:
        self._grants: Dict[bytes, FrozenSet[str]] = {}
        for key, origins in (tokens or {}).items():
            self._grants[key.encode("utf-8")] = frozenset(normalize_origin(o) for o in origins)
        if token:
            self._grants[token.encode("utf-8")] = frozenset([ANY])

    @property
    def required(self) -> bool:
        """True when every tunnel must present a token (the plain wire is refused)."""
        return bool(self._grants)

    def check(self, authorization: str, origin: str) -> Optional[Tuple[int, str]]:
        """None when a tunnel with this ``Authorization`` may register ``origin``, else (401 or 403, why)."""
        if not self._grants:
            return None
        scheme, _, presented = authorization.strip().partition(" ")
        key = presented.strip().encode("utf-8") if scheme.lower() == "bearer" else b""
        allowed: Optional[FrozenSet[str]] = None
        for candidate, origins in self._grants.items():  # every one compared: no timing hint
            if hmac.compare_digest(key, candidate):
                allowed = origins
        if allowed is None:
            return 401, "wrong or missing token"
        if ANY in allowed or origin in allowed:
            return None
        what = "the default pool (no origin)" if origin == ANY else f"origin {origin}"
        return 403, f"this token may not register {what}"


def load_tokens_file(path: str) -> Dict[str, FrozenSet[str]]:
    """Read a tokens file; raises ValueError naming the file and line of the first mistake."""
    grants: Dict[str, FrozenSet[str]] = {}
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.readlines()
    except OSError as exc:
        msg = f"cannot read the tokens file {path}: {exc.strerror}"
        raise ValueError(msg) from None
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        token, origins = words[0], words[1:]
        where = f"{path}:{number}"
        if not origins:
            msg = f"{where}: a token needs the origins it may register after it (* for any)"
            raise ValueError(msg)
        if token in grants:
            msg = f"{where}: this token is listed twice"
            raise ValueError(msg)
        try:
            grants[token] = frozenset(normalize_origin(origin) for origin in origins)
        except ValueError as exc:
            msg = f"{where}: {exc}"
            raise ValueError(msg) from None
    if not grants:
        msg = f"the tokens file {path} lists no token"
        raise ValueError(msg)
    return grants
