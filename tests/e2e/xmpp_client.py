#!/usr/bin/env python3
"""XMPP client-to-server checks for Switchboard's end-to-end tests.

Run with the interpreter of ``infra/scripts/python-env.sh`` (it has slixmpp).
Every command prints exactly one JSON line on stdout (logs go to stderr) and
exits 0 when the outcome is the expected one, 1 when it is not, 2 on a usage
error. Each run is bounded by ``--timeout`` seconds (default 20).

Commands
--------
login
    A real client (slixmpp): connects to --host/--port (no SRV lookup), over
    STARTTLS (RFC 6120 §5) or direct TLS (XEP-0368), verifying the server's
    certificate against --cafile for the JID's domain; authenticates with
    exactly --mechanism (RFC 6120 §6; SCRAM-SHA-1/-256 of RFC 5802/7677, their
    -PLUS variants with ``tls-exporter`` channel binding of RFC 9266, or
    PLAIN); binds a resource (§7); sends initial presence (RFC 6121 §4.2); does
    an IQ round trip to the server (XEP-0199 ping: a reply, even an error, shows
    that the server processes stanzas in order); closes the stream.
      {"ok": true, "jid": "alice@example.com/res", "mechanism": "SCRAM-SHA-256", ...}
      {"ok": false, "error": "not-authorized", "stage": "auth", ...}
    With --expect-fail, exit 0 only when authentication itself failed (a SASL
    <failure/>: "sasl_failure": true); connection, TLS or mechanism problems
    never count.

plain-before-tls
    A raw socket on the STARTTLS port, without TLS: reads the first
    <stream:features/>, records whether <starttls/> is offered with
    <required/> and which SASL mechanisms are offered, then tries
    <auth mechanism='PLAIN'/> with the given (valid) credentials anyway.
    "ok" is true when STARTTLS is required, no mechanism is offered before TLS
    and the PLAIN attempt was refused (SASL <failure/>, stream error, or the
    server closing the connection).

raw
    A raw stream (optionally STARTTLS/direct TLS, optionally authenticated
    with PLAIN and a bound resource) after which --send bytes or an oversized
    stanza (--oversized N: a <message/> whose body has N bytes) are written
    while the server's answer is read. Reports the stream error condition and
    whether the server closed the stream/connection. "ok" is true when a
    stream error (--expect-condition, if given) came and the connection was
    closed.

Examples
--------
  python xmpp_client.py login --jid alice@example.com --password secret \\
      --host 127.0.0.1 --port 5222 --mode starttls --mechanism SCRAM-SHA-256 \\
      --cafile data/tls/cert.pem
  python xmpp_client.py plain-before-tls --jid alice@example.com --password secret \\
      --host 127.0.0.1 --port 5222
  python xmpp_client.py raw --host 127.0.0.1 --port 5222 --domain example.com \\
      --send '<message><body>x</message>' --expect-condition not-well-formed
  python xmpp_client.py raw --host 127.0.0.1 --port 5222 --domain example.com \\
      --oversized 307200 --expect-condition policy-violation
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import signal
import ssl
import sys
import time
import xml.etree.ElementTree as ET
from typing import Any

NS_STREAMS = "http://etherx.jabber.org/streams"
NS_STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_CLIENT = "jabber:client"

MECHANISMS = (
    "SCRAM-SHA-256-PLUS",
    "SCRAM-SHA-1-PLUS",
    "SCRAM-SHA-256",
    "SCRAM-SHA-1",
    "PLAIN",
)

log = logging.getLogger("xmpp_client")

# ---------------------------------------------------------------------------
# Output: exactly one JSON line, whatever happens.

_printed = False


def emit(result: dict[str, Any]) -> None:
    global _printed
    if _printed:
        return
    _printed = True
    sys.stdout.write(json.dumps(result, sort_keys=False) + "\n")
    sys.stdout.flush()


def install_backstop(seconds: float) -> None:
    """A hard limit that holds even if the event loop is stuck."""

    def expired(_signum, _frame):
        emit({"ok": False, "error": "timeout", "stage": "hard-timeout",
              "detail": f"no outcome within {seconds:.0f} s"})
        os._exit(1)

    signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)


# ---------------------------------------------------------------------------
# TLS helpers


def tls_context(cafile: str | None, minimum: str | None = None,
                maximum: str | None = None) -> ssl.SSLContext:
    """Verifies the server against `cafile` only (not the system store)."""
    if not cafile:
        raise SystemExit("error: --cafile is required for TLS")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    versions = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
    if minimum:
        ctx.minimum_version = versions[minimum]
    if maximum:
        ctx.maximum_version = versions[maximum]
    return ctx


class ExporterUnavailable(Exception):
    pass


def tls_exporter(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> bytes:
    """RFC 9266 `tls-exporter` channel-binding data of a TLS 1.3 connection:
    32 bytes exported with the label "EXPORTER-Channel-Binding" and no context.

    Python's ssl module only offers `tls-unique` (cpython#95341), so this calls
    OpenSSL's SSL_export_keying_material on the connection's SSL* through
    ctypes. The SSL* is read from CPython's PySSLSocket struct
    (PyObject_HEAD, Socket, ssl, ctx, ...); the layout is checked three ways
    (ctx field is the Python SSLContext, SSL_get_SSL_CTX(ssl) is that
    context's SSL_CTX*, SSL_get_version(ssl) is the reported version) before
    anything is exported, so a different layout fails cleanly.
    """
    import _ssl
    import ctypes

    inner = getattr(ssl_object, "_sslobj", None)
    if inner is None:
        raise ExporterUnavailable("no _sslobj on the TLS object")
    if hasattr(sys, "gettotalrefcount") or getattr(sys, "_is_gil_enabled", lambda: True)() is False:
        raise ExporterUnavailable("debug or free-threaded CPython: unknown object layout")
    words = ctypes.cast(id(inner), ctypes.POINTER(ctypes.c_void_p))
    ssl_ptr, ctx_obj = words[3], words[4]
    if not ssl_ptr or ctx_obj != id(ssl_object.context):
        raise ExporterUnavailable("unexpected PySSLSocket layout")
    try:
        lib = ctypes.CDLL(_ssl.__file__)
        get_ctx = lib.SSL_get_SSL_CTX
        get_version = lib.SSL_get_version
        export = lib.SSL_export_keying_material
    except (OSError, AttributeError) as e:
        raise ExporterUnavailable(f"OpenSSL symbols not reachable: {e}") from e
    get_ctx.argtypes, get_ctx.restype = [ctypes.c_void_p], ctypes.c_void_p
    get_version.argtypes, get_version.restype = [ctypes.c_void_p], ctypes.c_char_p
    ctx_words = ctypes.cast(id(ssl_object.context), ctypes.POINTER(ctypes.c_void_p))
    if get_ctx(ssl_ptr) != ctx_words[2]:
        raise ExporterUnavailable("unexpected PySSLContext layout")
    version = get_version(ssl_ptr).decode()
    if version != ssl_object.version():
        raise ExporterUnavailable("SSL* does not match the connection")
    if version != "TLSv1.3":
        raise ExporterUnavailable(f"tls-exporter needs TLS 1.3 here, got {version}")
    export.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                       ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                       ctypes.c_size_t, ctypes.c_int]
    export.restype = ctypes.c_int
    label = b"EXPORTER-Channel-Binding"
    out = ctypes.create_string_buffer(32)
    if export(ssl_ptr, out, 32, label, len(label), None, 0, 0) != 1:
        raise ExporterUnavailable("SSL_export_keying_material failed")
    return out.raw


# ---------------------------------------------------------------------------
# login: slixmpp


class _LogCollector(logging.Handler):
    """Keeps slixmpp's warnings and errors for the JSON report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(f"{record.name}: {record.getMessage()}"[:300])
        except Exception:  # noqa: BLE001 - never fail on logging
            pass


async def run_login(args: argparse.Namespace) -> dict[str, Any]:
    import slixmpp
    from slixmpp.jid import JID

    collector = _LogCollector()
    logging.getLogger("slixmpp").addHandler(collector)

    jid = JID(args.jid)
    if args.resource:
        jid.resource = args.resource
    domain = jid.domain
    mech = args.mechanism
    plus = mech.endswith("-PLUS")
    cb_type = args.channel_binding
    # slixmpp labels its binding data `tls-unique` below TLS 1.3 and
    # `tls-exporter` on TLS 1.3, so the TLS version is pinned to match.
    minimum = maximum = None
    if plus and cb_type == "tls-exporter":
        minimum = "1.3"
    elif plus and cb_type == "tls-unique":
        maximum = "1.2"
    if args.tls_max:
        maximum = args.tls_max

    loop = asyncio.get_running_loop()
    done: asyncio.Future[dict[str, Any]] = loop.create_future()
    state: dict[str, Any] = {"stage": "connect", "sasl_failure": None,
                             "stream_error": None, "cb_error": None}

    def finish(result: dict[str, Any]) -> None:
        if not done.done():
            done.set_result(result)

    def fail(error: str, **extra: Any) -> None:
        result = {"ok": False, "error": error, "stage": state["stage"],
                  "mechanism": mech}
        result.update({k: v for k, v in extra.items() if v is not None})
        finish(result)

    xmpp = slixmpp.ClientXMPP(str(jid), args.password)

    def credentials(required, optional):
        plugin = xmpp.plugin["feature_mechanisms"]
        wanted = set(required) | set(optional)
        result = plugin._default_credentials(wanted - {"channel_binding"}, set())
        if "channel_binding" in wanted:
            result["channel_binding"] = None
            sock = xmpp.socket
            if plus and isinstance(sock, (ssl.SSLObject, ssl.SSLSocket)):
                try:
                    if cb_type == "tls-exporter":
                        result["channel_binding"] = tls_exporter(sock)
                    else:
                        result["channel_binding"] = sock.get_channel_binding("tls-unique")
                except (ExporterUnavailable, ValueError) as e:
                    state["cb_error"] = str(e)
        return result

    plugin = xmpp.plugin["feature_mechanisms"]
    plugin.use_mech = mech
    plugin.use_mechs = {mech}
    plugin.sasl_callback = credentials
    plugin.unencrypted_plain = False
    plugin.unencrypted_scram = False
    xmpp.enable_direct_tls = args.mode == "directtls"
    xmpp.enable_starttls = args.mode == "starttls"
    xmpp.enable_plaintext = False
    xmpp.ssl_context = tls_context(args.cafile, minimum, maximum)
    xmpp.whitespace_keepalive = False
    xmpp.register_plugin("xep_0199")  # ping

    def on_connection_failed(error: Any) -> None:
        xmpp.cancel_connection_attempt()
        if isinstance(error, ssl.SSLCertVerificationError):
            fail("tls-verification-failed", detail=str(error))
        else:
            fail("connection-failed", detail=str(error))

    def on_invalid_chain(error: Any) -> None:
        fail("tls-verification-failed", detail=str(error))
        xmpp.abort()

    def on_connected(_event: Any) -> None:
        state["stage"] = "negotiate"

    def on_tls(_event: Any) -> None:
        state["stage"] = "auth"

    def on_failed_auth(stanza: Any) -> None:
        state["sasl_failure"] = {"condition": stanza["condition"] or "unknown",
                                 "text": stanza["text"] or None}

    def on_failed_all_auth(_event: Any) -> None:
        failure = state["sasl_failure"]
        offered = sorted(plugin.mech_list) if plugin.mech_list else []
        if failure is not None:
            state["stage"] = "auth"
            fail(failure["condition"], text=failure["text"], offered=offered,
                 sasl_failure=True)
        elif mech not in offered:
            fail("mechanism-not-offered", offered=offered)
        else:
            fail("mechanism-unusable", offered=offered, detail=state["cb_error"]
                 or "; ".join(collector.messages[-3:]) or None)

    def on_auth_success(_stanza: Any) -> None:
        state["stage"] = "bind"
        m = plugin.mech
        state["mechanism"] = m.name if m else None
        state["gs2_header"] = getattr(m, "gs2_header", b"").decode() or None

    async def on_session_start(_event: Any) -> None:
        state["stage"] = "session"
        bound = xmpp.boundjid
        if not bound.resource or bound.bare != jid.bare:
            fail("bind-failed", jid=bound.full or None)
            return
        if state.get("mechanism") != mech:
            fail("wrong-mechanism", used=state.get("mechanism"))
            return
        sock = xmpp.socket
        tls_version = sock.version() if isinstance(sock, (ssl.SSLObject, ssl.SSLSocket)) else None
        if tls_version is None:
            fail("not-encrypted")
            return
        xmpp.send_presence()
        ping = "no-reply"
        try:
            iq = xmpp.Iq()
            iq["type"] = "get"
            iq["to"] = domain
            iq.enable("ping")
            reply = await iq.send(timeout=5)
            ping = "result" if reply["type"] == "result" else "error"
        except slixmpp.exceptions.IqError as e:
            ping = "error:" + (e.iq["error"]["condition"] or "unknown")
        except slixmpp.exceptions.IqTimeout:
            ping = "no-reply"
        result = {"ok": True, "jid": bound.full, "mechanism": state["mechanism"],
                  "mode": args.mode, "tls": tls_version, "ping": ping}
        if state.get("gs2_header"):
            result["gs2_header"] = state["gs2_header"]
        finish(result)

    def on_stream_error(error: Any) -> None:
        state["stream_error"] = {"condition": error["condition"] or "unknown",
                                 "text": error["text"] or None}
        fail("stream-error:" + state["stream_error"]["condition"],
             text=state["stream_error"]["text"])

    def on_disconnected(reason: Any) -> None:
        if state["sasl_failure"] is not None:
            failure = state["sasl_failure"]
            state["stage"] = "auth"
            fail(failure["condition"], text=failure["text"], sasl_failure=True)
        elif isinstance(reason, ssl.SSLCertVerificationError):
            # a failed STARTTLS handshake ends here
            fail("tls-verification-failed", detail=str(reason))
        else:
            fail("disconnected", detail=str(reason) if reason else None,
                 log=collector.messages[-3:] or None)

    xmpp.add_event_handler("connection_failed", on_connection_failed)
    xmpp.add_event_handler("ssl_invalid_chain", on_invalid_chain)
    xmpp.add_event_handler("connected", on_connected)
    xmpp.add_event_handler("tls_success", on_tls)
    xmpp.add_event_handler("failed_auth", on_failed_auth)
    xmpp.add_event_handler("failed_all_auth", on_failed_all_auth)
    xmpp.add_event_handler("auth_success", on_auth_success)
    xmpp.add_event_handler("session_start", on_session_start)
    xmpp.add_event_handler("stream_error", on_stream_error)
    xmpp.add_event_handler("disconnected", on_disconnected)

    xmpp.connect(args.host, args.port)
    try:
        result = await asyncio.wait_for(done, timeout=max(1.0, args.deadline - time.monotonic() - 3))
    except asyncio.TimeoutError:
        result = {"ok": False, "error": "timeout", "stage": state["stage"],
                  "mechanism": mech, "log": collector.messages[-3:] or None}
    # Close the stream politely (RFC 6120 §4.4), then the connection.
    xmpp.cancel_connection_attempt()
    if xmpp.transport is not None:
        try:
            await asyncio.wait_for(xmpp.disconnect(wait=2), timeout=3)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001
            xmpp.abort()
    return {k: v for k, v in result.items() if v is not None}


# ---------------------------------------------------------------------------
# Raw streams (plain-before-tls, raw)


class StreamClosed(Exception):
    """The server sent </stream:stream>."""


class ConnectionClosed(Exception):
    """EOF or reset on the TCP connection."""

    def __init__(self, reset: bool, detail: str = "") -> None:
        super().__init__(detail or ("reset" if reset else "eof"))
        self.reset = reset


def qname(ns: str, name: str) -> str:
    return "{%s}%s" % (ns, name)


def local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def namespace(tag: str) -> str:
    return tag[1:].split("}", 1)[0] if tag.startswith("{") else ""


def stream_error_condition(element: ET.Element) -> tuple[str, str | None]:
    condition, text = "unknown", None
    for child in element:
        if namespace(child.tag) == NS_STREAM_ERRORS:
            if local(child.tag) == "text":
                text = child.text
            else:
                condition = local(child.tag)
    return condition, text


class RawStream:
    """A minimal XMPP stream over asyncio: header, top-level elements."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pending: list[ET.Element] = []
        self.header: dict[str, str] | None = None
        self.stream_closed = False
        self.eof = False
        self.reset = False
        self._new_parser()

    def _new_parser(self) -> None:
        self.parser = ET.XMLPullParser(events=("start", "end"))
        self.received = b""
        self.depth = 0
        self.root: ET.Element | None = None
        self.header = None

    async def connect(self, host: str, port: int, ctx: ssl.SSLContext | None = None) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            host, port, ssl=ctx, server_hostname=self.domain if ctx else None)

    def tls_version(self) -> str | None:
        obj = self.writer.get_extra_info("ssl_object") if self.writer else None
        return obj.version() if obj is not None else None

    async def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.writer.write(data)
        await self.writer.drain()

    async def open_stream(self) -> ET.Element:
        """Sends the stream header, returns the <stream:features/>."""
        self._new_parser()
        await self.send(
            "<?xml version='1.0'?>"
            f"<stream:stream to='{self.domain}' version='1.0' xml:lang='en' "
            f"xmlns='{NS_CLIENT}' xmlns:stream='{NS_STREAMS}'>")
        element = await self.next_element()
        if element.tag != qname(NS_STREAMS, "features"):
            raise ProtocolError(element)
        return element

    def _feed(self, data: bytes) -> None:
        # what this stream (since its last header) received, for reports
        self.received = (self.received + data)[-4096:]
        self.parser.feed(data)
        for event, element in self.parser.read_events():
            if event == "start":
                self.depth += 1
                if self.depth == 1:
                    self.root = element
                    self.header = dict(element.attrib)
            else:
                if self.depth == 1:
                    self.stream_closed = True
                elif self.depth == 2:
                    self.pending.append(element)
                    if self.root is not None:
                        self.root.remove(element)
                self.depth -= 1

    async def next_element(self) -> ET.Element:
        while True:
            if self.pending:
                return self.pending.pop(0)
            if self.stream_closed:
                raise StreamClosed()
            if self.eof:
                raise ConnectionClosed(self.reset)
            try:
                data = await self.reader.read(65536)
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError) as e:
                self.eof = self.reset = True
                raise ConnectionClosed(True, str(e)) from e
            if not data:
                self.eof = True
                continue
            self._feed(data)

    async def drain_until_closed(self, seconds: float) -> None:
        """Reads (and drops) whatever comes until EOF, at most `seconds`;
        notes </stream:stream> on the way."""
        try:
            async with asyncio.timeout(seconds):
                while not self.eof:
                    try:
                        data = await self.reader.read(65536)
                    except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError):
                        self.eof = self.reset = True
                        return
                    if not data:
                        self.eof = True
                        return
                    if not self.stream_closed:
                        try:
                            self._feed(data)
                        except ET.ParseError:
                            pass
        except TimeoutError:
            return

    async def starttls(self, ctx: ssl.SSLContext) -> ET.Element:
        await self.send(f"<starttls xmlns='{NS_TLS}'/>")
        element = await self.next_element()
        if element.tag != qname(NS_TLS, "proceed"):
            raise ProtocolError(element)
        await self.writer.start_tls(ctx, server_hostname=self.domain)
        return await self.open_stream()

    async def auth_plain(self, user: str, password: str) -> ET.Element:
        """Returns the server's <success/> or <failure/> (or stream error)."""
        token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()
        await self.send(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{token}</auth>")
        return await self.next_element()

    async def bind(self) -> str:
        await self.send(f"<iq type='set' id='bind1'><bind xmlns='{NS_BIND}'/></iq>")
        element = await self.next_element()
        jid = element.find(f"{qname(NS_BIND, 'bind')}/{qname(NS_BIND, 'jid')}")
        if element.get("type") != "result" or jid is None or not jid.text:
            raise ProtocolError(element)
        return jid.text

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()



class ProtocolError(Exception):
    def __init__(self, element: ET.Element) -> None:
        super().__init__(ET.tostring(element, encoding="unicode")[:500])
        self.element = element


def describe_features(features: ET.Element) -> dict[str, Any]:
    starttls = features.find(qname(NS_TLS, "starttls"))
    mechanisms = features.find(qname(NS_SASL, "mechanisms"))
    offered = []
    if mechanisms is not None:
        offered = [m.text.strip() for m in mechanisms.findall(qname(NS_SASL, "mechanism")) if m.text]
    return {
        "starttls": starttls is not None,
        "starttls_required": starttls is not None
        and starttls.find(qname(NS_TLS, "required")) is not None,
        "mechanisms": offered,
        "features": [local(child.tag) for child in features],
    }


def split_jid(jid: str) -> tuple[str, str]:
    bare = jid.split("/", 1)[0]
    if "@" not in bare:
        raise SystemExit(f"error: {jid!r} has no local part")
    user, domain = bare.split("@", 1)
    return user, domain


async def run_plain_before_tls(args: argparse.Namespace) -> dict[str, Any]:
    user, domain = split_jid(args.jid)
    stream = RawStream(args.domain or domain)
    result: dict[str, Any] = {"ok": False}
    try:
        await stream.connect(args.host, args.port)
        features = await stream.open_stream()
        described = describe_features(features)
        result.update({
            "starttls": described["starttls"],
            "starttls_required": described["starttls_required"],
            "mechanisms_before_tls": described["mechanisms"],
            "features_before_tls": described["features"],
        })
        # Try PLAIN with the real password anyway: a refusal is then about
        # the missing TLS, not about the credentials.
        answer = None
        try:
            answer = await asyncio.wait_for(stream.auth_plain(user, args.password), timeout=5)
        except asyncio.TimeoutError:
            result["plain_auth"] = "no-response"
        except StreamClosed:
            result["plain_auth"] = "closed"
        except ConnectionClosed as e:
            result["plain_auth"] = "closed"
            result["reset"] = e.reset
        if answer is not None:
            if answer.tag == qname(NS_SASL, "success"):
                result["plain_auth"] = "success"
            elif answer.tag == qname(NS_SASL, "failure"):
                result["plain_auth"] = "failure"
                conditions = [local(c.tag) for c in answer if local(c.tag) != "text"]
                result["condition"] = conditions[0] if conditions else None
            elif answer.tag == qname(NS_STREAMS, "error"):
                result["plain_auth"] = "stream-error"
                result["condition"], text = stream_error_condition(answer)
                if text:
                    result["text"] = text
            else:
                result["plain_auth"] = "unexpected"
                result["element"] = ET.tostring(answer, encoding="unicode")[:300]
        if result.get("plain_auth") in ("stream-error", "closed"):
            await stream.drain_until_closed(5)
            result["closed"] = stream.eof
        result["ok"] = bool(
            result["starttls"]
            and result["starttls_required"]
            and not result["mechanisms_before_tls"]
            and result.get("plain_auth") in ("failure", "stream-error", "closed"))
    except (OSError, ConnectionClosed, StreamClosed, ProtocolError, ET.ParseError) as e:
        result.update({"ok": False, "error": type(e).__name__, "detail": str(e)})
        if isinstance(e, ET.ParseError):
            result["received"] = stream.received.decode("utf-8", "replace")[-1500:]
    finally:
        stream.close()
    return result


def payload_bytes(args: argparse.Namespace) -> bytes:
    if args.oversized is not None:
        head = f"<message to='{args.to or args.domain}' type='chat' id='big'><body>".encode()
        tail = b"</body></message>"
        return head + b"a" * args.oversized + tail
    if args.send_hex is not None:
        return bytes.fromhex(args.send_hex)
    return (args.send or "").encode()


async def run_raw(args: argparse.Namespace) -> dict[str, Any]:
    domain = args.domain
    user = None
    if args.jid:
        user, jid_domain = split_jid(args.jid)
        domain = domain or jid_domain
    if not domain:
        raise SystemExit("error: --domain (or --jid) is required")
    args.domain = domain
    stream = RawStream(domain)
    result: dict[str, Any] = {"ok": False, "stage": "connect"}
    payload = payload_bytes(args)
    try:
        ctx = tls_context(args.cafile) if args.tls != "none" else None
        await stream.connect(args.host, args.port, ctx if args.tls == "directtls" else None)
        result["stage"] = "stream"
        await stream.open_stream()
        if args.tls == "starttls":
            result["stage"] = "starttls"
            await stream.starttls(ctx)
        result["tls"] = stream.tls_version()
        if user is not None:
            result["stage"] = "auth"
            answer = await stream.auth_plain(user, args.password or "")
            if answer.tag != qname(NS_SASL, "success"):
                raise ProtocolError(answer)
            await stream.open_stream()
            result["stage"] = "bind"
            result["jid"] = await stream.bind()
        result["stage"] = "payload"

        sent = 0
        send_error = None

        async def sender() -> None:
            nonlocal sent, send_error
            try:
                for i in range(0, len(payload), args.chunk):
                    chunk = payload[i:i + args.chunk]
                    await stream.send(chunk)
                    sent += len(chunk)
            except (ConnectionError, OSError, ssl.SSLError, RuntimeError) as e:
                send_error = f"{type(e).__name__}: {e}"

        send_task = asyncio.create_task(sender())
        condition = text = None
        element_seen = None
        try:
            async with asyncio.timeout(args.wait):
                while True:
                    element = await stream.next_element()
                    if element.tag == qname(NS_STREAMS, "error"):
                        condition, text = stream_error_condition(element)
                        break
                    element_seen = ET.tostring(element, encoding="unicode")[:300]
        except (StreamClosed, ConnectionClosed, TimeoutError):
            pass
        except ET.ParseError as e:
            result["parse_error"] = str(e)
            result["received"] = stream.received.decode("utf-8", "replace")[-1500:]
        # After a stream error the server closes its stream and the connection.
        await stream.drain_until_closed(5)
        if not send_task.done():
            send_task.cancel()
        try:
            await send_task
        except asyncio.CancelledError:
            pass
        result.update({
            "condition": condition,
            "text": text,
            "stream_closed": stream.stream_closed,
            "closed": stream.eof,
            "reset": stream.reset,
            "payload_bytes": len(payload),
            "sent_bytes": sent,
            "send_error": send_error,
            "other_element": element_seen,
        })
        if args.expect_condition:
            result["ok"] = condition == args.expect_condition and stream.eof
        else:
            result["ok"] = condition is not None and stream.eof
    except (OSError, ConnectionClosed, StreamClosed, ProtocolError, ET.ParseError) as e:
        result.update({"ok": False, "error": type(e).__name__, "detail": str(e)})
        if isinstance(e, ET.ParseError):
            result["received"] = stream.received.decode("utf-8", "replace")[-1500:]
    finally:
        stream.close()
    return {k: v for k, v in result.items() if v is not None}


# ---------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each command prints one JSON line; see the module docstring.")
    parser.add_argument("--timeout", type=float, default=20.0,
                        help="hard limit for the whole run, seconds (default 20)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)

    login = sub.add_parser("login", help="log in with slixmpp (TLS, SASL, bind, presence)")
    common(login)
    login.add_argument("--jid", required=True)
    login.add_argument("--password", required=True)
    login.add_argument("--resource", help="resource to request (default: server-generated)")
    login.add_argument("--mode", choices=("starttls", "directtls"), default="starttls")
    login.add_argument("--mechanism", choices=MECHANISMS, required=True)
    login.add_argument("--cafile", required=True, help="PEM certificate(s) to trust")
    login.add_argument("--channel-binding", choices=("tls-exporter", "tls-unique"),
                       default="tls-exporter",
                       help="for -PLUS: tls-exporter (RFC 9266, TLS 1.3; default) "
                            "or tls-unique (RFC 5929, forces TLS 1.2)")
    login.add_argument("--tls-max", choices=("1.2", "1.3"), help="highest TLS version")
    login.add_argument("--expect-fail", action="store_true",
                       help="exit 0 only if authentication fails (SASL failure)")

    pbt = sub.add_parser("plain-before-tls", help="PLAIN must not be usable before STARTTLS")
    common(pbt)
    pbt.add_argument("--jid", required=True)
    pbt.add_argument("--password", required=True)
    pbt.add_argument("--domain", help="stream 'to' (default: the JID's domain)")

    raw = sub.add_parser("raw", help="send bytes on a stream, report the stream error")
    common(raw)
    raw.add_argument("--domain", help="stream 'to' (default: the JID's domain)")
    raw.add_argument("--tls", choices=("none", "starttls", "directtls"), default="none")
    raw.add_argument("--cafile", help="PEM certificate(s) to trust (with --tls)")
    raw.add_argument("--jid", help="authenticate (PLAIN, needs --tls) and bind first")
    raw.add_argument("--password")
    what = raw.add_mutually_exclusive_group(required=True)
    what.add_argument("--send", help="text to send after the stream header")
    what.add_argument("--send-hex", help="bytes to send, as hex")
    what.add_argument("--oversized", type=int, metavar="N",
                      help="send a <message/> whose body is N bytes")
    raw.add_argument("--to", help="'to' of the oversized message (default: the domain)")
    raw.add_argument("--chunk", type=int, default=16384, help="write size (default 16384)")
    raw.add_argument("--wait", type=float, default=10.0,
                     help="seconds to wait for the server's answer (default 10)")
    raw.add_argument("--expect-condition", help="stream error condition expected")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.CRITICAL,
                        stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "raw" and args.jid and args.tls == "none":
        print("error: --jid needs --tls starttls|directtls (PLAIN is never sent in the clear)",
              file=sys.stderr)
        return 2
    args.deadline = time.monotonic() + args.timeout
    install_backstop(args.timeout)
    runner = {"login": run_login, "plain-before-tls": run_plain_before_tls,
              "raw": run_raw}[args.command]

    async def bounded() -> dict[str, Any]:
        try:
            return await asyncio.wait_for(runner(args), timeout=max(1.0, args.timeout - 1))
        except asyncio.TimeoutError:
            return {"ok": False, "error": "timeout", "stage": args.command}

    try:
        result = asyncio.run(bounded())
    except Exception as e:  # noqa: BLE001 - report, don't traceback
        log.debug("internal error", exc_info=True)
        result = {"ok": False, "error": "internal", "detail": f"{type(e).__name__}: {e}"}
    signal.setitimer(signal.ITIMER_REAL, 0)
    emit(result)
    if args.command == "login" and args.expect_fail:
        matched = not result.get("ok") and result.get("sasl_failure") is True
    else:
        matched = bool(result.get("ok"))
    return 0 if matched else 1


if __name__ == "__main__":
    sys.exit(main())
