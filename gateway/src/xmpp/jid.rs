//! RFC 7622: XMPP addresses (being written).
