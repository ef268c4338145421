"""The router's metrics: cheap per-request accounting and the Prometheus text format.

The text exposition format (version 0.0.4) is written here by hand rather
than with ``prometheus_client``: the router exports a dozen fixed metric
families, the format is a few lines of escaping and formatting, and its
multi-process aggregation is ours anyway (see :mod:`ptth_sync.router.admin`),
so the runtime dependencies stay ``h2``, ``hyperframe`` and ``gunicorn``.

One :class:`RouterMetrics` counts in each router process. :meth:`Router.snapshot
<ptth_sync.router.Router.snapshot>` turns it, with the live tunnels, into a
plain JSON-able dict; :func:`merge` adds such snapshots up (several worker
processes) and :func:`render` and :func:`status` present the sum. Label
values stay bounded: status codes, the operator's origins, and the fixed
reason categories below.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Tuple

if TYPE_CHECKING:
    from ..engine import Connection

__all__ = [
    "CONTENT_TYPE",
    "DROP_REASONS",
    "DURATION_BUCKETS",
    "REFUSAL_REASONS",
    "RouterMetrics",
    "add_up",
    "drop_reason",
    "escape_label_value",
    "merge",
    "opening_failure_reason",
    "parse",
    "render",
    "status",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Upper bounds (seconds) of the request duration histogram's buckets.
DURATION_BUCKETS: Tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)

#: Why a live tunnel left the pool.
DROP_REASONS: Tuple[str, ...] = (
    "goaway",          # the backend sent GOAWAY: it stopped or drained
    "peer_closed",     # the backend closed the connection without GOAWAY
    "ping_timeout",    # no answer to a PING within --ping-timeout
    "network",         # a read or write failed (reset, broken pipe)
    "tls",             # a TLS error on an established tunnel
    "protocol_error",  # the backend broke HTTP/2
    "flood",           # a hostile-peer limit: PING/SETTINGS or RST_STREAM flood, huge header block, unread output
    "router_closed",   # the router (or this worker process) shut down
    "other",
)

#: Why a connection to the tunnel listener never became a tunnel in the pool.
REFUSAL_REASONS: Tuple[str, ...] = (
    "unauthorized",    # 401: missing or wrong token (or the plain wire where a token is required)
    "forbidden",       # 403: the token may not register that origin
    "bad_request",     # a malformed upgrade (answered 400 or 404)
    "timeout",         # no complete upgrade, TLS handshake or HTTP/2 SETTINGS in time
    "tls",             # the TLS handshake failed
    "network",         # the connection failed or closed while opening
    "protocol_error",  # the backend broke HTTP/2 before its SETTINGS
    "other",
)

_DROP_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("peer sent GOAWAY", "goaway"),
    ("peer closed the connection", "peer_closed"),
    ("no answer to PING", "ping_timeout"),
    ("peer sent no HTTP/2 SETTINGS", "settings_timeout"),
    ("protocol error from peer", "protocol_error"),
    ("peer sent over", "flood"),
    ("peer reset over", "flood"),
    ("peer sent a header block over", "flood"),
    ("peer does not read what we send", "flood"),
    ("router closed", "router_closed"),
    ("read failed", "network"),
    ("write failed", "network"),
)


def drop_reason(reason: str) -> str:
    """The category (one of :data:`DROP_REASONS`) of a tunnel's close reason, as the engine words it."""
    category = _category(reason)
    return "other" if category == "settings_timeout" else category


def opening_failure_reason(reason: str) -> str:
    """The category (one of :data:`REFUSAL_REASONS`) of a close reason for a tunnel that was never ready."""
    category = _category(reason)
    if category == "settings_timeout":
        return "timeout"
    if category in ("peer_closed", "goaway"):
        return "network"
    if category == "flood":
        return "protocol_error"
    return category if category in REFUSAL_REASONS else "other"


def _category(reason: str) -> str:
    for prefix, category in _DROP_PREFIXES:
        if reason.startswith(prefix):
            if category == "network" and ("SSL" in reason or "TLS" in reason):
                return "tls"
            return category
    return "other"


class _Tunnel:
    __slots__ = ("connected_at", "connection", "origin", "served")

    def __init__(self, connection: Connection, origin: str) -> None:
        self.connection = connection
        self.origin = origin
        self.connected_at = time.time()
        self.served = 0


class RouterMetrics:
    """What one router process counts: requests, bytes, tunnels coming and going.

    Request threads call :meth:`request_done` once per request: one lock, a
    few additions. Everything else happens when tunnels come and go, or when
    someone asks (:meth:`counters`, :meth:`tunnels`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Dict[int, int] = {}
        self._buckets = [0] * (len(DURATION_BUCKETS) + 1)  # per bucket, not cumulative; the last is +Inf
        self._duration_sum = 0.0
        self._request_bytes = 0
        self._response_bytes = 0
        self._broken = 0
        self._connects: Dict[str, int] = {}
        self._drops = dict.fromkeys(DROP_REASONS, 0)
        self._refusals = dict.fromkeys(REFUSAL_REASONS, 0)
        self._tunnels: Dict[int, _Tunnel] = {}
        self._websockets = 0
        self._websockets_open = 0
        self._websocket_bytes = {"to_backend": 0, "to_client": 0}

    # -- the proxy path ----------------------------------------------------------

    def request_done(
        self,
        code: int,
        started: Optional[float] = None,
        sent: int = 0,
        received: int = 0,
        tunnel: Optional[Connection] = None,
        broken: bool = False,
    ) -> None:
        """Count a request answered with ``code``.

        ``started``: the ``time.monotonic()`` at which the router first called
        a tunnel for it (None when it never did: no duration is observed);
        ``sent``/``received``: body bytes forwarded to and from the backend;
        ``tunnel``: the one that answered; ``broken``: the tunnel failed after
        the response started.
        """
        duration = time.monotonic() - started if started is not None else 0.0
        with self._lock:
            self._requests[code] = self._requests.get(code, 0) + 1
            if started is not None:
                self._buckets[bisect.bisect_left(DURATION_BUCKETS, duration)] += 1
                self._duration_sum += duration
            self._request_bytes += sent
            self._response_bytes += received
            if broken:
                self._broken += 1
            if tunnel is not None:
                record = self._tunnels.get(id(tunnel))
                if record is not None:
                    record.served += 1

    # -- WebSockets --------------------------------------------------------------

    def websocket_opened(self) -> None:
        """A WebSocket is relayed from now on (its ``101`` is counted by :meth:`request_done`)."""
        with self._lock:
            self._websockets += 1
            self._websockets_open += 1

    def websocket_closed(self, to_backend: int, to_client: int) -> None:
        """A WebSocket ended, having relayed these bytes each way."""
        with self._lock:
            self._websockets_open -= 1
            self._websocket_bytes["to_backend"] += to_backend
            self._websocket_bytes["to_client"] += to_client

    @property
    def websockets_open(self) -> int:
        """WebSockets relayed now (a gauge)."""
        return self._websockets_open

    # -- tunnels -----------------------------------------------------------------

    def tunnel_added(self, connection: Connection, origin: str) -> None:
        with self._lock:
            self._tunnels[id(connection)] = _Tunnel(connection, origin)
            self._connects[origin] = self._connects.get(origin, 0) + 1

    def tunnel_dropped(self, connection: Connection, reason: str) -> None:
        """A tunnel in the pool closed; ``reason`` is the engine's close reason."""
        category = drop_reason(reason)
        with self._lock:
            self._tunnels.pop(id(connection), None)
            self._drops[category] += 1

    def opening_failed(self, category: str) -> None:
        """A connection to the tunnel listener never became a tunnel (a :data:`REFUSAL_REASONS` entry)."""
        with self._lock:
            self._refusals[category if category in self._refusals else "other"] += 1

    # -- reading -----------------------------------------------------------------

    def counters(self) -> Dict[str, Any]:
        """A JSON-able copy of the counters."""
        with self._lock:
            return {
                "requests": {str(code): count for code, count in self._requests.items()},
                "duration_buckets": list(self._buckets),
                "duration_sum": self._duration_sum,
                "request_bytes": self._request_bytes,
                "response_bytes": self._response_bytes,
                "responses_broken": self._broken,
                "connects": dict(self._connects),
                "drops": dict(self._drops),
                "refusals": dict(self._refusals),
                "websockets": self._websockets,
                "websocket_bytes": dict(self._websocket_bytes),
            }

    def tunnels(self, pid: int) -> List[Dict[str, Any]]:
        """The live tunnels as JSON-able dicts (``pid``: the process that holds them)."""
        with self._lock:
            records = list(self._tunnels.values())
        return [
            {
                "peer": record.connection.name,
                "origin": record.origin,
                "connected_at": record.connected_at,
                "active_streams": record.connection.active_streams,
                "requests_served": record.served,
                "draining": not record.connection.accepting_streams,
                "worker_pid": pid,
            }
            for record in records
        ]


# -- several processes ------------------------------------------------------------


def merge(snapshots: Iterable[Mapping[str, Any]], retired: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Add up snapshots of live processes, plus the counters of processes gone (``retired``).

    A snapshot is ``{"pid", "counters", "origins", "waiting", "websockets", "tunnels"}``
    (see ``Router.snapshot``); counters and gauges are summed, tunnels listed.
    """
    view: Dict[str, Any] = {"counters": {}, "origins": {}, "waiting": 0, "websockets": 0, "tunnels": [],
                            "workers": []}
    if retired:
        add_up(view["counters"], retired)
    for snapshot in snapshots:
        add_up(view["counters"], snapshot.get("counters", {}))
        add_up(view["origins"], snapshot.get("origins", {}))
        view["waiting"] += snapshot.get("waiting", 0)
        view["websockets"] += snapshot.get("websockets", 0)
        view["tunnels"] += snapshot.get("tunnels", [])
        view["workers"].append(snapshot.get("pid"))
    return view


def add_up(into: Dict[str, Any], more: Mapping[str, Any]) -> None:
    """Add the numbers in ``more`` to ``into``, key by key, in nested dicts and lists alike."""
    for key, value in more.items():
        if isinstance(value, Mapping):
            add_up(into.setdefault(key, {}), value)
        elif isinstance(value, list):
            existing = into.get(key)
            if existing is None:
                into[key] = list(value)
            elif len(existing) == len(value):
                into[key] = [a + b for a, b in zip(existing, value)]
        else:
            into[key] = into.get(key, 0) + value


# -- presenting -------------------------------------------------------------------

_PREFIX = "ptth_router_"


def render(view: Mapping[str, Any]) -> str:
    """The Prometheus text exposition (0.0.4) of a merged view."""
    counters = view.get("counters", {})
    tunnels = view.get("tunnels", [])
    out = _Exposition()
    labelled = (
        ("tunnels", "gauge", 'Live tunnels, by the origin they registered for ("*": the default pool).',
         "origin", view.get("origins", {})),
        ("tunnel_connects_total", "counter", "Tunnels that joined the pool, by origin.",
         "origin", counters.get("connects", {})),
        ("tunnel_drops_total", "counter", "Tunnels that left the pool, by reason.",
         "reason", counters.get("drops", {})),
        ("tunnel_refusals_total", "counter",
         "Connections to the tunnel listener that never joined the pool: refused or failed, by reason.",
         "reason", counters.get("refusals", {})),
        ("requests_total", "counter", "Requests answered by the router, by the status code sent to the client.",
         "code", counters.get("requests", {})),
        ("websocket_bytes_total", "counter",
         'Bytes relayed on WebSockets, by direction ("to_backend", "to_client"), counted as each WebSocket ends.',
         "direction", counters.get("websocket_bytes", {})),
    )
    for name, kind, help_text, label, values in labelled:
        out.family(name, kind, help_text)
        for key, count in sorted(values.items()):
            out.sample(name, count, **{label: key})
    out.family("request_duration_seconds", "histogram",
               "Time from the router calling a tunnel to the end (or failure) of the response body.")
    buckets = counters.get("duration_buckets") or [0] * (len(DURATION_BUCKETS) + 1)
    cumulative = 0
    for bound, count in zip((*DURATION_BUCKETS, math.inf), buckets):
        cumulative += count
        out.sample("request_duration_seconds_bucket", cumulative, le=_number(float(bound)))
    out.sample("request_duration_seconds_sum", float(counters.get("duration_sum", 0.0)))
    out.sample("request_duration_seconds_count", cumulative)
    out.family("request_bytes_total", "counter", "Request body bytes forwarded from clients to backends.")
    out.sample("request_bytes_total", counters.get("request_bytes", 0))
    out.family("response_bytes_total", "counter", "Response body bytes forwarded from backends to clients.")
    out.sample("response_bytes_total", counters.get("response_bytes", 0))
    out.family("responses_broken_total", "counter",
               "Responses cut because the tunnel failed after they started (the client connection was aborted).")
    out.sample("responses_broken_total", counters.get("responses_broken", 0))
    out.family("active_streams", "gauge", "HTTP/2 streams open on the tunnels: requests in flight to backends.")
    out.sample("active_streams", sum(tunnel["active_streams"] for tunnel in tunnels))
    out.family("requests_waiting", "gauge", "Requests waiting for a tunnel (up to --tunnel-wait).")
    out.sample("requests_waiting", view.get("waiting", 0))
    out.family("websockets_open", "gauge", "WebSockets relayed now (each is also an active stream).")
    out.sample("websockets_open", view.get("websockets", 0))
    out.family("websockets_total", "counter", "WebSockets opened (answered 101) since the start.")
    out.sample("websockets_total", counters.get("websockets", 0))
    out.family("workers", "gauge", "Router worker processes whose metrics this answer includes.")
    out.sample("workers", len(view.get("workers", [])))
    return out.text()


def status(view: Mapping[str, Any], now: Optional[float] = None) -> Dict[str, Any]:
    """The router's state as a JSON-able dict: totals and every tunnel."""
    now = time.time() if now is None else now
    tunnels = [
        {
            "peer": tunnel["peer"],
            "origin": tunnel["origin"],
            "age_seconds": round(max(now - tunnel["connected_at"], 0.0), 3),
            "active_streams": tunnel["active_streams"],
            "requests_served": tunnel["requests_served"],
            "draining": tunnel["draining"],
            "worker_pid": tunnel["worker_pid"],
        }
        for tunnel in sorted(view.get("tunnels", []), key=lambda t: (t["origin"], t["connected_at"]))
    ]
    counters = view.get("counters", {})
    return {
        "live_tunnels": len(tunnels),
        "active_streams": sum(tunnel["active_streams"] for tunnel in tunnels),
        "requests_waiting": view.get("waiting", 0),
        "requests_total": sum(counters.get("requests", {}).values()),
        "websockets_open": view.get("websockets", 0),
        "origins": dict(sorted(view.get("origins", {}).items())),
        "workers": sorted(view.get("workers", [])),
        "tunnels": tunnels,
    }


class _Exposition:
    def __init__(self) -> None:
        self._lines: List[str] = []

    def family(self, name: str, kind: str, text: str) -> None:
        help_text = text.replace("\\", "\\\\").replace("\n", "\\n")
        self._lines += [f"# HELP {_PREFIX}{name} {help_text}", f"# TYPE {_PREFIX}{name} {kind}"]

    def sample(self, name: str, value: float, **labels: str) -> None:
        if labels:
            text = ",".join(f'{key}="{escape_label_value(str(val))}"' for key, val in labels.items())
            self._lines.append(f"{_PREFIX}{name}{{{text}}} {_number(value)}")
        else:
            self._lines.append(f"{_PREFIX}{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def escape_label_value(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        value = float(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def parse(text: str) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    """Samples of a text exposition, ``{(name, ((label, value), ...)): value}`` (for tests and tools)."""
    samples: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, labels, rest = _split_sample(line)
        samples[(name, labels)] = float(rest.split()[0])
    return samples


def _split_sample(line: str) -> Tuple[str, Tuple[Tuple[str, str], ...], str]:
    brace = line.find("{")
    space = line.find(" ")
    if brace < 0 or (0 <= space < brace):
        return line[:space], (), line[space + 1:]
    name = line[:brace]
    labels: List[Tuple[str, str]] = []
    i = brace + 1
    while line[i] != "}":
        eq = line.index("=", i)
        key = line[i:eq].strip().lstrip(",").strip()
        i = eq + 2  # past ="
        chars: List[str] = []
        while line[i] != '"':
            if line[i] == "\\":
                i += 1
                chars.append({"n": "\n"}.get(line[i], line[i]))
            else:
                chars.append(line[i])
            i += 1
        labels.append((key, "".join(chars)))
        i += 1
        if line[i] == ",":
            i += 1
    return name, tuple(labels), line[i + 1:].strip()

