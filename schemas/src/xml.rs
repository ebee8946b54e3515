//! XML escaping for the stanzas that events carry (XML 1.0 §2.4 and §3.3.3):
//! one implementation for every crate that builds stanza text.

/// Appends `s` to `out`, escaped for character data or an attribute value in
/// either quote: `&`, `<`, `>`, `'` and `"`.
pub fn escape_into(out: &mut String, s: &str) {
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
}

/// `s` escaped as by [`escape_into`].
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    escape_into(&mut out, s);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn markup_and_both_quotes() {
        assert_eq!(
            super::escape(r#"a<b>&'c'"d""#),
            "a&lt;b&gt;&amp;&apos;c&apos;&quot;d&quot;"
        );
    }
}
