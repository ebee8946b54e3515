//! Message archive management (XEP-0313, paged with XEP-0059) end to end:
//! `switchboard serve` and slixmpp clients (`tests/e2e/xmpp_mam.py
//! archive`). Alice sends 1,000 chat messages as fast as her stream takes
//! them (600 to bob, a third of those to his full address, then 400 to
//! carol) and, once her archive counts them all:
//!
//! a. paging 100 at a time (RSM `after` = the previous `last`, by hand and
//!    with slixmpp's iterator) gives every message once, in order, each
//!    result with its query id, archive id, delay and the original stanza;
//!    paging backwards from the last page gives them newest first;
//! b. `with` bob's bare address gives his 600, his full address only the
//!    200 sent to it, carol's her 400; `start`/`end` at an instant between
//!    the two phases split them exactly;
//! c. `after-id`/`before-id` bound the result set (and its count); a
//!    flipped last page comes newest first;
//! d. an unknown RSM id is item-not-found, bob's archive is forbidden to
//!    alice, an unknown form field or a malformed `start` is bad-request,
//!    RSM `index` feature-not-implemented; a page never exceeds 250;
//! e. the form of a `get` names the supported fields and the server's disco
//!    lists urn:xmpp:mam:2.
//!
//! Run twice: on the embedded default, and as gateway, processors and
//! projections processes on Kafka and PostgreSQL.

mod support;

use serde_json::json;
use support::xmpp::{Deployment, python};

const ALICE: (&str, &str) = ("alice@example.com", "alice's password");
const BOB: (&str, &str) = ("bob@example.com", "bob: another, password");
const CAROL: (&str, &str) = ("carol@example.com", "carol's secret");

#[test]
fn archive_queries_with_slixmpp() {
    scenario(&Deployment::new());
}

#[test]
fn archive_queries_on_kafka_and_postgres() {
    scenario(&Deployment::distributed());
}

fn scenario(dep: &Deployment) {
    let python = python();
    let _server = dep
        .start()
        .unwrap_or_else(|e| panic!("{e}\n{}", dep.log_tail()));
    for (jid, password) in [ALICE, BOB, CAROL] {
        dep.add_user(jid, password);
    }
    let o = dep.client(
        &python,
        "xmpp_mam.py",
        "archive",
        240,
        &[
            "--a",
            ALICE.0,
            "--a-password",
            ALICE.1,
            "--b",
            BOB.0,
            "--b-password",
            BOB.1,
            "--c",
            CAROL.0,
            "--c-password",
            CAROL.1,
            "--count",
            "1000",
        ],
    );
    let ctx = format!("{}\n{}", o.report, dep.log_tail());
    assert!(o.bool("ok"), "the client did not finish: {ctx}");
    let j = &o.json;
    assert_eq!(j["count"], 1000, "{ctx}");
    // a.
    assert!(o.bool("paged"), "a. forward paging: {ctx}");
    assert_eq!(j["pages"], 10, "a. {ctx}");
    assert!(o.bool("plugin_paged"), "a. slixmpp's iterator: {ctx}");
    assert!(o.bool("reverse"), "a. backward paging: {ctx}");
    // b.
    assert_eq!(j["with_bare"], 600, "b. {ctx}");
    assert_eq!(j["with_full"], 200, "b. {ctx}");
    assert_eq!(j["with_c"], 400, "b. {ctx}");
    assert!(o.bool("after_t_mid"), "b. start: {ctx}");
    assert!(o.bool("before_t_mid"), "b. end: {ctx}");
    // c.
    assert_eq!(
        j["between_ids"],
        json!((11..20).collect::<Vec<_>>()),
        "c. {ctx}"
    );
    assert_eq!(j["between_count"], 9, "c. {ctx}");
    assert_eq!(j["flip"], json!([999, 998, 997]), "c. {ctx}");
    // d.
    assert_eq!(j["unknown_after"], "item-not-found", "d. {ctx}");
    assert_eq!(j["other_archive"], "forbidden", "d. {ctx}");
    assert_eq!(j["unknown_field"], "bad-request", "d. {ctx}");
    assert_eq!(j["index"], "feature-not-implemented", "d. {ctx}");
    assert_eq!(j["bad_start"], "bad-request", "d. {ctx}");
    assert_eq!(
        j["capped_page"], 250,
        "d. at most 250 results a page: {ctx}"
    );
    // e.
    assert_eq!(
        j["fields"],
        json!(["FORM_TYPE", "after-id", "before-id", "end", "start", "with"]),
        "e. {ctx}"
    );
    assert!(o.bool("disco"), "e. {ctx}");
}
