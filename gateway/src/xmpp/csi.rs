//! XEP-0352 client state indication: while a client says it is inactive,
//! the traffic routed to it waits here (SPEC.md §7 quiet mode), sans-IO.
//!
//! What waits: presence (only the newest per sender is kept, XEP-0352 §5
//! "presence updates... may be dropped or coalesced"), messages without
//! a body (chat states, receipts, markers), and messages with a body that
//! the router marked not to notify here because another of the user's
//! clients is the active one (SPEC.md §7: quiet mode is flushed by "a
//! message while no other client is active"). What goes out at once, and
//! first releases everything waiting, in order: a message with a body that
//! is to notify this client (the router's `notify` true, or no decision),
//! an iq (it expects an answer), anything else. The queue is also released
//! when the client says it is active again, when it sends an iq itself, and
//! when [`MAX_HELD`] stanzas wait.

/// Most stanzas held for an inactive client before they are all released.
pub const MAX_HELD: usize = 200;

/// The quiet-mode queue of one session.
#[derive(Debug, Default)]
pub struct QuietQueue {
    inactive: bool,
    held: Vec<Held>,
}

#[derive(Debug)]
struct Held {
    /// Presence from this sender (coalesced), or `None` for other stanzas.
    presence_from: Option<String>,
    stanza: String,
}

/// The `from` attribute of a stanza's start tag, if any.
fn from_attr(stanza: &str) -> Option<&str> {
    let start_tag = &stanza[..stanza.find('>').unwrap_or(stanza.len())];
    for quote in ['\'', '"'] {
        let pattern = format!(" from={quote}");
        if let Some(i) = start_tag.find(&pattern) {
            let rest = &start_tag[i + pattern.len()..];
            return rest.find(quote).map(|end| &rest[..end]);
        }
    }
    None
}

impl QuietQueue {
    /// Whether the client said it is inactive.
    pub fn is_inactive(&self) -> bool {
        self.inactive
    }

    /// Stanzas waiting.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// `<inactive/>` (XEP-0352 §3).
    pub fn set_inactive(&mut self) {
        self.inactive = true;
    }

    /// `<active/>` (XEP-0352 §3): everything waiting, in order.
    pub fn set_active(&mut self) -> Vec<String> {
        self.inactive = false;
        self.release()
    }

    /// Everything waiting, in order (SPEC.md §7 flush).
    pub fn release(&mut self) -> Vec<String> {
        self.held.drain(..).map(|h| h.stanza).collect()
    }

    /// A stanza routed to the session: what to write now (possibly
    /// nothing, possibly earlier held stanzas first). `notify` is the
    /// router's decision for a message with a body (`Some(false)`: another
    /// client of the user is active, so this one stays quiet).
    pub fn offer(&mut self, stanza: String, notify: Option<bool>) -> Vec<String> {
        if !self.inactive {
            return vec![stanza];
        }
        let trimmed = stanza.trim_start();
        let is_presence = trimmed.starts_with("<presence");
        let quiet_message = trimmed.starts_with("<message")
            && (!trimmed.contains("<body") || notify == Some(false));
        if !(is_presence || quiet_message) {
            let mut out = self.release();
            out.push(stanza);
            return out;
        }
        let presence_from = is_presence
            .then(|| from_attr(trimmed).map(str::to_owned))
            .flatten();
        if let Some(from) = &presence_from {
            self.held
                .retain(|h| h.presence_from.as_deref() != Some(from.as_str()));
        }
        self.held.push(Held {
            presence_from,
            stanza,
        });
        if self.held.len() >= MAX_HELD {
            return self.release();
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presence(from: &str, show: &str) -> String {
        format!("<presence from='{from}' to='a@x/r'><show>{show}</show></presence>")
    }

    #[test]
    fn active_client_gets_everything_at_once() {
        let mut q = QuietQueue::default();
        assert_eq!(
            q.offer(presence("b@x", "away"), None),
            vec![presence("b@x", "away")]
        );
    }

    #[test]
    fn presence_is_held_and_coalesced_per_sender() {
        let mut q = QuietQueue::default();
        q.set_inactive();
        assert!(q.offer(presence("b@x", "away"), None).is_empty());
        assert!(q.offer(presence("c@x", "dnd"), None).is_empty());
        assert!(q.offer(presence("b@x", "xa"), None).is_empty());
        assert_eq!(q.held(), 2);
        assert_eq!(
            q.set_active(),
            vec![presence("c@x", "dnd"), presence("b@x", "xa")]
        );
        assert_eq!(q.held(), 0);
    }

    #[test]
    fn a_message_with_a_body_releases_the_queue_first() {
        let mut q = QuietQueue::default();
        q.set_inactive();
        let state = "<message from=\"b@x/r\" to=\"a@x/r\"><composing xmlns='http://jabber.org/protocol/chatstates'/></message>".to_owned();
        assert!(q.offer(presence("b@x", "away"), None).is_empty());
        assert!(q.offer(state.clone(), None).is_empty());
        let chat = "<message from='b@x/r' type='chat'><body>hi</body></message>".to_owned();
        assert_eq!(
            q.offer(chat.clone(), Some(true)),
            vec![presence("b@x", "away"), state, chat]
        );
        assert!(q.is_inactive(), "still inactive after the flush");
    }

    /// SPEC.md §7: a message while another client is active does not end
    /// quiet mode; it waits with the rest, in order, until a message that
    /// is to notify here (or an iq, or `<active/>`).
    #[test]
    fn a_message_for_another_active_client_is_held() {
        let mut q = QuietQueue::default();
        q.set_inactive();
        let chat = |n: u8| format!("<message from='b@x/r' type='chat'><body>{n}</body></message>");
        assert!(q.offer(presence("b@x", "away"), None).is_empty());
        assert!(q.offer(chat(1), Some(false)).is_empty());
        assert_eq!(q.held(), 2);
        assert_eq!(
            q.offer(chat(2), Some(true)),
            vec![presence("b@x", "away"), chat(1), chat(2)]
        );
        // Not inactive: delivered whatever the decision.
        q.set_active();
        assert_eq!(q.offer(chat(3), Some(false)), vec![chat(3)]);
    }

    #[test]
    fn an_iq_is_not_held() {
        let mut q = QuietQueue::default();
        q.set_inactive();
        assert!(q.offer(presence("b@x", "away"), None).is_empty());
        let push = "<iq type='set' id='push-1'><query xmlns='jabber:iq:roster'/></iq>".to_owned();
        assert_eq!(
            q.offer(push.clone(), None),
            vec![presence("b@x", "away"), push]
        );
    }

    #[test]
    fn the_buffer_limit_releases_everything() {
        let mut q = QuietQueue::default();
        q.set_inactive();
        for i in 0..MAX_HELD - 1 {
            assert!(
                q.offer(presence(&format!("u{i}@x"), "away"), None)
                    .is_empty()
            );
        }
        let out = q.offer(presence("last@x", "away"), None);
        assert_eq!(out.len(), MAX_HELD);
        assert_eq!(q.held(), 0);
    }

    #[test]
    fn from_attribute_with_either_quote() {
        assert_eq!(from_attr("<presence from='a@b'/>"), Some("a@b"));
        assert_eq!(
            from_attr("<presence to=\"x\" from=\"a@b/c\">"),
            Some("a@b/c")
        );
        assert_eq!(
            from_attr("<presence><status> from='x'</status></presence>"),
            None
        );
    }
}
