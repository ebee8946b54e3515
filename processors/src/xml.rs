//! Building the XMPP stanzas processors hand to gateways in
//! `delivery.stanza` events (RFC 6120 §8).

use std::fmt::Write as _;

/// Escapes text for an XML attribute value or character data
/// (XML 1.0 §2.4: `&`, `<`, `>` and both quotes).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// Appends ` name='value'` (escaped) to `out`.
pub fn attr(out: &mut String, name: &str, value: &str) {
    let _ = write!(out, " {name}='{}'", escape(value));
}

/// Appends `<name>text</name>` (escaped) to `out`.
pub fn text_element(out: &mut String, name: &str, text: &str) {
    let _ = write!(out, "<{name}>{}</{name}>", escape(text));
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
