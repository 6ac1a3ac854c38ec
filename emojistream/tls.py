"""TLS for C{ssl:} listeners: a modern cipher list, TLS 1.2 at least, and ALPN (HTTP/2)
that works where write+execute memory is denied.

Twisted builds an C{ssl:} endpoint's context through pyOpenSSL, whose ALPN selection
callback is a cffi C{ffi.callback}: cffi allocates it in write+execute memory, which
systemd's C{MemoryDenyWriteExecute=yes} (the kernel's C{PR_SET_MDWE}) refuses, and
every TLS connection then fails with a traceback. Here the context is built with
pyOpenSSL's own calls, and the ALPN callback is a ctypes function, which libffi 3.4+
places on static trampolines (read+execute code mapped from libffi itself, no W+X
page); pyOpenSSL's callback is the fallback, and TLS without ALPN (HTTP/1.1 only,
with one warning at start) the last resort.

HTTP/2 is only negotiated over a suite with forward secrecy and an AEAD cipher (RFC
9113 section 9.2.2): with the default list every TLS 1.2 suite is such, and with an
operator's own list a connection over any other suite speaks HTTP/1.1.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from typing import Any

from OpenSSL import SSL
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from emojistream.compat import (
    dh_parameters_path,
    openssl_bindings,
    ssl_context_pointer,
    ssl_endpoint_options,
    ssl_endpoint_with_creator,
)

#: Mozilla's "intermediate" TLS 1.2 suites (ECDHE/DHE key exchange with AES-GCM or
#: ChaCha20-Poly1305; the DHE ones need C{dhParameters=} on the endpoint). TLS 1.3
#: suites are OpenSSL's, all of them AEAD with forward secrecy.
INTERMEDIATE_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-CHACHA20-POLY1305",
))

# What an ALPN selection callback returns (OpenSSL's SSL_TLSEXT_ERR_*).
_OK, _ALERT_FATAL, _NOACK = 0, 2, 3
_TLS1_3 = 0x0304

# int (*)(SSL *ssl, const unsigned char **out, unsigned char *outlen,
#         const unsigned char *in, unsigned int inlen, void *arg)
_SELECT = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_ubyte), ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p)


def parse_ciphers(text: str) -> str:
    """An OpenSSL cipher string for TLS 1.2 (e.g. C{ECDHE+AESGCM:ECDHE+CHACHA20});
    empty means L{INTERMEDIATE_CIPHERS}. One that selects no suite is refused."""
    ciphers = text.strip() or INTERMEDIATE_CIPHERS
    if not ciphers.isascii() or not ciphers.isprintable():
        raise ValueError(f"{text!r} is not an OpenSSL cipher string")
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.set_cipher_list(ciphers.encode("ascii"))
    except SSL.Error:
        raise ValueError(f"{text!r} selects no cipher suite OpenSSL knows") from None
    return ciphers


def h2_suitable(cipher: str | None) -> bool:
    """Whether HTTP/2 may run over the suite named C{cipher} (OpenSSL's name): TLS 1.3
    suites, and TLS 1.2 ones with ephemeral key exchange and an AEAD cipher; the rest
    are on RFC 9113's list of suites HTTP/2 must not use."""
    if not cipher:
        return False
    if cipher.startswith("TLS_"):
        return True
    aead = "-GCM-" in cipher or "CHACHA20-POLY1305" in cipher or "-CCM" in cipher
    return cipher.startswith(("ECDHE-", "DHE-")) and aead


def split_protocols(wire: bytes) -> list[bytes]:
    """The protocol names of an ALPN list in its wire form (each length-prefixed)."""
    names = []
    while wire:
        size = wire[0]
        names.append(wire[1:1 + size])
        wire = wire[1 + size:]
    return names


def select_protocol(offered: Sequence[bytes], ours: Sequence[bytes], h2_ok: bool
                    ) -> bytes | None:
    """Our first protocol the client offered (C{h2} only if C{h2_ok}), or None to go
    on without ALPN."""
    for name in ours:
        if name in offered and (name != b"h2" or h2_ok):
            return name
    return None


def unfit_for_h2(context: SSL.Context) -> list[str]:
    """The TLS 1.2 suites C{context} may negotiate that HTTP/2 must not run over."""
    names = SSL.Connection(context, None).get_cipher_list()
    return [name for name in names if not h2_suitable(name)]


class _NativeSelect:
    """The ALPN callback as a ctypes function set on the context through OpenSSL's
    C{SSL_CTX_set_alpn_select_cb} (reached through pyOpenSSL's bindings, see
    L{emojistream.compat.openssl_bindings}).

    When it runs, OpenSSL has chosen the suite but does not yet tell it (the call
    that would, C{SSL_get_pending_cipher}, is not in pyOpenSSL's bindings): the
    version is known, and over TLS 1.3 every suite is fit for HTTP/2; over TLS 1.2,
    C{tls12_h2} says whether every suite the context allows is."""

    def __init__(self, context: SSL.Context, protocols: Sequence[bytes],
                 tls12_h2: bool) -> None:
        ffi, lib = openssl_bindings()
        self._ffi, self._lib = ffi, lib
        self._protocols = tuple(protocols)
        self._tls12_h2 = tls12_h2
        # Kept as long as the context: OpenSSL holds a pointer into it.
        self.function = _SELECT(self._select)
        setter = lib.SSL_CTX_set_alpn_select_cb
        callback_type = ffi.typeof(setter).args[1]
        address = ctypes.cast(self.function, ctypes.c_void_p).value
        setter(ssl_context_pointer(context), ffi.cast(callback_type, address), ffi.NULL)

    def _h2_ok(self, ssl: int) -> bool:
        version = int(self._lib.SSL_version(self._ffi.cast("SSL *", ssl)))
        return version >= _TLS1_3 or self._tls12_h2

    def _select(self, ssl: int, out: Any, outlen: Any, wire: int, size: int,
                _arg: int) -> int:
        # Whatever happens, an answer: an exception would return an arbitrary value.
        try:
            offered = ctypes.string_at(wire, size)
            choice = select_protocol(split_protocols(offered), self._protocols,
                                     self._h2_ok(ssl))
            if choice is None:
                return _NOACK
            # Point into the client's list (OpenSSL copies the choice at once).
            at = 0
            while offered[at + 1:at + 1 + offered[at]] != choice:
                at += 1 + offered[at]
            out[0] = wire + at + 1
            outlen[0] = len(choice)
            return _OK
        except Exception:
            return _ALERT_FATAL


def set_alpn(context: SSL.Context, protocols: Sequence[bytes], tls12_h2: bool) -> Any:
    """Install the ALPN selection on C{context}: the ctypes callback, else pyOpenSSL's
    (C{h2} over TLS 1.2 only if C{tls12_h2}). Returns what must be kept alive with
    the context; raises L{MemoryError} when neither can be made (write+execute memory
    denied and no static trampolines)."""
    try:
        return _NativeSelect(context, protocols, tls12_h2)
    except (ImportError, AttributeError, TypeError, MemoryError):
        pass

    def select(connection: SSL.Connection, offered: list[bytes]) -> Any:
        h2_ok = connection.get_protocol_version() >= _TLS1_3 or tls12_h2
        choice = select_protocol(offered, protocols, h2_ok)
        return SSL.NO_OVERLAPPING_PROTOCOLS if choice is None else choice

    context.set_alpn_select_callback(select)
    return select


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Makes each accepted connection's TLS object from one context built here: the
    certificate, key, chain and DH parameters an C{ssl:} endpoint string gave Twisted,
    with TLS 1.2 at least, C{ciphers} for TLS 1.2, and ALPN offering C{protocols}."""

    log = Logger()

    def __init__(self, options: Any, ciphers: str, protocols: Sequence[bytes]) -> None:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        # As Twisted's CertificateOptions: no compression (CRIME), the server's order,
        # fresh (EC)DH keys, no session tickets or cache, buffers freed when idle (a
        # stream is idle most of the time); and no renegotiation a client could start.
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
                            | SSL.OP_SINGLE_DH_USE | SSL.OP_SINGLE_ECDH_USE
                            | SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION)
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        context.set_session_id(os.urandom(8).hex().encode("ascii"))
        context.use_certificate(options.certificate)
        context.use_privatekey(options.privateKey)
        for extra in options.extraCertChain or ():
            context.add_extra_chain_cert(extra)
        context.check_privatekey()
        dh = getattr(options, "dhParameters", None)
        if dh is not None:
            context.load_tmp_dh(dh_parameters_path(dh))
        context.set_cipher_list(ciphers.encode("ascii"))
        self.context = context
        self.alpn: Any = None
        unfit = unfit_for_h2(context)
        if unfit and b"h2" in protocols:
            self.log.warn("HTTP/2 over TLS 1.3 only: the TLS 1.2 cipher list allows "
                          "suites HTTP/2 must not use ({unfit})", unfit=":".join(unfit))
        if protocols:
            try:
                self.alpn = set_alpn(context, protocols, tls12_h2=not unfit)
            except MemoryError:
                self.log.warn("TLS without ALPN, so HTTP/1.1 only: this process may not "
                              "make the callback ALPN needs (write+execute memory is "
                              "denied and libffi has no static trampolines)")

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A TLS connection for one accepted client."""
        return SSL.Connection(self.context, None)


def harden(reactor: Any, endpoint: Any, ciphers: str, protocols: Sequence[bytes]) -> Any:
    """C{endpoint} as it is, or for an C{ssl:} one the same port with L{ServerTLS}."""
    if not isinstance(endpoint, SSL4ServerEndpoint):
        return endpoint
    creator = ServerTLS(ssl_endpoint_options(endpoint), ciphers, protocols)
    return ssl_endpoint_with_creator(reactor, endpoint, creator)
