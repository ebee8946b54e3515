//! RFC 6120 §4: the XML stream (being written).
