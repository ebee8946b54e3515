//! Example envelopes, one per catalogue entry. `SWITCHBOARD_BLESS=1` writes
//! the golden file of an entry that has none from its example here; golden
//! files are reviewed by hand and never rewritten by a test.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::json;
use switchboard_schemas::events::*;
use switchboard_schemas::{BareJid, Envelope, Event, FullJid, NodeId, RoomJid};
use uuid::Uuid;

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
const ROOM: &str = "standup@conference-node1-cl1.example.com";

fn id(n: u64) -> Uuid {
    Uuid::parse_str(&format!("0196a5d2-7c3e-7000-8000-{n:012x}")).expect("valid uuid")
}

fn at(seconds: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 5, 9, 30, 0)
        .single()
        .expect("valid time")
        + Duration::seconds(seconds)
        + Duration::microseconds(123_456)
}

fn bare(s: &str) -> BareJid {
    BareJid::new(s)
}

fn full(s: &str) -> FullJid {
    FullJid::new(s)
}

fn room() -> RoomJid {
    RoomJid::new(ROOM)
}

/// The session the session examples share.
fn session() -> Uuid {
    id(0x100)
}

fn transfer() -> Uuid {
    id(0x200)
}

fn download() -> Uuid {
    id(0x201)
}

fn credentials() -> Vec<ScramCredential> {
    vec![
        ScramCredential {
            mechanism: ScramMechanism::ScramSha1,
            salt_b64: "QSXCR+Q6sek8bf92".to_owned(),
            iterations: 4096,
            stored_key_b64: "6dlGYMOdZcOPutkcNY8U2g7vK9Y=".to_owned(),
            server_key_b64: "D+CSWLOshSulAsxiupA+qs2/fTE=".to_owned(),
        },
        ScramCredential {
            mechanism: ScramMechanism::ScramSha256,
            salt_b64: "W22ZaJ0SNY7soEsUEjb6gQ==".to_owned(),
            iterations: 4096,
            stored_key_b64: "WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=".to_owned(),
            server_key_b64: "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=".to_owned(),
        },
    ]
}

fn digest() -> Vec<DigestCredential> {
    vec![
        DigestCredential {
            algorithm: DigestAlgorithm::Sha256,
            realm: "example.com".to_owned(),
            ha1_hex: "e2d7cf2b9a6b3bd5ae7ce7b5ab1d6d6b0b9aa8bd6d31f0c0a2f3e8b3f1e0d5a1".to_owned(),
        },
        DigestCredential {
            algorithm: DigestAlgorithm::Md5,
            realm: "example.com".to_owned(),
            ha1_hex: "5c1a0e4f2b7d3e9a8f6c4b2a1d0e9f8c".to_owned(),
        },
    ]
}

/// One example per catalogue entry, in catalogue order.
pub fn examples() -> Vec<Envelope> {
    let node = || NodeId::new("node1");
    let mut n = 0;
    let mut envelope = |subject: &str, event: Event| {
        n += 1;
        Envelope {
            id: id(n),
            occurred_at: at(i64::try_from(n).expect("small")),
            node: node(),
            subject: subject.to_owned(),
            causation_id: None,
            correlation_id: None,
            event,
        }
    };
    let chat = r#"<message xmlns="jabber:client" from="alice@example.com/laptop" to="bob@example.com" type="chat" id="m-7f3a"><body>Standup in 5?</body><origin-id xmlns="urn:xmpp:sid:0" id="3b0e8f3c-5d7a-4c61-9f51-2f3c8e1a9b10"/></message>"#;
    let message_id = "3b0e8f3c-5d7a-4c61-9f51-2f3c8e1a9b10";
    let room_stanza = r#"<message xmlns="jabber:client" from="alice@example.com/laptop" to="standup@conference-node1-cl1.example.com" type="groupchat" id="g-11"><body>Morning all</body><origin-id xmlns="urn:xmpp:sid:0" id="8c1d4e2a-0f6b-4b7e-a3c9-5e6f7a8b9c0d"/></message>"#;
    let path = "files/im/20260105/09/";

    let mut examples = vec![
        envelope(
            ALICE,
            SessionLoginAttempted {
                session_id: session(),
                user: bare(ALICE),
                protocol: Protocol::Xmpp,
                remote_addr: "192.0.2.10:51234".to_owned(),
                mechanism: AuthMechanism::ScramSha256,
                tls: true,
            }
            .into(),
        ),
        envelope(
            ALICE,
            SessionLoginSucceeded {
                session_id: session(),
                user: bare(ALICE),
                protocol: Protocol::Xmpp,
                remote_addr: "192.0.2.10:51234".to_owned(),
                mechanism: AuthMechanism::ScramSha256,
            }
            .into(),
        ),
        envelope(
            BOB,
            SessionLoginFailed {
                session_id: id(0x101),
                user: bare(BOB),
                protocol: Protocol::Sip,
                remote_addr: "[2001:db8::7]:5061".to_owned(),
                mechanism: AuthMechanism::Digest,
                reason: LoginFailureReason::BadCredentials,
                text: Some("digest response mismatch".to_owned()),
            }
            .into(),
        ),
        envelope(
            ALICE,
            SessionResourceBound {
                session_id: session(),
                full_jid: full("alice@example.com/laptop"),
                protocol: Protocol::Xmpp,
                contact: None,
                priority: 5,
                client: ClientInfo {
                    name: Some("Gajim".to_owned()),
                    version: Some("1.9.5".to_owned()),
                    os: Some("Linux".to_owned()),
                    user_agent: None,
                },
            }
            .into(),
        ),
        envelope(
            ALICE,
            SessionEnded {
                session_id: session(),
                user: bare(ALICE),
                full_jid: Some(full("alice@example.com/laptop")),
                protocol: Protocol::Xmpp,
                reason: SessionEndReason::ConnectionLost,
                text: Some("stream management resume timeout (60 s)".to_owned()),
            }
            .into(),
        ),
        envelope(
            "node1",
            NodeHeartbeat {
                node: node(),
                started_at: at(-3600),
                interval_secs: 10,
                sessions: BTreeMap::from([
                    (Protocol::Xmpp, 1_482),
                    (Protocol::Sip, 310),
                    (Protocol::Http, 27),
                ]),
            }
            .into(),
        ),
        envelope(
            ALICE,
            DevicePresence {
                user: bare(ALICE),
                device: "alice@example.com/laptop".to_owned(),
                protocol: Protocol::Xmpp,
                available: true,
                show: Some(Show::Away),
                status: Some("Back after lunch".to_owned()),
                priority: 5,
            }
            .into(),
        ),
        envelope(
            ALICE,
            ManualStatusSet {
                user: bare(ALICE),
                state: ManualState::Dnd,
                text: Some("Quarterly review".to_owned()),
                expires_at: Some(at(7200)),
            }
            .into(),
        ),
        envelope(
            ALICE,
            ManualStatusCleared {
                user: bare(ALICE),
                reason: ManualStatusClearReason::Expired,
            }
            .into(),
        ),
        envelope(
            BOB,
            PhoneLineState {
                user: bare(BOB),
                line_id: "+1 555 0100 ext 4711".to_owned(),
                state: LineState::OffHook,
            }
            .into(),
        ),
        envelope(
            BOB,
            CalendarState {
                user: bare(BOB),
                busy: true,
                until: Some(at(1800)),
            }
            .into(),
        ),
        envelope(
            BOB,
            ThirdPartyPresence {
                user: bare(BOB),
                application: "webex".to_owned(),
                availability: Some(Availability::InMeeting),
                status: Some("Presenting".to_owned()),
            }
            .into(),
        ),
        envelope(
            BOB,
            ComposedPresence {
                user: bare(BOB),
                availability: Availability::OnCall,
                show: Some(Show::Dnd),
                status: Some("On the phone".to_owned()),
                sources: switchboard_schemas::events::PresenceSources::from([
                    PresenceSource::Device,
                    PresenceSource::Phone,
                    PresenceSource::Calendar,
                ]),
            }
            .into(),
        ),
        envelope(
            ALICE,
            RosterItemSet {
                user: bare(ALICE),
                contact: bare(BOB),
                name: Some("Bob Builder".to_owned()),
                groups: vec!["Engineering".to_owned(), "Standup".to_owned()],
                subscription: Subscription::Both,
                ask: false,
                approved: false,
            }
            .into(),
        ),
        envelope(
            ALICE,
            DirectedPresence {
                from: full("alice@example.com/laptop"),
                to: "carol@example.com".to_owned(),
                available: true,
                stanza: "<presence xmlns='jabber:client' from='alice@example.com/laptop' to='carol@example.com'><show>chat</show></presence>".to_owned(),
            }
            .into(),
        ),
        envelope(
            ALICE,
            SessionCarbons {
                session_id: session(),
                full_jid: full("alice@example.com/laptop"),
                enabled: true,
            }
            .into(),
        ),
        envelope(
            ALICE,
            RosterQueried {
                user: bare(ALICE),
                device: full("alice@example.com/laptop"),
                session_id: session(),
                iq_id: "roster-1".to_owned(),
                version: Some("3f1c2a9b".to_owned()),
            }
            .into(),
        ),
        envelope(
            ALICE,
            RosterUpdateRequested {
                user: bare(ALICE),
                device: full("alice@example.com/laptop"),
                session_id: session(),
                iq_id: "roster-2".to_owned(),
                contact: bare(BOB),
                name: Some("Bob Builder".to_owned()),
                groups: vec!["Engineering".to_owned()],
                remove: false,
            }
            .into(),
        ),
        envelope(
            ALICE,
            VcardSet {
                user: bare(ALICE),
                vcard: "<vCard xmlns='vcard-temp'><FN>Alice Liddell</FN></vCard>".to_owned(),
            }
            .into(),
        ),
        envelope(
            BOB,
            VcardQueried {
                owner: bare(BOB),
                device: full("alice@example.com/laptop"),
                session_id: session(),
                iq_id: "vc-1".to_owned(),
            }
            .into(),
        ),
        envelope(
            ALICE,
            BlocklistQueried {
                user: bare(ALICE),
                device: full("alice@example.com/laptop"),
                session_id: session(),
                iq_id: "bl-1".to_owned(),
            }
            .into(),
        ),
        envelope(
            ALICE,
            BlocklistChangeRequested {
                user: bare(ALICE),
                device: full("alice@example.com/laptop"),
                session_id: session(),
                iq_id: "bl-2".to_owned(),
                block: true,
                items: vec![
                    PolicyItem::User(bare("mallory@example.net")),
                    PolicyItem::Domain("spam.example".to_owned()),
                ],
            }
            .into(),
        ),
        envelope(
            ALICE,
            RosterItemRemoved {
                user: bare(ALICE),
                contact: bare("carol@example.com"),
            }
            .into(),
        ),
        envelope(
            ALICE,
            SubscriptionRequested {
                from: bare(ALICE),
                to: bare(BOB),
                status: Some("Hi Bob, it's Alice from the platform team".to_owned()),
            }
            .into(),
        ),
        envelope(
            BOB,
            SubscriptionApproved {
                from: bare(BOB),
                to: bare(ALICE),
                status: None,
            }
            .into(),
        ),
        envelope(
            BOB,
            SubscriptionDenied {
                from: bare(BOB),
                to: bare("mallory@example.net"),
                status: None,
            }
            .into(),
        ),
        envelope(
            ALICE,
            SubscriptionCancelled {
                from: bare(ALICE),
                to: bare("carol@example.com"),
                status: None,
            }
            .into(),
        ),
        envelope(
            ALICE,
            PolicyBlocked {
                user: bare(ALICE),
                item: PolicyItem::Domain("spam.example.net".to_owned()),
            }
            .into(),
        ),
        envelope(
            ALICE,
            PolicyUnblocked {
                user: bare(ALICE),
                item: PolicyItem::User(bare("mallory@example.net")),
            }
            .into(),
        ),
        envelope(
            ALICE,
            PolicyAllowed {
                user: bare(ALICE),
                item: PolicyItem::Domain("example.com".to_owned()),
            }
            .into(),
        ),
        envelope(
            ALICE,
            PolicyDisallowed {
                user: bare(ALICE),
                item: PolicyItem::User(bare("carol@example.com")),
            }
            .into(),
        ),
        envelope(
            ALICE,
            PolicyDefaultSet {
                user: bare(ALICE),
                default: DefaultPolicy::Ask,
            }
            .into(),
        ),
        envelope(
            ALICE,
            MessageSubmitted {
                message_id: message_id.to_owned(),
                from: full("alice@example.com/laptop"),
                to: BOB.to_owned(),
                kind: MessageKind::Chat,
                body: Some("Standup in 5?".to_owned()),
                thread: None,
                subject: None,
                stanza: chat.to_owned(),
            }
            .into(),
        ),
        envelope(
            BOB,
            MessageDelivered {
                message_id: message_id.to_owned(),
                from: full("alice@example.com/laptop"),
                to: full("bob@example.com/phone"),
                carbon: false,
            }
            .into(),
        ),
        envelope(
            BOB,
            MessageStoredOffline {
                message_id: message_id.to_owned(),
                from: full("alice@example.com/laptop"),
                to: bare(BOB),
                stanza: None,
            }
            .into(),
        ),
        envelope(
            ALICE,
            MessageBounced {
                message_id: message_id.to_owned(),
                from: full("alice@example.com/laptop"),
                to: "dave@example.com".to_owned(),
                reason: BounceReason::OfflineLimit,
                text: Some("Your IM could not be delivered.".to_owned()),
            }
            .into(),
        ),
        envelope(
            BOB,
            MessageDisplayed {
                message_id: message_id.to_owned(),
                by: full("bob@example.com/phone"),
                sender: bare(ALICE),
            }
            .into(),
        ),
        envelope(
            ALICE,
            MessageArchiveQueried {
                user: bare(ALICE),
                device: full("alice@example.com/laptop"),
                session_id: session(),
                iq_id: "mam-1".to_owned(),
                query_id: Some("q1".to_owned()),
                with: Some(BOB.to_owned()),
                start: Some(at(-86_400)),
                end: None,
                after_id: None,
                before_id: None,
                max: 50,
                page_after: Some(id(0x300).to_string()),
                page_before: None,
                flip_page: false,
            }
            .into(),
        ),
        envelope(
            ROOM,
            RoomCreated {
                room: room(),
                creator: bare(ALICE),
                persistent: true,
            }
            .into(),
        ),
        envelope(
            ROOM,
            RoomConfigured {
                room: room(),
                by: Some(bare(ALICE)),
                settings: BTreeMap::from([
                    ("maxusers".to_owned(), json!(50)),
                    ("membersonly".to_owned(), json!(false)),
                    ("moderatedroom".to_owned(), json!(false)),
                    ("roomname".to_owned(), json!("Daily standup")),
                ]),
            }
            .into(),
        ),
        envelope(
            ROOM,
            RoomJoined {
                room: room(),
                occupant: full("bob@example.com/phone"),
                nick: "bob".to_owned(),
                role: Role::Participant,
                affiliation: Affiliation::Member,
            }
            .into(),
        ),
        envelope(
            ROOM,
            RoomLeft {
                room: room(),
                occupant: full("bob@example.com/phone"),
                nick: "bob".to_owned(),
                status: Some("Gone to lunch".to_owned()),
            }
            .into(),
        ),
        envelope(
            ROOM,
            RoomMessage {
                room: room(),
                message_id: "8c1d4e2a-0f6b-4b7e-a3c9-5e6f7a8b9c0d".to_owned(),
                from: full("alice@example.com/laptop"),
                from_nick: "alice".to_owned(),
                body: Some("Morning all".to_owned()),
                stanza: room_stanza.to_owned(),
            }
            .into(),
        ),
        envelope(
            ROOM,
            RoomSubjectChanged {
                room: room(),
                by: full("alice@example.com/laptop"),
                by_nick: "alice".to_owned(),
                subject: "Sprint 42: release checklist".to_owned(),
            }
            .into(),
        ),
        envelope(
            ROOM,
            RoomAffiliationChanged {
                room: room(),
                user: bare(BOB),
                affiliation: Affiliation::Admin,
                by: Some(bare(ALICE)),
                reason: Some("Runs the standup while Alice is away".to_owned()),
            }
            .into(),
        ),
        envelope(
            ROOM,
            RoomRoleChanged {
                room: room(),
                nick: "bob".to_owned(),
                role: Role::Moderator,
                by: Some(bare(ALICE)),
                reason: None,
            }
            .into(),
        ),
        envelope(
            ROOM,
            RoomDestroyed {
                room: room(),
                by: Some(bare(ALICE)),
                reason: Some("Moved to the team room".to_owned()),
                alternate_venue: Some(RoomJid::new("team@conference-node1-cl1.example.com")),
            }
            .into(),
        ),
        envelope(
            ALICE,
            FileUploadStarted {
                transfer_id: transfer(),
                uploader: bare(ALICE),
                content_type: Some("application/pdf".to_owned()),
                to: BOB.to_owned(),
                stored_name: "0196a5d2-7c3e-7000-8000-000000000200.pdf".to_owned(),
                real_name: "Q4 roadmap.pdf".to_owned(),
                path: path.to_owned(),
                size: 1_843_200,
                method: TransferMethod::HttpUpload,
            }
            .into(),
        ),
        envelope(
            ALICE,
            FileUploadCompleted {
                transfer_id: transfer(),
                uploader: bare(ALICE),
                bytes_transferred: 1_843_200,
                to: BOB.to_owned(),
                stored_name: "0196a5d2-7c3e-7000-8000-000000000200.pdf".to_owned(),
                real_name: "Q4 roadmap.pdf".to_owned(),
                path: path.to_owned(),
                size: 1_843_200,
                method: TransferMethod::HttpUpload,
            }
            .into(),
        ),
        envelope(
            ALICE,
            FileUploadFailed {
                transfer_id: id(0x202),
                uploader: bare(ALICE),
                bytes_transferred: 524_288,
                reason: TransferFailureReason::DiskFull,
                text: Some("free space below 10% on /var/lib/switchboard".to_owned()),
                to: ROOM.to_owned(),
                stored_name: "0196a5d2-7c3e-7000-8000-000000000202.mp4".to_owned(),
                real_name: "demo.mp4".to_owned(),
                path: "files/persistent/20260105/09/".to_owned(),
                size: 73_400_320,
                method: TransferMethod::HttpUpload,
            }
            .into(),
        ),
        envelope(
            BOB,
            FileDownloadStarted {
                transfer_id: download(),
                downloader: bare(BOB),
                upload_id: transfer(),
                uploader: bare(ALICE),
                to: BOB.to_owned(),
                stored_name: "0196a5d2-7c3e-7000-8000-000000000200.pdf".to_owned(),
                real_name: "Q4 roadmap.pdf".to_owned(),
                path: path.to_owned(),
                size: 1_843_200,
                method: TransferMethod::HttpUpload,
            }
            .into(),
        ),
        envelope(
            BOB,
            FileDownloadCompleted {
                transfer_id: download(),
                downloader: bare(BOB),
                upload_id: transfer(),
                uploader: bare(ALICE),
                bytes_transferred: 1_843_200,
                to: BOB.to_owned(),
                stored_name: "0196a5d2-7c3e-7000-8000-000000000200.pdf".to_owned(),
                real_name: "Q4 roadmap.pdf".to_owned(),
                path: path.to_owned(),
                size: 1_843_200,
                method: TransferMethod::HttpUpload,
            }
            .into(),
        ),
        envelope(
            BOB,
            FileDownloadFailed {
                transfer_id: id(0x203),
                downloader: bare(BOB),
                upload_id: transfer(),
                uploader: bare(ALICE),
                bytes_transferred: 65_536,
                reason: TransferFailureReason::Cancelled,
                text: None,
                to: BOB.to_owned(),
                stored_name: "0196a5d2-7c3e-7000-8000-000000000200.pdf".to_owned(),
                real_name: "Q4 roadmap.pdf".to_owned(),
                path: path.to_owned(),
                size: 1_843_200,
                method: TransferMethod::HttpUpload,
            }
            .into(),
        ),
        envelope(
            "erin@example.com",
            UserProvisioned {
                user: bare("erin@example.com"),
                display_name: Some("Erin Example".to_owned()),
                locale: Some("de-DE".to_owned()),
                credentials: credentials(),
                digest: digest(),
                by: Some("admin_cli:root".to_owned()),
            }
            .into(),
        ),
        envelope(
            "erin@example.com",
            UserCredentialsChanged {
                user: bare("erin@example.com"),
                credentials: credentials(),
                digest: digest(),
                by: Some("erin@example.com".to_owned()),
            }
            .into(),
        ),
        envelope(
            "erin@example.com",
            UserDisabled {
                user: bare("erin@example.com"),
                reason: Some("Left the company".to_owned()),
                by: Some("admin_cli:root".to_owned()),
            }
            .into(),
        ),
        envelope(
            "erin@example.com",
            UserEnabled {
                user: bare("erin@example.com"),
                by: Some("http_api:ops@example.com".to_owned()),
            }
            .into(),
        ),
        envelope(
            "erin@example.com",
            UserDeleted {
                user: bare("erin@example.com"),
                by: Some("admin_cli:root".to_owned()),
            }
            .into(),
        ),
        envelope(
            "erin@example.com",
            UserState {
                user: bare("erin@example.com"),
                display_name: Some("Erin Example".to_owned()),
                locale: Some("de-DE".to_owned()),
                enabled: true,
                credentials: credentials(),
                digest: digest(),
            }
            .into(),
        ),
        envelope(
            "im.offline.max_per_user",
            SettingChanged {
                key: "im.offline.max_per_user".to_owned(),
                value: json!(250),
                previous: Some(json!(100)),
                changed_by: "admin_cli:root".to_owned(),
            }
            .into(),
        ),
        envelope(
            "node1",
            StanzaDelivery {
                session_id: id(0x102),
                to: "bob@example.com/phone".to_owned(),
                protocol: Protocol::Xmpp,
                stanza: chat.replace(r#"to="bob@example.com""#, r#"to="bob@example.com/phone""#),
                message_id: Some(message_id.to_owned()),
                sender: Some(full("alice@example.com/laptop")),
                notify: None,
            }
            .into(),
        ),
        envelope(
            "node1",
            PresenceDelivery {
                stanza: "<presence from='alice@example.com'><show>away</show></presence>"
                    .to_owned(),
                targets: vec![
                    DeliveryTarget {
                        session_id: id(0x102),
                        to: "bob@example.com/phone".to_owned(),
                    },
                    DeliveryTarget {
                        session_id: id(0x103),
                        to: "carol@example.com/desk".to_owned(),
                    },
                ],
            }
            .into(),
        ),
        envelope(
            BOB,
            MessageUndelivered {
                message_id: message_id.to_owned(),
                from: full("alice@example.com/laptop"),
                to: "bob@example.com/phone".to_owned(),
                reason: UndeliveredReason::SessionGone,
                session_id: Some(id(0x102)),
                stanza: chat.replace(r#"to="bob@example.com""#, r#"to="bob@example.com/phone""#),
            }
            .into(),
        ),
    ];
    for (child, parent) in [
        ("session.login_succeeded", "session.login_attempted"),
        ("session.resource_bound", "session.login_succeeded"),
        ("presence.composed", "presence.phone_line"),
        ("message.delivered", "message.submitted"),
        ("delivery.stanza", "message.submitted"),
        ("message.undelivered", "delivery.stanza"),
        ("file.upload_completed", "file.upload_started"),
        ("file.download_completed", "file.download_started"),
        ("user.state", "user.provisioned"),
    ] {
        link(&mut examples, child, parent);
    }
    examples
}

/// Marks the example of type `child` as caused by the example of type `parent`.
fn link(examples: &mut [Envelope], child: &str, parent: &str) {
    let find = |event_type: &str| {
        examples
            .iter()
            .position(|e| e.event.event_type() == event_type)
            .unwrap_or_else(|| panic!("no example of {event_type}"))
    };
    let parent = examples[find(parent)].clone();
    let child = &mut examples[find(child)];
    child.causation_id = Some(parent.id);
    child.correlation_id = Some(parent.correlation_id.unwrap_or(parent.id));
}
