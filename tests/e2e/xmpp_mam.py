#!/usr/bin/env python3
"""Message archive management (XEP-0313) checks for Switchboard's end-to-end tests.

Run with the interpreter of ``infra/scripts/python-env.sh`` (it has slixmpp).
Like ``xmpp_roster.py`` (reusing the client, login and output helpers of
``xmpp_messaging.py``): one JSON line on stdout, exit 0 when the outcome is
the expected one, 1 when not, 2 on a usage error; bounded by ``--timeout``.

Commands
--------
archive
    Logs in --a, --b (as the resource "phone") and --c. A sends --count chat
    messages as fast as the stream takes them: the first 60% to B (every
    third to B's full JID B/phone, the others to B's bare JID), then, after
    the archive has all of those and a pause around the instant ``t_mid``,
    the rest to C. A waits until its archive counts them all (queries with
    RSM max 0, XEP-0059 §2.6), then, each check against what it sent:

    * ``paged``: slixmpp's xep_0313 iterator pages through the archive 100
      at a time (RSM ``after`` = the page's ``last``) and gets every message
      in order, each result with the query id, an archive id and a XEP-0203
      delay, forwarded with A's full JID as sender; ``reverse``: backwards
      from the last page (``<before/>``), 250 at a time, newest first;
    * ``with_bare`` (B: the first 60%), ``with_full`` (B/phone only) and
      ``with_c`` filters; ``after_t_mid`` / ``before_t_mid`` (form fields
      ``start`` / ``end``) split at ``t_mid`` exactly between the phases;
    * ``between_ids``: form fields ``after-id`` = the 11th result's id and
      ``before-id`` = the 21st's give the 12th to 20th, RSM count 9;
    * ``flip``: the last page of 3 with ``<flip-page/>``: newest first;
    * errors: an unknown RSM ``after`` id → item-not-found; B's archive →
      forbidden; an unknown form field or a ``start`` that is no XEP-0082
      date-time → bad-request; RSM ``index`` → feature-not-implemented;
    * ``capped_page``: RSM max 1000 gets the server's largest page (250);
    * ``fields``: the form of a ``get`` (§5.1); ``disco``: the server
      advertises urn:xmpp:mam:2.

      {"ok": true, "count": 1000, "paged": true, "pages": 10, "reverse": true,
       "with_bare": 600, "with_full": 200, "with_c": 400, "after_t_mid": true,
       "before_t_mid": true, "between_ids": [11, ..., 19], "flip": [999, 998, 997],
       "unknown_after": "item-not-found", "other_archive": "forbidden",
       "unknown_field": "bad-request", "index": "feature-not-implemented",
       "bad_start": "bad-request", "capped_page": 250, "fields": [...],
       "disco": true}
    "ok" is true when the client ran to the end; the test checks each field.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import sys
import time
from typing import Any
from xml.etree import ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from xmpp_messaging import (  # noqa: E402 - after the path set-up
    CLOSE_MARGIN, MECHANISMS, Client, LoginError, close_all, run_cli, start_all)

log = logging.getLogger("xmpp_mam")

NS_MAM = "urn:xmpp:mam:2"


class MamClient(Client):
    """A client with the xep_0313 plugin that files every archive result by
    query id."""

    def __init__(self, who: str, jid: str, password: str, args: argparse.Namespace) -> None:
        super().__init__(who, jid, password, args)
        from slixmpp.xmlstream.handler import Callback
        from slixmpp.xmlstream.matcher import StanzaPath

        self.xmpp.register_plugin("xep_0030")
        self.xmpp.register_plugin("xep_0313")
        self.results: dict[str, list[Any]] = {}
        self.xmpp.register_handler(Callback(
            "mam results", StanzaPath("message/mam_result"), self._on_result))

    def _on_message(self, msg: Any) -> None:
        # Archive results are filed by query id, not recorded as messages.
        if msg.xml.find(f"{{{NS_MAM}}}result") is None:
            super()._on_message(msg)

    def _on_result(self, msg: Any) -> None:
        self.results.setdefault(msg["mam_result"]["queryid"], []).append(msg)

    async def query(self, *, to: str | None = None, with_jid: str | None = None,
                    start: dt.datetime | None = None, end: dt.datetime | None = None,
                    after_id: str | None = None, before_id: str | None = None,
                    rsm: dict[str, str] | None = None, flip: bool = False,
                    field: tuple[str, str] | None = None, index: bool = False,
                    timeout: float = 15.0) -> tuple[list[Any], Any] | str:
        """One archive query: (results, the fin iq), or the error condition."""
        import slixmpp

        iq = self.xmpp.make_iq_set(ito=to)
        qid = iq["id"]
        iq["mam"]["queryid"] = qid
        if start is not None:
            iq["mam"]["start"] = start
        if end is not None:
            iq["mam"]["end"] = end
        if with_jid is not None:
            iq["mam"]["with"] = with_jid
        if after_id is not None:
            iq["mam"]["after_id"] = after_id
        if before_id is not None:
            iq["mam"]["before_id"] = before_id
        if field is not None:
            iq["mam"].set_custom_field(*field)
        for key, value in (rsm or {}).items():
            iq["mam"]["rsm"][key] = value
        if index:
            iq["mam"]["rsm"]["first_index"] = "0"
            # slixmpp puts the index on <first/>; a request names <index/>.
            rsm_set = iq["mam"]["rsm"].xml
            rsm_set.remove(rsm_set.find("{http://jabber.org/protocol/rsm}first"))
            ET.SubElement(rsm_set, "{http://jabber.org/protocol/rsm}index").text = "5"
        if flip:
            ET.SubElement(iq["mam"].xml, f"{{{NS_MAM}}}flip-page")
        try:
            fin = await iq.send(timeout=timeout)
        except slixmpp.exceptions.IqError as e:
            return e.iq["error"]["condition"] or "unknown"
        except slixmpp.exceptions.IqTimeout:
            return "timeout"
        return self.results.pop(qid, []), fin

    async def count(self) -> int:
        """The archive's size (RSM max 0: the count only)."""
        answer = await self.query(rsm={"max": "0"})
        if isinstance(answer, str):
            raise RuntimeError(f"count query failed: {answer}")
        return int(answer[1]["mam_fin"]["rsm"]["count"] or -1)

    async def wait_count(self, expected: int, deadline: float) -> int:
        n = -1
        while time.monotonic() < deadline:
            n = await self.count()
            if n >= expected:
                return n
            await asyncio.sleep(0.5)
        return n


def body(result: Any) -> str:
    return str(result["mam_result"]["forwarded"]["stanza"]["body"])


def number(result: Any) -> int:
    return int(body(result).rsplit("-", 1)[1])


def numbers(results: list[Any]) -> list[int]:
    return [number(r) for r in results]


async def run_archive(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"ok": False}
    a = MamClient("a", args.a, args.a_password, args)
    b = MamClient("b", args.b + "/phone", args.b_password, args)
    c = MamClient("c", args.c, args.c_password, args)
    clients = [a, b, c]
    end_by = args.deadline - CLOSE_MARGIN - 1
    try:
        if not await start_all(clients, result, end_by):
            return result
        n = args.count
        split = n * 6 // 10
        tag = f"mam{int(time.time() * 1000) % 1_000_000}"
        targets = []
        for i in range(n):
            if i < split:
                targets.append(f"{args.b}/phone" if i % 3 == 0 else args.b)
            else:
                targets.append(args.c)
        result["stage"] = "send"
        for i in range(split):
            a.xmpp.send_message(mto=targets[i], mbody=f"{tag}-{i}", mtype="chat")
        got = await a.wait_count(split, end_by)
        if got < split:
            result.update(error="archive-incomplete", archived=got)
            return result
        await asyncio.sleep(0.5)
        t_mid = dt.datetime.now(dt.timezone.utc)
        await asyncio.sleep(0.5)
        for i in range(split, n):
            a.xmpp.send_message(mto=targets[i], mbody=f"{tag}-{i}", mtype="chat")
        result["stage"] = "archive"
        result["count"] = await a.wait_count(n, end_by)
        if result["count"] < n:
            result["error"] = "archive-incomplete"
            return result

        # The plugin's own paging, forwards then backwards.
        result["stage"] = "page"
        forward, ids, pages = [], [], 0
        well_formed = True
        async for page in _pages(a, 100):
            pages += 1
            for r in page:
                forward.append(r)
                ids.append(r["mam_result"]["id"])
                fwd = r["mam_result"]["forwarded"]
                well_formed &= bool(r["mam_result"]["queryid"]) and bool(fwd["delay"]["stamp"]) \
                    and str(fwd["stanza"]["from"]) == a.jid
        result["pages"] = pages
        result["paged"] = well_formed and numbers(forward) == list(range(n)) \
            and len(set(ids)) == n
        plugin = [number(m) async for m in a.xmpp["xep_0313"].iterate(rsm={"max": 100})]
        result["plugin_paged"] = plugin == list(range(n))
        backward = [number(m) async for m in
                    a.xmpp["xep_0313"].iterate(reverse=True, rsm={"max": 250})]
        result["reverse"] = backward == list(reversed(range(n)))

        result["stage"] = "filters"
        expect = {
            "with_bare": [i for i in range(split)],
            "with_full": [i for i in range(split) if i % 3 == 0],
            "with_c": list(range(split, n)),
        }
        for key, jid in (("with_bare", args.b), ("with_full", f"{args.b}/phone"),
                         ("with_c", args.c)):
            got_numbers = [number(m) async for m in
                           a.xmpp["xep_0313"].iterate(with_jid=jid, rsm={"max": 250})]
            result[key] = len(got_numbers) if got_numbers == expect[key] else \
                f"wrong: {got_numbers[:5]}... ({len(got_numbers)})"
        after = [number(m) async for m in
                 a.xmpp["xep_0313"].iterate(start=t_mid, rsm={"max": 250})]
        result["after_t_mid"] = after == list(range(split, n))
        before = [number(m) async for m in
                  a.xmpp["xep_0313"].iterate(end=t_mid, rsm={"max": 250})]
        result["before_t_mid"] = before == list(range(split))

        answer = await a.query(after_id=ids[10], before_id=ids[20])
        if isinstance(answer, str):
            result["between_ids"] = answer
        else:
            result["between_ids"] = numbers(answer[0])
            result["between_count"] = int(answer[1]["mam_fin"]["rsm"]["count"] or -1)
        answer = await a.query(rsm={"max": "3", "before": True}, flip=True)
        result["flip"] = answer if isinstance(answer, str) else numbers(answer[0])

        result["stage"] = "errors"
        answer = await a.query(rsm={"after": "no-such-id"})
        result["unknown_after"] = answer if isinstance(answer, str) else "answered"
        answer = await a.query(to=args.b)
        result["other_archive"] = answer if isinstance(answer, str) else "answered"
        answer = await a.query(field=("color", "blue"))
        result["unknown_field"] = answer if isinstance(answer, str) else "answered"
        answer = await a.query(rsm={"max": "5"}, index=True)
        result["index"] = answer if isinstance(answer, str) else "answered"
        answer = await a.query(field=("start", "yesterday"))
        result["bad_start"] = answer if isinstance(answer, str) else "answered"
        answer = await a.query(rsm={"max": "1000"})
        result["capped_page"] = answer if isinstance(answer, str) else len(answer[0])

        result["stage"] = "discovery"
        form = await a.xmpp["xep_0313"].get_fields(timeout=10)
        result["fields"] = sorted(form.get_fields().keys())
        info = await a.xmpp["xep_0030"].get_info(jid=a.xmpp.boundjid.domain, timeout=10)
        result["disco"] = NS_MAM in info["disco_info"]["features"]
        result.pop("stage", None)
        result["ok"] = True
        return result
    except LoginError as e:
        result.update(e.fields())
        return result
    finally:
        await close_all(clients)


async def _pages(client: MamClient, size: int):
    """Pages forwards with RSM ``after`` = the previous page's ``last``
    until a page comes back empty; each page's results."""
    after = None
    while True:
        rsm = {"max": str(size)}
        if after is not None:
            rsm["after"] = after
        answer = await client.query(rsm=rsm)
        if isinstance(answer, str):
            raise RuntimeError(f"page query failed: {answer}")
        results, fin = answer
        if not results:
            return
        yield results
        after = fin["mam_fin"]["rsm"]["last"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    archive = sub.add_parser("archive")
    archive.add_argument("--host", default="127.0.0.1")
    archive.add_argument("--port", type=int, required=True)
    archive.add_argument("--cafile", required=True)
    archive.add_argument("--mechanism", choices=MECHANISMS, default="SCRAM-SHA-256")
    archive.add_argument("--timeout", type=float, default=argparse.SUPPRESS)
    archive.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    for who in ("a", "b", "c"):
        archive.add_argument(f"--{who}", required=True, metavar="JID")
        archive.add_argument(f"--{who}-password", required=True)
    archive.add_argument("--count", type=int, default=1000, help="messages A sends")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), {"archive": run_archive}, argv)


if __name__ == "__main__":
    sys.exit(main())
