#!/usr/bin/env python3
"""Roster, subscription and presence checks for Switchboard's end-to-end tests.

Run with the interpreter of ``infra/scripts/python-env.sh`` (it has slixmpp).
Like ``xmpp_messaging.py`` (whose client, login and output helpers this
reuses): one JSON line on stdout, exit 0 when the outcome is the expected one,
1 when not, 2 on a usage error; bounded by ``--timeout``.

Commands
--------
handshake
    Logs in --a and --b (each fetches its roster, RFC 6121 §2.1.3, then sends
    initial presence). A adds B with a roster set (name "Buddy", group
    "Team", §2.3), then sends <presence type='subscribe'/> to B (§3.1). With
    the server's default policy (auto-authorize, reciprocal add) both rosters
    must end with the other as subscription='both'. Then each must see the
    other available; B changes to <show>away</show> with a status text and A
    must see that change; finally A leaves and B must see A unavailable.
      {"ok": true, "a_item": {"subscription": "both", "name": "Buddy",
       "groups": ["Team"]}, "b_item": {"subscription": "both", ...},
       "a_sees_b": true, "b_sees_a": true, "a_sees_b_away": true,
       "b_sees_a_leave": true}
    On failure "error" names the first step that failed ("stage").

extras
    Logs in --a and --b (with the subscription of ``handshake`` in place).
    vcard-temp (XEP-0054): A publishes a vCard with FN "Alice <test>"; A and B
    each fetch A's vCard and must get that FN; a fetch of a user who never
    set one gives an empty vCard. Blocking (XEP-0191): A blocks B; A's block
    list is then exactly [B] and B sees A unavailable; A unblocks everything;
    the list is empty and B sees A available again.
      {"ok": true, "vcard_self": "Alice <test>", "vcard_other": "Alice <test>",
       "vcard_empty": true, "blocklist": ["bob@example.com"],
       "b_sees_block": true, "blocklist_after": [], "b_sees_unblock": true}

directed
    Logs in --a and --b (no subscription between them). A sends directed
    presence (RFC 6121 §4.6) with a status to B's bare JID; B must get it
    from A's full JID; then A disconnects and B must get unavailable from A's
    full JID (§4.6.3). A directed presence to another domain is answered
    remote-server-not-found.
      {"ok": true, "b_got_directed": true, "b_got_unavailable": true,
       "remote": "remote-server-not-found"}

carbons
    Logs in --a twice (two resources, both enabling XEP-0280 carbons) and
    --b. B sends a chat message to A's first resource: it arrives there, and
    the second resource gets a <received/> carbon of it (§6.1). Then A's
    second resource sends a chat message to B's bare JID: B gets it and A's
    first resource gets a <sent/> carbon (§6.2).
      {"ok": true, "direct": true, "received_carbon": true, "sent_carbon": true}

roster
    Logs in --a, fetches the roster and prints its items:
      {"ok": true, "items": {"bob@example.com": {"subscription": "both",
       "name": "Buddy", "groups": ["Team"], "ask": null}}, "version": "..."}
    With --remove JID, removes that item afterwards (§2.5) and reports
    "removed" (a roster push removed the item, RFC 6121 §2.5.2) and
    "remove_error" (the condition of an error answer, if any).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from xmpp_messaging import (  # noqa: E402 - after the path set-up
    CLOSE_MARGIN, MECHANISMS, Client, LoginError, close_all, run_cli, start_all)

log = logging.getLogger("xmpp_roster")


class RosterClient(Client):
    """A client that also records every presence stanza it gets."""

    def __init__(self, who: str, jid: str, password: str, args: argparse.Namespace) -> None:
        super().__init__(who, jid, password, args)
        self.presences: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        # The server answers subscriptions by policy; the client must not.
        self.xmpp.auto_authorize = None
        self.xmpp.auto_subscribe = False
        self.xmpp.add_event_handler("presence", self._on_presence)
        self.removed: set[str] = set()
        self.xmpp.add_event_handler("roster_update", self._on_roster_update)

    def _on_roster_update(self, iq: Any) -> None:
        for jid, item in iq["roster"]["items"].items():
            if item["subscription"] == "remove":
                self.removed.add(str(jid))
        self.changed.set()

    def _on_presence(self, pres: Any) -> None:
        seen = {"from": str(pres["from"]), "type": pres["type"],
                "show": pres["show"] or None, "status": pres["status"] or None}
        log.info("%s got presence %s", self.who, seen)
        self.presences.append(seen)
        self.changed.set()

    async def start_with_roster(self, deadline: float) -> None:
        """Logs in, fetches the roster, then sends initial presence and
        pings the server."""
        send_presence = self.xmpp.send_presence
        self.xmpp.send_presence = lambda *a, **k: None  # held until the roster is in
        try:
            await super().start(deadline)
        finally:
            self.xmpp.send_presence = send_presence
        await self.xmpp.get_roster(timeout=max(1.0, deadline - time.monotonic()))
        self.xmpp.send_presence()
        # A round trip after it: the server has stored the initial presence
        # (stanzas of a stream are handled in order) before anyone counts
        # on this client being available (RFC 6121 §8.5.2.2.1: presence to
        # a user without available resources is ignored).
        await self.xmpp.plugin["xep_0199"].ping(
            jid=self.xmpp.boundjid.domain, timeout=max(1.0, deadline - time.monotonic()))

    def item(self, jid: str) -> dict[str, Any] | None:
        roster = self.xmpp.client_roster
        if jid not in roster.keys():
            return None
        entry = roster[jid]
        if entry["subscription"] == "remove":
            return None
        return {"subscription": entry["subscription"], "name": entry["name"] or None,
                "groups": sorted(entry["groups"]), "ask": entry["pending_out"] or None}

    async def until(self, check: Callable[[], Any], deadline: float) -> Any:
        """Waits until `check()` is truthy (re-checked on every change)."""
        while True:
            value = check()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                return value
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=min(left, 0.5))
            except asyncio.TimeoutError:
                pass

    def saw(self, bare: str, kind: str, show: str | None = None,
            status: str | None = None) -> bool:
        for p in self.presences:
            if p["from"].split("/")[0] != bare:
                continue
            if kind == "unavailable" and p["type"] == "unavailable":
                return True
            if kind == "available" and p["type"] in ("available", "chat", "away", "xa", "dnd", "") \
                    and (show is None or p["show"] == show) \
                    and (status is None or p["status"] == status):
                return True
        return False


async def run_handshake(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"ok": False}
    a = RosterClient("a", args.a, args.a_password, args)
    b = RosterClient("b", args.b, args.b_password, args)
    a_bare, b_bare = args.a, args.b
    step_deadline = lambda: min(args.deadline - CLOSE_MARGIN, time.monotonic() + args.step)  # noqa: E731
    try:
        if not await start_all([a, b], result, args.deadline - CLOSE_MARGIN - 2,
                               RosterClient.start_with_roster):
            return result
        result.update({"a_jid": a.jid, "b_jid": b.jid})

        await a.xmpp.update_roster(b_bare, name="Buddy", groups=["Team"],
                                   timeout=max(1.0, step_deadline() - time.monotonic()))
        a.xmpp.send_presence_subscription(pto=b_bare, ptype="subscribe")

        both = lambda c, jid: (c.item(jid) or {}).get("subscription") == "both"  # noqa: E731
        await a.until(lambda: both(a, b_bare), step_deadline())
        await b.until(lambda: both(b, a_bare), step_deadline())
        result["a_item"], result["b_item"] = a.item(b_bare), b.item(a_bare)
        if not (both(a, b_bare) and both(b, a_bare)):
            result.update({"error": "no-mutual-subscription", "stage": "handshake"})
            return result
        if result["a_item"]["name"] != "Buddy" or result["a_item"]["groups"] != ["Team"]:
            result.update({"error": "item-lost-name-or-group", "stage": "handshake"})
            return result

        result["a_sees_b"] = await a.until(lambda: a.saw(b_bare, "available"), step_deadline())
        result["b_sees_a"] = await b.until(lambda: b.saw(a_bare, "available"), step_deadline())
        if not (result["a_sees_b"] and result["b_sees_a"]):
            result.update({"error": "presence-not-seen", "stage": "initial-presence"})
            return result

        b.xmpp.send_presence(pshow="away", pstatus="in a meeting")
        result["a_sees_b_away"] = await a.until(
            lambda: a.saw(b_bare, "available", show="away", status="in a meeting"),
            step_deadline())
        if not result["a_sees_b_away"]:
            result.update({"error": "presence-change-not-seen", "stage": "change"})
            return result

        await a.close()
        result["b_sees_a_leave"] = await b.until(lambda: b.saw(a_bare, "unavailable"),
                                                 step_deadline())
        if not result["b_sees_a_leave"]:
            result.update({"error": "unavailable-not-seen", "stage": "leave"})
            return result
        result["ok"] = True
        return result
    finally:
        result["a_presences"] = a.presences[-10:]
        result["b_presences"] = b.presences[-10:]
        await close_all([a, b])


async def run_extras(args: argparse.Namespace) -> dict[str, Any]:
    import slixmpp

    result: dict[str, Any] = {"ok": False}
    a = RosterClient("a", args.a, args.a_password, args)
    b = RosterClient("b", args.b, args.b_password, args)
    for c in (a, b):
        c.xmpp.register_plugin("xep_0054")
        c.xmpp.register_plugin("xep_0191")
    step = lambda: max(1.0, min(args.deadline - CLOSE_MARGIN, time.monotonic() + args.step)  # noqa: E731
                       - time.monotonic())
    fn_of = lambda iq: iq["vcard_temp"]["FN"] or None  # noqa: E731
    try:
        if not await start_all([a, b], result, args.deadline - CLOSE_MARGIN - 2,
                               RosterClient.start_with_roster):
            return result
        vcard = a.xmpp.plugin["xep_0054"].make_vcard()
        vcard["FN"] = "Alice <test>"
        await a.xmpp.plugin["xep_0054"].publish_vcard(vcard, timeout=step())
        result["vcard_self"] = fn_of(await a.xmpp.plugin["xep_0054"].get_vcard(
            args.a, cached=False, local=False, timeout=step()))
        result["vcard_other"] = fn_of(await b.xmpp.plugin["xep_0054"].get_vcard(
            args.a, cached=False, local=False, timeout=step()))
        empty = await a.xmpp.plugin["xep_0054"].get_vcard(
            args.nobody, cached=False, local=False, timeout=step())
        result["vcard_empty"] = fn_of(empty) is None
        if result["vcard_self"] != "Alice <test>" or result["vcard_other"] != "Alice <test>" \
                or not result["vcard_empty"]:
            result.update({"error": "vcard-mismatch", "stage": "vcard"})
            return result

        await b.until(lambda: b.saw(args.a, "available"), time.monotonic() + step())
        b.presences.clear()
        await a.xmpp.plugin["xep_0191"].block(args.b, timeout=step())
        listed = await a.xmpp.plugin["xep_0191"].get_blocked_jids(timeout=step())
        result["blocklist"] = sorted(str(j) for j in listed)
        result["b_sees_block"] = await b.until(lambda: b.saw(args.a, "unavailable"),
                                               time.monotonic() + step())
        b.presences.clear()
        # XEP-0191 §3.5: an empty <unblock/> unblocks everything.
        everything = a.xmpp.make_iq_set()
        everything.enable("unblock")
        await everything.send(timeout=step())
        listed = await a.xmpp.plugin["xep_0191"].get_blocked_jids(timeout=step())
        result["blocklist_after"] = sorted(str(j) for j in listed)
        result["b_sees_unblock"] = await b.until(lambda: b.saw(args.a, "available"),
                                                 time.monotonic() + step())
        result["ok"] = (result["blocklist"] == [args.b] and result["b_sees_block"]
                        and result["blocklist_after"] == [] and result["b_sees_unblock"])
        if not result["ok"]:
            result.update({"error": "blocking-mismatch", "stage": "blocking"})
        return result
    except slixmpp.exceptions.IqError as e:
        result.update({"error": "iq-error:" + (e.iq["error"]["condition"] or "unknown"),
                       "stage": "iq"})
        return result
    except slixmpp.exceptions.IqTimeout:
        result.update({"error": "iq-timeout", "stage": "iq"})
        return result
    finally:
        result["b_presences"] = b.presences[-10:]
        await close_all([a, b])


async def run_directed(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"ok": False}
    a = RosterClient("a", args.a, args.a_password, args)
    b = RosterClient("b", args.b, args.b_password, args)
    errors: list[str] = []
    a.xmpp.add_event_handler(
        "presence_error", lambda p: errors.append(p["error"]["condition"] or "unknown"))
    try:
        if not await start_all([a, b], result, args.deadline - CLOSE_MARGIN - 2,
                               RosterClient.start_with_roster):
            return result
        a_full = a.jid
        a.xmpp.send_presence(pto=args.b, pstatus="directed hello")
        got = lambda kind, status=None: any(  # noqa: E731
            p["from"] == a_full and (p["type"] == "unavailable") == (kind == "unavailable")
            and (status is None or p["status"] == status) for p in b.presences)
        result["b_got_directed"] = bool(await b.until(
            lambda: got("available", "directed hello"), time.monotonic() + args.step))
        a.xmpp.send_presence(pto="someone@elsewhere.example")
        await a.until(lambda: errors, time.monotonic() + args.step)
        result["remote"] = errors[0] if errors else None
        await a.close()
        result["b_got_unavailable"] = bool(await b.until(
            lambda: got("unavailable"), time.monotonic() + args.step))
        result["ok"] = (result["b_got_directed"] and result["b_got_unavailable"]
                        and result["remote"] == "remote-server-not-found")
        if not result["ok"]:
            result.update({"error": "directed-presence", "stage": "directed"})
        return result
    finally:
        result["b_presences"] = b.presences[-10:]
        await close_all([a, b])


async def run_carbons(args: argparse.Namespace) -> dict[str, Any]:
    import uuid

    result: dict[str, Any] = {"ok": False}
    a1 = RosterClient("a1", args.a, args.a_password, args)
    a2 = RosterClient("a2", args.a, args.a_password, args)
    b = RosterClient("b", args.b, args.b_password, args)
    copies: dict[str, list[dict[str, str]]] = {"a1": [], "a2": []}

    def recorder(who: str, direction: str, client: RosterClient) -> Callable[[Any], None]:
        def record(msg: Any) -> None:
            inner = msg[f"carbon_{direction}"]
            copies[who].append({"direction": direction, "body": inner["body"],
                                "from": str(inner["from"]), "to": str(inner["to"])})
            client.changed.set()
        return record

    for who, c in (("a1", a1), ("a2", a2)):
        c.xmpp.register_plugin("xep_0280")
        c.xmpp.add_event_handler("carbon_received", recorder(who, "received", c))
        c.xmpp.add_event_handler("carbon_sent", recorder(who, "sent", c))
    try:
        if not await start_all([a1, a2, b], result, args.deadline - CLOSE_MARGIN - 2):
            return result
        for c in (a1, a2):
            await c.xmpp.plugin["xep_0280"].enable(timeout=args.step)
        token = uuid.uuid4().hex[:12]
        body1, body2 = f"to a1 {token}", f"from a2 {token}"
        b.send_chat(a1.jid, body1, f"c1-{token}")
        deadline = time.monotonic() + args.step
        result["direct"] = await a1.wait_for(lambda m: m["body"] == body1, deadline) is not None
        result["received_carbon"] = bool(await a2.until(
            lambda: any(c["body"] == body1 and c["direction"] == "received"
                        and c["from"] == b.jid for c in copies["a2"]), deadline))
        a2.send_chat(args.b, body2, f"c2-{token}")
        deadline = time.monotonic() + args.step
        result["b_got"] = await b.wait_for(lambda m: m["body"] == body2, deadline) is not None
        result["sent_carbon"] = bool(await a1.until(
            lambda: any(c["body"] == body2 and c["direction"] == "sent"
                        for c in copies["a1"]), deadline))
        result["a1_copies"], result["a2_copies"] = copies["a1"], copies["a2"]
        result["ok"] = all(result[k] for k in ("direct", "received_carbon", "b_got", "sent_carbon"))
        if not result["ok"]:
            result.update({"error": "carbons", "stage": "carbons"})
        return result
    finally:
        await close_all([a1, a2, b])


async def run_roster(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"ok": False}
    a = RosterClient("a", args.a, args.a_password, args)
    try:
        await a.start_with_roster(args.deadline - CLOSE_MARGIN - 2)
        items = {jid: a.item(jid) for jid in a.xmpp.client_roster.keys()}
        result["items"] = {k: v for k, v in items.items() if v is not None}
        result["version"] = a.xmpp.client_roster.version or None
        if args.remove:
            import slixmpp

            try:
                await a.xmpp.del_roster_item(args.remove)
            except slixmpp.exceptions.IqError as e:
                result["remove_error"] = e.iq["error"]["condition"] or "unknown"
            # A push with subscription='remove' (§2.5.2); the item may come
            # back as 'none' when the contact's unavailable presence follows.
            result["removed"] = bool(await a.until(lambda: args.remove in a.removed,
                                                   args.deadline - CLOSE_MARGIN))
        result["ok"] = True
        return result
    except LoginError as e:
        result.update(e.fields())
        return result
    finally:
        await close_all([a])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--cafile", required=True)
        p.add_argument("--mechanism", choices=MECHANISMS, default="SCRAM-SHA-256")
        p.add_argument("--timeout", type=float, default=argparse.SUPPRESS)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
        p.add_argument("--a", required=True, metavar="JID")
        p.add_argument("--a-password", required=True)

    hs = sub.add_parser("handshake")
    common(hs)
    hs.add_argument("--b", required=True, metavar="JID")
    hs.add_argument("--b-password", required=True)
    hs.add_argument("--step", type=float, default=8.0, help="seconds allowed per step")
    ex = sub.add_parser("extras")
    common(ex)
    ex.add_argument("--b", required=True, metavar="JID")
    ex.add_argument("--b-password", required=True)
    ex.add_argument("--nobody", default="nobody@example.com", metavar="JID")
    ex.add_argument("--step", type=float, default=8.0, help="seconds allowed per step")
    di = sub.add_parser("directed")
    common(di)
    di.add_argument("--b", required=True, metavar="JID")
    di.add_argument("--b-password", required=True)
    di.add_argument("--step", type=float, default=8.0, help="seconds allowed per step")
    ca = sub.add_parser("carbons")
    common(ca)
    ca.add_argument("--b", required=True, metavar="JID")
    ca.add_argument("--b-password", required=True)
    ca.add_argument("--step", type=float, default=8.0, help="seconds allowed per step")
    ro = sub.add_parser("roster")
    common(ro)
    ro.add_argument("--remove", metavar="JID")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), {"handshake": run_handshake, "extras": run_extras,
                                    "directed": run_directed, "carbons": run_carbons,
                                    "roster": run_roster}, argv)


if __name__ == "__main__":
    sys.exit(main())
