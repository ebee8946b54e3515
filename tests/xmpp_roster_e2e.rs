//! Rosters, subscriptions and presence end to end (RFC 6121 §2-§4):
//! `switchboard serve` (embedded log) and real slixmpp clients
//! (`tests/e2e/xmpp_roster.py`):
//!
//! a. alice adds bob (roster set with a name and a group) and subscribes;
//!    the default policy (auto-authorize, reciprocal add) ends with both
//!    rosters at `both`; each sees the other available, alice sees bob's
//!    change to away with a status, and bob sees alice leave;
//! e. vcard-temp (XEP-0054): alice's vCard set by her is what she and bob
//!    fetch; a user without one has an empty vCard; blocking (XEP-0191):
//!    alice blocks bob, her list is [bob] and bob sees her unavailable;
//!    unblocking all empties it and bob sees her available again;
//! f. directed presence (RFC 6121 §4.6): carol, not subscribed, gets
//!    alice's directed presence from her full JID and the unavailable
//!    presence when alice leaves; another domain is remote-server-not-found;
//! g. carbons (XEP-0280): two resources of bob enable carbons; a message
//!    from alice to one of them is copied to the other (received), and a
//!    message the other sends is copied to the first (sent);
//! b. alice's roster, fetched by a new session, still has bob with the
//!    name and group (the roster lives in the log);
//! c. after a restart on the same data directory the roster is the same,
//!    and removing bob empties it (RFC 6121 §2.5) and bob's item for alice
//!    drops to `none`;
//! d. removing an item that is not there is answered `item-not-found`.
//!
//! Run twice: on the embedded default, and as gateway, processors and
//! projections processes on Kafka and PostgreSQL.

mod support;

use support::xmpp::{Deployment, Outcome, python};

const ALICE: (&str, &str) = ("alice@example.com", "alice's password");
const BOB: (&str, &str) = ("bob@example.com", "bob: another, password");
const CAROL: (&str, &str) = ("carol@example.com", "carol's secret");

fn item<'a>(o: &'a Outcome, jid: &str) -> Option<&'a serde_json::Value> {
    o.json.get("items").and_then(|i| i.get(jid))
}

#[test]
fn rosters_subscriptions_and_presence_with_slixmpp() {
    scenario(&Deployment::new());
}

#[test]
fn rosters_subscriptions_and_presence_on_kafka_and_postgres() {
    scenario(&Deployment::distributed());
}

fn scenario(dep: &Deployment) {
    let python = python();
    let server = dep
        .start()
        .unwrap_or_else(|e| panic!("{e}\n{}", dep.log_tail()));
    for (jid, password) in [ALICE, BOB, CAROL] {
        dep.add_user(jid, password);
    }
    let ctx = |o: &Outcome| format!("{}\n{}", o.report, dep.log_tail());
    // `xmpp_roster.py <command>` with users a and b.
    let pair = |command: &str, timeout: u64, a: (&str, &str), b: (&str, &str)| {
        dep.client(
            &python,
            "xmpp_roster.py",
            command,
            timeout,
            &[
                "--a",
                a.0,
                "--a-password",
                a.1,
                "--b",
                b.0,
                "--b-password",
                b.1,
            ],
        )
    };

    // a.
    let o = pair("handshake", 45, ALICE, BOB);
    assert!(o.bool("ok"), "a. handshake: {}", ctx(&o));

    // e.
    let o = pair("extras", 60, ALICE, BOB);
    assert!(o.bool("ok"), "e. vcard and blocking: {}", ctx(&o));

    // f.
    let o = pair("directed", 40, ALICE, CAROL);
    assert!(o.bool("ok"), "f. directed presence: {}", ctx(&o));

    // g.
    let o = pair("carbons", 40, BOB, ALICE);
    assert!(o.bool("ok"), "g. carbons: {}", ctx(&o));

    // b.
    let roster = |dep: &Deployment, who: (&str, &str), remove: Option<&str>| {
        let mut args = vec!["--a", who.0, "--a-password", who.1];
        if let Some(r) = remove {
            args.extend(["--remove", r]);
        }
        dep.client(&python, "xmpp_roster.py", "roster", 25, &args)
    };
    let o = roster(dep, ALICE, None);
    assert!(o.bool("ok"), "b. roster: {}", ctx(&o));
    let bob = item(&o, BOB.0).unwrap_or_else(|| panic!("b. bob missing: {}", ctx(&o)));
    assert_eq!(bob["subscription"], "both", "b. {}", ctx(&o));
    assert_eq!(bob["name"], "Buddy", "b. {}", ctx(&o));
    assert_eq!(bob["groups"], serde_json::json!(["Team"]), "b. {}", ctx(&o));
    assert!(
        o.str("version").is_some(),
        "b. no roster version: {}",
        ctx(&o)
    );

    // c.
    dep.stop(server).unwrap();
    let _server = dep
        .start()
        .unwrap_or_else(|e| panic!("restart: {e}\n{}", dep.log_tail()));
    let o = roster(dep, ALICE, Some(BOB.0));
    assert!(o.bool("ok"), "c. roster after restart: {}", ctx(&o));
    assert_eq!(
        item(&o, BOB.0).map(|b| b["subscription"].clone()),
        Some("both".into()),
        "c. {}",
        ctx(&o)
    );
    assert!(o.bool("removed"), "c. remove: {}", ctx(&o));
    let o = roster(dep, BOB, None);
    assert_eq!(
        item(&o, ALICE.0).map(|a| a["subscription"].clone()),
        Some("none".into()),
        "c. bob's item for alice after the removal: {}",
        ctx(&o)
    );

    // d.
    let o = roster(dep, ALICE, Some("nobody@example.com"));
    assert_eq!(
        o.str("remove_error"),
        Some("item-not-found"),
        "d. {}",
        ctx(&o)
    );
}
