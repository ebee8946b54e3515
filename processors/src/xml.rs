//! Building the XMPP stanzas processors hand to gateways in
//! `delivery.stanza` events (RFC 6120 §8).

pub use switchboard_schemas::xml::{escape, escape_into};

/// Appends ` name='value'` (escaped) to `out`.
pub fn attr(out: &mut String, name: &str, value: &str) {
    out.push(' ');
    out.push_str(name);
    out.push_str("='");
    escape_into(out, value);
    out.push('\'');
}

/// Appends `<name>text</name>` (escaped) to `out`.
pub fn text_element(out: &mut String, name: &str, text: &str) {
    out.push('<');
    out.push_str(name);
    out.push('>');
    escape_into(out, text);
    out.push_str("</");
    out.push_str(name);
    out.push('>');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(escape("a<b>&'\"c"), "a&lt;b&gt;&amp;&apos;&quot;c");
        let mut s = String::new();
        attr(&mut s, "to", "o'neil@example.com");
        text_element(&mut s, "status", "<away>");
        assert_eq!(
            s,
            " to='o&apos;neil@example.com'<status>&lt;away&gt;</status>"
        );
    }
}
