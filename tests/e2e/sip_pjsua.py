#!/usr/bin/env python3
"""SIP ⇄ XMPP interworking checks with pjsua2 (PJSIP's user agent) and slixmpp.

Run with the interpreter of ``infra/scripts/python-env.sh`` (it has slixmpp and
pjsua2-python). Like ``xmpp_messaging.py`` (whose client, login and output
helpers this reuses): one JSON line on stdout, exit 0 when the outcome is the
expected one, 1 when not, 2 on a usage error; bounded by ``--timeout``.

The SIP side is a real pjsua2 ``Account`` on a UDP or TCP transport of its
own (``--transport``), with the server as registrar and outbound proxy
(``--sip HOST:PORT``; a loose route, RFC 3261 §16.12), digest credentials for
any realm, and presence publication on. pjsua2 runs without threads of its
own: the asyncio loop polls it (``libHandleEvents``), so its callbacks and
slixmpp's run on one thread. No audio device is opened (the null device).

Commands
--------
interwork
    1. A pjsua2 account of --sip-user with a wrong password registers: the
       server must challenge it (401) and refuse the credentials (403,
       RFC 3261 §22.4).
    2. The account with --sip-password registers: 401, then 200 (digest,
       RFC 3261 §22.2).
    3. --xmpp-user logs in with slixmpp (roster, initial presence).
    4. The SIP user adds the XMPP user as a buddy and subscribes to its
       presence (``Buddy.subscribePresence``, RFC 3856): the subscription
       becomes active and the buddy is online; the XMPP user changes to
       <show>away</show> with a status text, and the buddy's NOTIFYed state
       must become the RPID activity away with that note (RFC 4480; RFC 8048
       §7 mapping).
    5. The XMPP user subscribes to the SIP user (RFC 6121 §3.1; the server's
       default policy approves) and must see it available; the SIP user
       publishes away with a note (``Account.setOnlineStatus``: PUBLISH of a
       PIDF/RPID document, RFC 3903), and the XMPP user must see
       <show>away</show> with that status.
    6. The SIP user sends a MESSAGE to the XMPP user (RFC 3428): 202, and the
       XMPP user receives the body from the SIP user's address (RFC 7572).
    7. The XMPP user sends a chat message to the SIP user's bare address: the
       pjsua2 account receives it as a MESSAGE from the XMPP user (RFC 7572
       §5).
    8. The buddy is unsubscribed (in-dialog SUBSCRIBE with Expires 0, sent
       to the server's Contact, RFC 6665 §4.2.1.4): the subscription ends
       without an error code; then the account unregisters.
      {"ok": true, "bad_password": 403, "registered": 200, "challenged": true,
       "buddy_online": true, "buddy_away": true, "xmpp_sees_sip": true,
       "xmpp_sees_publish": true, "sip_to_xmpp": 202, "sip_to_xmpp_from":
       "alice@example.com/sip-...", "xmpp_to_sip": true, "unsubscribed": ...}
    On failure "error" and "stage" name the first step that failed; "trace"
    holds the tail of pjsua2's SIP message log.

blocked
    SPEC.md §5: SIP subscriptions are authorized unless the watcher is
    blocked. The pjsua2 account of --sip-user registers and subscribes to
    the presence of --xmpp-user (slixmpp), which first clears its block list:
    the subscription is active. The XMPP user blocks the SIP user (XEP-0191
    §3.3): the subscription must end with a NOTIFY
    `terminated;reason=rejected` (RFC 6665 §4.2.2). A new SUBSCRIBE must be
    refused 403 (RFC 6665 §4.2.1.1). The XMPP user unblocks the SIP user
    (§3.4): a new SUBSCRIBE is active again.
      {"ok": true, "active": true, "terminated": {"term_reason": "rejected", ...},
       "resubscribed": {"term_code": 403, ...}, "active_again": true}
    Same options as interwork.

pjsua2-python's wheels are CPython 3.11 and 3.12 only (manylinux x86_64).

Example
-------
  python sip_pjsua.py --timeout 60 interwork --host 127.0.0.1 --port 5222 \\
      --cafile data/tls/cert.pem --sip 127.0.0.1:5060 --transport udp \\
      --sip-user alice@example.com --sip-password pa \\
      --xmpp-user carol@example.com --xmpp-password pc
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import uuid
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from xmpp_messaging import CLOSE_MARGIN, MECHANISMS, LoginError, close_all, run_cli  # noqa: E402
from xmpp_roster import RosterClient  # noqa: E402

log = logging.getLogger("sip_pjsua")

# pjsua2 is imported in main(): a missing module is reported as the outcome.
pj: Any = None


class Trace:
    """pjsua2's log: kept (the SIP messages are checked and reported) and,
    with -v, copied to stderr."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.lines: list[str] = []

    def add(self, text: str) -> None:
        self.lines.append(text)
        if self.verbose:
            sys.stderr.write(text if text.endswith("\n") else text + "\n")

    def text(self) -> str:
        return "".join(self.lines)

    def tail(self, n: int = 4000) -> str:
        return self.text()[-n:]


def make_classes(trace: Trace, changed: Callable[[], None]) -> tuple[type, type, type]:
    """The pjsua2 subclasses (SWIG directors: callbacks only record)."""

    class Writer(pj.LogWriter):
        def write(self, entry: Any) -> None:
            trace.add(entry.msg)

    class Account(pj.Account):
        def __init__(self) -> None:
            super().__init__()
            self.reg_codes: list[int] = []
            self.messages: list[dict[str, str]] = []
            self.im_status: list[tuple[str, int]] = []

        def onRegState(self, prm: Any) -> None:
            log.info("reg state %s %s", prm.code, prm.reason)
            self.reg_codes.append(int(prm.code))
            changed()

        def onInstantMessage(self, prm: Any) -> None:
            log.info("instant message from %s: %r", prm.fromUri, prm.msgBody)
            self.messages.append({"from": prm.fromUri, "body": prm.msgBody,
                                  "type": prm.contentType})
            changed()

        def onInstantMessageStatus(self, prm: Any) -> None:
            log.info("instant message status %s %s", prm.code, prm.reason)
            self.im_status.append((prm.msgBody, int(prm.code)))
            changed()

    class Buddy(pj.Buddy):
        def __init__(self) -> None:
            super().__init__()
            self.states: list[dict[str, Any]] = []

        def onBuddyState(self) -> None:
            info = self.getInfo()
            p = info.presStatus
            state = {"sub": info.subStateName, "status": int(p.status),
                     "text": p.statusText, "activity": int(p.activity), "note": p.note,
                     "term_code": int(info.subTermCode), "term_reason": info.subTermReason}
            log.info("buddy state %s", state)
            self.states.append(state)
            changed()

        def onBuddyEvSubState(self, prm: Any) -> None:
            self.onBuddyState()

    return Writer, Account, Buddy


class Sip:
    """One pjsua2 endpoint, polled from the asyncio loop."""

    def __init__(self, args: argparse.Namespace, trace: Trace) -> None:
        self.args = args
        self.trace = trace
        self.changed = asyncio.Event()
        self.Writer, self.Account, self.Buddy = make_classes(trace, self.changed.set)
        self.ep = pj.Endpoint()
        # pjlib logs its start to stdout before the writer is set: stdout
        # carries only the JSON line, so fd 1 is stderr meanwhile.
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
        try:
            self.ep.libCreate()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0  # polled: callbacks on this thread
        cfg.uaConfig.mainThreadOnly = False
        cfg.uaConfig.userAgent = "pjsua2 (switchboard e2e)"
        self.writer = self.Writer()
        cfg.logConfig.writer = self.writer
        cfg.logConfig.level = 4  # 4: every SIP message
        cfg.logConfig.consoleLevel = 4
        cfg.logConfig.msgLogging = True
        self.ep.libInit(cfg)
        tc = pj.TransportConfig()
        tc.boundAddress = "127.0.0.1"
        tc.port = 0
        kind = pj.PJSIP_TRANSPORT_TCP if args.transport == "tcp" else pj.PJSIP_TRANSPORT_UDP
        self.ep.transportCreate(kind, tc)
        self.ep.libStart()
        self.ep.audDevManager().setNullDev()
        self._pump = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            self.ep.libHandleEvents(0)
            await asyncio.sleep(0.005)

    def account(self, password: str, publish: bool) -> Any:
        host = self.args.sip
        transport = ";transport=tcp" if self.args.transport == "tcp" else ""
        cfg = pj.AccountConfig()
        cfg.idUri = f"sip:{self.args.sip_user}"
        cfg.regConfig.registrarUri = f"sip:{host}{transport}"
        cfg.regConfig.timeoutSec = 300
        cfg.regConfig.retryIntervalSec = 0  # one attempt: a refusal stays a refusal
        cfg.sipConfig.proxies.append(f"sip:{host}{transport};lr")
        local = self.args.sip_user.split("@", 1)[0]
        cfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", "*", local, 0, password))
        cfg.presConfig.publishEnabled = publish
        acc = self.Account()
        acc.create(cfg)
        return acc

    async def until(self, check: Callable[[], Any], deadline: float) -> Any:
        while True:
            value = check()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                return value
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=min(left, 0.2))
            except asyncio.TimeoutError:
                pass

    async def close(self) -> None:
        try:
            self.ep.libDestroy()
        finally:
            self._pump.cancel()


def challenged(trace: str, method: str) -> bool:
    """Whether a 401 with a digest challenge answered `method`."""
    for block in trace.split("--end msg--"):
        lines = block.splitlines()
        if any(line.startswith("SIP/2.0 401") for line in lines) \
                and any(line.startswith("CSeq:") and line.split()[-1] == method for line in lines) \
                and any(line.startswith("WWW-Authenticate: Digest") for line in lines):
            return True
    return False


async def run_interwork(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"ok": False, "transport": args.transport}
    trace = Trace(args.verbose)
    sip = Sip(args, trace)
    carol = RosterClient("xmpp", args.xmpp_user, args.xmpp_password, args)
    sip_bare, xmpp_bare = args.sip_user, args.xmpp_user
    step = lambda: min(args.deadline - CLOSE_MARGIN, time.monotonic() + args.step)  # noqa: E731
    objects: list[Any] = []

    def fail(error: str, stage: str) -> dict[str, Any]:
        result.update({"error": error, "stage": stage, "trace": trace.tail()})
        return result

    try:
        # 1. wrong password: 401, then 403.
        bad = sip.account("not " + args.sip_password, publish=False)
        objects.append(bad)
        await sip.until(lambda: any(c >= 300 for c in bad.reg_codes), step())
        result["bad_password"] = next((c for c in bad.reg_codes if c >= 300), None)
        bad.shutdown()
        if result["bad_password"] != 403:
            return fail("bad-password-not-refused", "register-bad")

        # 2. the right password: 401, then 200.
        acc = sip.account(args.sip_password, publish=True)
        objects.append(acc)
        await sip.until(lambda: acc.reg_codes, step())
        result["registered"] = acc.reg_codes[0] if acc.reg_codes else None
        result["challenged"] = challenged(trace.text(), "REGISTER")
        if result["registered"] != 200:
            return fail("not-registered", "register")
        if not result["challenged"]:
            return fail("registered-without-digest-challenge", "register")

        # 3. the XMPP user.
        try:
            await carol.start_with_roster(step())
        except LoginError as e:
            result.update(e.fields())
            return result

        # 4. SIP watches XMPP.
        buddy = sip.Buddy()
        objects.append(buddy)
        bcfg = pj.BuddyConfig()
        bcfg.uri = f"sip:{xmpp_bare}"
        bcfg.subscribe = True
        buddy.create(acc, bcfg)
        online = lambda: any(s["sub"] == "ACTIVE"  # noqa: E731
                             and s["status"] == pj.PJSUA_BUDDY_STATUS_ONLINE
                             for s in buddy.states)
        result["buddy_online"] = bool(await sip.until(online, step()))
        if not result["buddy_online"]:
            result["buddy_states"] = buddy.states[-5:]
            return fail("buddy-not-online", "subscribe")
        status = "pjsua-" + uuid.uuid4().hex[:8]
        carol.xmpp.send_presence(pshow="away", pstatus=status)
        away = lambda: any(s["status"] == pj.PJSUA_BUDDY_STATUS_ONLINE  # noqa: E731
                           and s["activity"] == pj.PJRPID_ACTIVITY_AWAY
                           and status in (s["note"], s["text"]) for s in buddy.states)
        # a NOTIFY per presentity per 5 s at most (RFC 3856 §6.10)
        result["buddy_away"] = bool(await sip.until(away, step() + 6))
        if not result["buddy_away"]:
            result["buddy_states"] = buddy.states[-5:]
            return fail("buddy-change-not-seen", "subscribe-change")

        # 5. XMPP watches SIP.
        await carol.xmpp.update_roster(sip_bare, timeout=max(1.0, step() - time.monotonic()))
        carol.xmpp.send_presence_subscription(pto=sip_bare, ptype="subscribe")
        result["xmpp_sees_sip"] = await carol.until(
            lambda: carol.saw(sip_bare, "available"), step())
        if not result["xmpp_sees_sip"]:
            result["xmpp_presences"] = carol.presences[-8:]
            return fail("sip-user-not-seen", "xmpp-subscribe")
        note = "pjsua-note-" + uuid.uuid4().hex[:8]
        ps = pj.PresenceStatus()
        ps.status = pj.PJSUA_BUDDY_STATUS_ONLINE
        ps.activity = pj.PJRPID_ACTIVITY_AWAY
        ps.note = note
        acc.setOnlineStatus(ps)
        result["xmpp_sees_publish"] = await carol.until(
            lambda: carol.saw(sip_bare, "available", show="away", status=note), step())
        if not result["xmpp_sees_publish"]:
            result["xmpp_presences"] = carol.presences[-8:]
            return fail("publication-not-seen", "publish")

        # 6. SIP → XMPP.
        text = "pjsua-to-xmpp-" + uuid.uuid4().hex[:8]
        prm = pj.SendInstantMessageParam()
        prm.content = text
        buddy.sendInstantMessage(prm)
        status_of = lambda: next((c for b, c in acc.im_status if b == text), None)  # noqa: E731
        result["sip_to_xmpp"] = await sip.until(status_of, step())
        if result["sip_to_xmpp"] != 202:
            return fail("message-not-accepted", "sip-to-xmpp")
        got = await carol.wait_for(lambda m: m["body"] == text, step())
        result["sip_to_xmpp_from"] = got["from"] if got else None
        if not got:
            return fail("message-not-received-by-xmpp", "sip-to-xmpp")
        if not (got["from"] or "").startswith(sip_bare + "/"):
            return fail("message-from-wrong-address", "sip-to-xmpp")

        # 7. XMPP → SIP.
        text = "xmpp-to-pjsua-" + uuid.uuid4().hex[:8]
        carol.send_chat(sip_bare, text, "m-" + uuid.uuid4().hex[:8])
        got = await sip.until(lambda: next((m for m in acc.messages if m["body"] == text),
                                           None), step())
        result["xmpp_to_sip"] = bool(got)
        result["xmpp_to_sip_from"] = got["from"] if got else None
        if not got:
            result["sip_messages"] = acc.messages[-5:]
            return fail("message-not-received-by-sip", "xmpp-to-sip")
        if xmpp_bare not in got["from"]:
            return fail("message-from-wrong-address", "xmpp-to-sip")

        # 8. unsubscribe in the dialog, then unregister.
        buddy.subscribePresence(False)
        ended = lambda: next((s for s in buddy.states if s["sub"] == "TERMINATED"), None)  # noqa: E731
        end = await sip.until(ended, step())
        result["unsubscribed"] = end
        if not end:
            return fail("unsubscribe-not-ended", "unsubscribe")
        if end["term_code"] >= 300:
            return fail("unsubscribe-refused", "unsubscribe")
        codes = len(acc.reg_codes)
        acc.setRegistration(False)
        await sip.until(lambda: len(acc.reg_codes) > codes, step())
        result["unregistered"] = acc.reg_codes[codes] if len(acc.reg_codes) > codes else None
        if result["unregistered"] != 200:
            return fail("unregister-failed", "unregister")
        result["ok"] = True
        return result
    finally:
        await close_all([carol])
        del objects
        await sip.close()


async def run_blocked(args: argparse.Namespace) -> dict[str, Any]:
    import slixmpp

    result: dict[str, Any] = {"ok": False, "transport": args.transport}
    trace = Trace(args.verbose)
    sip = Sip(args, trace)
    owner = RosterClient("xmpp", args.xmpp_user, args.xmpp_password, args)
    owner.xmpp.register_plugin("xep_0191")
    step = lambda: min(args.deadline - CLOSE_MARGIN, time.monotonic() + args.step)  # noqa: E731
    left = lambda: max(1.0, step() - time.monotonic())  # noqa: E731
    objects: list[Any] = []

    def fail(error: str, stage: str) -> dict[str, Any]:
        result.update({"error": error, "stage": stage, "trace": trace.tail()})
        return result

    try:
        acc = sip.account(args.sip_password, publish=False)
        objects.append(acc)
        await sip.until(lambda: acc.reg_codes, step())
        if (acc.reg_codes or [None])[0] != 200:
            return fail("not-registered", "register")
        try:
            await owner.start_with_roster(step())
        except LoginError as e:
            result.update(e.fields())
            return result
        # Nothing blocked yet (an earlier run may have left the list).
        unblock_all = owner.xmpp.make_iq_set()
        unblock_all.enable("unblock")
        await unblock_all.send(timeout=left())

        buddy = sip.Buddy()
        objects.append(buddy)
        bcfg = pj.BuddyConfig()
        bcfg.uri = f"sip:{args.xmpp_user}"
        bcfg.subscribe = True
        buddy.create(acc, bcfg)
        active = lambda: any(s["sub"] == "ACTIVE" for s in buddy.states)  # noqa: E731
        ended = lambda: next((s for s in buddy.states if s["sub"] == "TERMINATED"), None)  # noqa: E731
        result["active"] = bool(await sip.until(active, step()))
        if not result["active"]:
            return fail("subscription-not-active", "subscribe")

        # XEP-0191 §3.3 from the XMPP side: the SIP watcher is blocked.
        buddy.states.clear()
        await owner.xmpp.plugin["xep_0191"].block(args.sip_user, timeout=left())
        end = await sip.until(ended, step())
        result["terminated"] = end
        if not end or end["term_reason"] != "rejected":
            return fail("subscription-not-rejected", "block")

        # A new SUBSCRIBE from the blocked watcher: 403.
        buddy.states.clear()
        buddy.subscribePresence(False)
        buddy.subscribePresence(True)
        refused = lambda: next((s for s in buddy.states  # noqa: E731
                                if s["sub"] == "TERMINATED" and s["term_code"] >= 400), None)
        end = await sip.until(refused, step())
        result["resubscribed"] = end
        if not end or end["term_code"] != 403:
            return fail("blocked-subscribe-not-refused", "resubscribe")

        # Unblocked, the watcher is authorized again.
        await owner.xmpp.plugin["xep_0191"].unblock(args.sip_user, timeout=left())
        await asyncio.sleep(1.0)  # the block lists follow the roster topic
        buddy.states.clear()
        buddy.subscribePresence(False)
        buddy.subscribePresence(True)
        result["active_again"] = bool(await sip.until(active, step()))
        if not result["active_again"]:
            result["buddy_states"] = buddy.states[-5:]
            return fail("unblocked-subscribe-not-active", "unblock")
        buddy.subscribePresence(False)
        await sip.until(ended, step())
        result["ok"] = True
        return result
    except (slixmpp.exceptions.IqError, slixmpp.exceptions.IqTimeout) as e:
        return fail("iq-failed", type(e).__name__)
    finally:
        await close_all([owner])
        del objects
        await sip.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    iw = sub.add_parser("interwork")
    iw.add_argument("--host", default="127.0.0.1")
    iw.add_argument("--port", type=int, required=True, help="XMPP c2s port")
    iw.add_argument("--cafile", required=True)
    iw.add_argument("--mechanism", choices=MECHANISMS, default="SCRAM-SHA-256")
    iw.add_argument("--timeout", type=float, default=argparse.SUPPRESS)
    iw.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    iw.add_argument("--sip", required=True, metavar="HOST:PORT", help="the server's SIP address")
    iw.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    iw.add_argument("--sip-user", required=True, metavar="ADDRESS")
    iw.add_argument("--sip-password", required=True)
    iw.add_argument("--xmpp-user", required=True, metavar="JID")
    iw.add_argument("--xmpp-password", required=True)
    iw.add_argument("--step", type=float, default=10.0, help="seconds allowed per step")
    bl = sub.add_parser("blocked")
    for action in iw._actions[1:]:
        bl._add_action(action)
    return parser


def main(argv: list[str] | None = None) -> int:
    global pj
    try:
        import pjsua2
    except ImportError as e:
        print(json.dumps({"ok": False, "error": "pjsua2-missing", "detail": str(e)}))
        return 1
    pj = pjsua2
    return run_cli(build_parser(), {"interwork": run_interwork, "blocked": run_blocked}, argv)


if __name__ == "__main__":
    sys.exit(main())
