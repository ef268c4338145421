"""TLS for the tunnel, safe for one reading thread beside writing threads.

OpenSSL does not allow one ``SSL`` object to be used by two threads at once,
and :class:`ssl.SSLSocket` passes each ``recv`` and ``send`` straight to it:
the engine's reader thread and its writers would race inside OpenSSL. Here the
``SSLObject`` works on memory buffers under one lock, held only while
OpenSSL runs (never across socket I/O):

- ``recv`` (the reader) decrypts what is buffered, else reads the socket and
  feeds the bytes in;
- ``sendall`` (one writer at a time, serialised by the caller's write lock or
  our own) encrypts and sends. TLS records must leave in the order they were
  made, so records OpenSSL produces while *reading* (TLS 1.3 key-update
  answers, alerts) are queued and sent ahead of the next write.

It offers the small part of the socket interface the engine and the
handshake use.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .handshake import WRONG_PORT, HandshakeRefused, plaintext_answer
from .sockets import linger_close, read_record

__all__ = [
    "PlaintextPeer",
    "TLSChannel",
    "TLSConfigError",
    "TLSRefusal",
    "client_context",
    "load_cas",
    "load_chain",
    "server_context",
]

#: The fix for a backend that dialled a plain listener with TLS.
NOT_TLS_FIX = "drop --tls (and --cafile, --certfile), or give the router --certfile and --keyfile"
_CLIENT_CERT_FIX = ("start the backend with --certfile and --keyfile (PTTH_CERTFILE, PTTH_KEYFILE under gunicorn): "
                    "a certificate from a CA in the router's --ca-certs")
#: TLS alerts from the router that no redial can change (OpenSSL's names for them, as received).
_REFUSING_ALERTS: Dict[str, Tuple[str, str]] = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": ("it requires a client certificate (mutual TLS)", _CLIENT_CERT_FIX),
    "SSLV3_ALERT_HANDSHAKE_FAILURE": ("it failed the TLS handshake (a router with --ca-certs requires a client "
                                      "certificate)", _CLIENT_CERT_FIX),
    "SSLV3_ALERT_BAD_CERTIFICATE": ("it rejected the client certificate", _CLIENT_CERT_FIX),
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": ("it rejected the client certificate", _CLIENT_CERT_FIX),
    "TLSV1_ALERT_UNKNOWN_CA": ("it does not trust the client certificate's CA", _CLIENT_CERT_FIX),
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": ("it rejected the client certificate as expired", _CLIENT_CERT_FIX),
    "SSLV3_ALERT_CERTIFICATE_REVOKED": ("it rejected the client certificate as revoked", _CLIENT_CERT_FIX),
    "TLSV1_ALERT_ACCESS_DENIED": ("it denied access to the client certificate", _CLIENT_CERT_FIX),
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": ("it does not speak HTTP/2 (no ALPN h2)", WRONG_PORT),
}


class TLSRefusal(ssl.SSLError):
    """A TLS handshake the server failed, in words that name the fix."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PlaintextPeer(TLSRefusal):
    """A peer of a TLS listener spoke plain text; it has been told to dial with TLS."""


class TLSConfigError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the file and the option."""


class TLSChannel:
    """A TLS session over a connected socket, driven through memory BIOs."""

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: Optional[str] = None,
    ) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side, server_hostname)
        self._server_side = server_side
        #: The peer's first raw bytes (at most 64): they tell a peer that does not speak TLS.
        self.first_raw: Optional[bytes] = None
        #: The TLS error that ended the session after its handshake (an alert from the peer, say).
        self.failure: Optional[ssl.SSLError] = None
        self._lock = threading.Lock()  # the SSLObject and both BIOs
        self._send_lock = threading.Lock()  # records leave in the order they were made
        self._unsent: List[bytes] = []  # records made while reading, for the next send
        self._eof = False
        self._starved = False  # what is buffered holds no complete record
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)

    # -- handshake ------------------------------------------------------------

    def do_handshake(self, timeout: float) -> None:
        """Complete the TLS handshake within ``timeout`` seconds (raises ssl.SSLError, OSError).

        A failure's alert is sent before the error is raised, so that the peer
        learns why. On the server side, a peer whose first bytes are not TLS is
        answered in plain text (see :func:`~ptth_sync.handshake.plaintext_answer`)
        and :class:`PlaintextPeer` raised; the errors of a client certificate
        (missing, not trusted) are raised in words that name the fix.
        """
        deadline = time.monotonic() + timeout
        try:
            while True:
                failure: Optional[ssl.SSLError] = None
                with self._lock:
                    try:
                        self._ssl.do_handshake()
                        done = True
                    except ssl.SSLWantReadError:
                        done = False
                    except ssl.SSLError as exc:
                        failure, done = exc, False
                    out = self._outgoing.read()
                if out:
                    try:
                        self._sock.sendall(out)
                    except OSError:
                        if failure is None:
                            raise
                if failure is not None:
                    raise self._explain(failure) from failure
                if done:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    msg = "TLS handshake timed out"
                    raise TimeoutError(msg)
                self._sock.settimeout(remaining)
                try:
                    data = self._sock.recv(65536)
                except TimeoutError:
                    msg = f"no answer to the TLS handshake within {timeout:g}s"
                    if not self._server_side and self.first_raw is None:  # not a byte: no TLS server, it seems
                        msg += " (an HTTP port waits for a request: is this the router's --http port?)"
                    raise TimeoutError(msg) from None
                if not data:
                    msg = "peer closed the connection during the TLS handshake"
                    raise ConnectionResetError(msg)
                if self.first_raw is None:
                    self.first_raw = data[:64]
                    if self._server_side and data[:1] != b"\x16":  # a TLS handshake record starts with 22
                        self._answer_plaintext(data)
                with self._lock:
                    self._incoming.write(data)
        finally:
            try:
                self._sock.settimeout(None)
            except OSError:  # closed after answering a plain-text peer
                pass

    def _answer_plaintext(self, first: bytes) -> None:
        """Tell a peer that does not speak TLS to dial with TLS, then raise :class:`PlaintextPeer`."""
        answer, reason = plaintext_answer(first)
        try:
            self._sock.sendall(answer)
        except OSError:
            pass
        linger_close(self._sock)
        raise PlaintextPeer(reason)

    def _explain(self, exc: ssl.SSLError) -> ssl.SSLError:
        """A server's handshake error about the client certificate, in words that name the fix."""
        reason = getattr(exc, "reason", None)
        if not self._server_side:
            return exc
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return TLSRefusal("the backend presented no client certificate, which this router requires "
                                "(--ca-certs): start it with --certfile and --keyfile")
        if reason == "CERTIFICATE_VERIFY_FAILED":
            why = getattr(exc, "verify_message", "") or "verification failed"
            return TLSRefusal(f"the backend's client certificate is not trusted ({why}): "
                                "issue it from a CA in the router's --ca-certs")
        return exc

    def refusal(self, exc: Optional[BaseException] = None) -> Optional[HandshakeRefused]:
        """Client side: why dialling this router again cannot help, or None when nothing shows it.

        Looks at the router's first raw bytes (a plain HTTP/2 preface or an
        HTTP/1.1 answer: no TLS there) and at the TLS error ``exc`` from the
        handshake, or the one that ended the session (:attr:`failure`): an
        alert about the client certificate. A certificate of the router's
        that fails verification is not one of them: it may be renewed.
        """
        first = self.first_raw or b""
        if first.startswith(b"PRI * HTTP/2.0"):
            return HandshakeRefused(None, "its tunnel listener does not speak TLS (it sent a plain HTTP/2 preface)",
                                    NOT_TLS_FIX)
        if first.startswith(b"HTTP/"):
            return HandshakeRefused(None, "it answered in plain HTTP/1.1, not TLS", WRONG_PORT)
        error = exc if isinstance(exc, ssl.SSLError) else self.failure
        alert = getattr(error, "reason", None)
        if alert in _REFUSING_ALERTS:
            reason, fix = _REFUSING_ALERTS[alert]
            return HandshakeRefused(None, reason, fix)
        return None

    @property
    def raw_socket(self) -> socket.socket:
        """The TCP socket underneath."""
        return self._sock

    @property
    def selected_alpn_protocol(self) -> Optional[str]:
        return self._ssl.selected_alpn_protocol()

    def getpeercert(self) -> Any:
        return self._ssl.getpeercert()

    # -- the socket interface the engine uses ----------------------------------

    def recv(self, size: int) -> bytes:
        """Decrypted bytes, blocking as the socket does; ``b""`` at the end of the session."""
        return self._recv(size, wait=True)

    def recv_if_ready(self, size: int) -> bytes:
        """Like :meth:`recv`, but never waits for the network (the engine's reader, after poll).

        Raises :class:`ssl.SSLWantReadError` when what has arrived holds no
        complete record yet: the reader then polls again, with its timers,
        instead of blocking on a peer that stopped mid-record.
        """
        return self._recv(size, wait=False)

    def _recv(self, size: int, wait: bool) -> bytes:
        while True:
            with self._lock:
                try:
                    data = read_record(self._ssl, size)
                except ssl.SSLWantReadError:
                    data = None
                except ssl.SSLZeroReturnError:
                    data = b""
                except ssl.SSLError as exc:
                    self.failure = exc
                    raise
                made = self._outgoing.read()
                if made:
                    self._unsent.append(made)
            if data is not None:
                return data
            if self._eof:
                return b""
            if not wait and not self._poller.poll(0):
                self._starved = True
                msg = "no complete TLS record yet"
                raise ssl.SSLWantReadError(msg)
            raw = self._sock.recv(max(size, 16384))
            self._starved = False
            if not raw:
                self._eof = True
                with self._lock:
                    self._incoming.write_eof()
                continue
            with self._lock:
                self._incoming.write(raw)

    def pending(self) -> bool:
        """True when bytes are already here to decrypt (so polling the socket would wait wrongly)."""
        with self._lock:
            return bool(self._ssl.pending() or (self._incoming.pending and not self._starved))

    def sendall(self, data: bytes) -> None:
        with self._send_lock:
            with self._lock:
                self._ssl.write(data)
                records = [*self._unsent, self._outgoing.read()]
                self._unsent = []
            self._sock.sendall(b"".join(records))

    def sendall_buffers(self, buffers: Sequence[Any]) -> None:
        """``sendall`` of several buffers, in order, encrypted without joining them first."""
        with self._send_lock:
            with self._lock:
                for buffer in buffers:
                    if len(buffer):
                        self._ssl.write(buffer)
                records = [*self._unsent, self._outgoing.read()]
                self._unsent = []
            self._sock.sendall(b"".join(records))

    def send_available(self, buffers: Sequence[Any]) -> int:
        """Never blocks: encrypt ``buffers`` and send what the socket takes now; the plaintext bytes taken.

        Takes all of ``buffers`` or none: none while records made before
        are still waiting for room (so that what waits here stays one batch
        at most; the caller keeps the rest, and its memory bounds). What the
        socket did not take waits (:attr:`backlog`) and goes out first at the
        next send. Raises BlockingIOError when another thread is sending.
        """
        if not self._send_lock.acquire(blocking=False):
            raise BlockingIOError
        try:
            with self._lock:
                backlog = self._unsent
                self._unsent = []
            if backlog and not self._send_raw(b"".join(backlog)):
                return 0
            taken = 0
            with self._lock:
                for buffer in buffers:
                    if len(buffer):
                        self._ssl.write(buffer)
                        taken += len(buffer)
                # (Records the reader made meanwhile go first: they were made first.)
                records = b"".join([*self._unsent, self._outgoing.read()])
                self._unsent = []
            if records:
                self._send_raw(records)
            return taken
        finally:
            self._send_lock.release()

    def _send_raw(self, records: bytes) -> bool:
        """(Send lock held.) Send ``records`` without blocking; what the socket did not take goes back
        ahead of the records made since. True when all went."""
        try:
            sent = self._sock.send(records, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent == len(records):
            return True
        with self._lock:
            self._unsent.insert(0, records[sent:])
        return False

    @property
    def backlog(self) -> bool:
        """Encrypted bytes wait for room in the socket (see :meth:`send_available`)."""
        return bool(self._unsent)

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def settimeout(self, value: Optional[float]) -> None:
        self._sock.settimeout(value)

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def setsockopt(self, *args: Any) -> None:
        self._sock.setsockopt(*args)


def server_context(
    certfile: str, keyfile: Optional[str] = None, ca_certs: Optional[str] = None, *,
    options: Tuple[str, str, str] = ("--certfile", "--keyfile", "--ca-certs"),
) -> ssl.SSLContext:
    """The router's TLS context for tunnels: ALPN ``h2``; with ``ca_certs``, client certificates required.

    Raises :class:`TLSConfigError` naming the file and its option (``options``:
    the names of the certificate, key and CA options) for one that cannot be used.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION  # (TLS 1.2 peers: a renegotiation is a cheap DoS, CVE-2011-1473)
    load_chain(context, certfile, keyfile, options=options[:2])
    context.set_alpn_protocols(["h2"])
    if ca_certs:
        context.verify_mode = ssl.CERT_REQUIRED
        load_cas(context, ca_certs, options[2])
    return context


def client_context(
    cafile: Optional[str] = None, certfile: Optional[str] = None, keyfile: Optional[str] = None, *,
    options: Tuple[str, str, str] = ("--cafile", "--certfile", "--keyfile"),
) -> ssl.SSLContext:
    """The backend's TLS context: verifies the router's certificate and name, offers ALPN ``h2``.

    ``cafile`` trusts a private CA instead of the system's; ``certfile`` (and
    ``keyfile``) present a client certificate for mutual TLS. Raises
    :class:`TLSConfigError` naming the file and its option (``options``: the
    names of the CA, certificate and key options).
    """
    context = ssl.create_default_context()
    if cafile:
        load_cas(context, cafile, options[0])
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    if certfile:
        load_chain(context, certfile, keyfile, options=options[1:])
    elif keyfile:
        msg = f"{options[2]} needs {options[1]}: a key alone is no client certificate"
        raise TLSConfigError(msg)
    return context


def load_chain(context: ssl.SSLContext, certfile: str, keyfile: Optional[str] = None, *,
               options: Sequence[str] = ("--certfile", "--keyfile")) -> None:
    """``context.load_cert_chain``, raising :class:`TLSConfigError` with the file, its option and the fix."""
    cert_option, key_option = options
    _check_readable(certfile, cert_option)
    if keyfile:
        _check_readable(keyfile, key_option)
    try:
        context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:
        if not _holds_certificates(certfile):
            msg = f"{cert_option} {certfile} holds no PEM certificate"
        elif getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            msg = f"{key_option} {keyfile or certfile} does not match the certificate in {cert_option} {certfile}"
        elif keyfile:
            msg = f"{key_option} {keyfile} holds no usable PEM private key"
        else:
            msg = (f"{cert_option} {certfile} holds no usable private key: give {key_option} FILE, "
                   "or one PEM file holding the certificate and its key")
        raise TLSConfigError(msg) from None


def load_cas(context: ssl.SSLContext, cafile: str, option: str) -> None:
    """``context.load_verify_locations``, raising :class:`TLSConfigError` with the file and its option."""
    _check_readable(cafile, option)
    try:
        context.load_verify_locations(cafile)
    except ssl.SSLError:
        msg = f"{option} {cafile} holds no PEM certificate"
        raise TLSConfigError(msg) from None


def _check_readable(path: str, option: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        msg = f"{option} {path}: {exc.strerror or exc}"
        raise TLSConfigError(msg) from None


def _holds_certificates(path: str) -> bool:
    """Whether OpenSSL finds at least one certificate in the PEM file at ``path``."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(path)
    except (ssl.SSLError, OSError):
        return False
    return True
