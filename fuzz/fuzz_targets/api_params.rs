//! The compliance API's query parameters (`switchboard_projections::api::params`)
//! and cursors: any decoded query string is accepted or refused with a
//! problem naming a parameter, never a panic; a cursor that decodes encodes
//! back to itself.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_projections::api::params::{MAX_PARAMETERS, Params};
use switchboard_projections::api::store::Cursor;
use switchboard_projections::api::{CONVERSATION_PARAMS, EXPORT_PARAMS, SEARCH_PARAMS};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(c) = Cursor::decode(text) {
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
    }
    let pairs: Vec<(String, String)> = text
        .split('&')
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    for allowed in [&SEARCH_PARAMS[..], &CONVERSATION_PARAMS[..], &EXPORT_PARAMS[..]] {
        match Params::new(pairs.clone(), allowed) {
            Ok(params) => {
                assert!(pairs.len() <= MAX_PARAMETERS);
                for result in [
                    params.search().map(|_| ()),
                    params.conversation().map(|_| ()),
                    params.limit().map(|_| ()),
                    params.cursor().map(|_| ()),
                    params.format().map(|_| ()),
                ] {
                    if let Err(p) = result {
                        assert_eq!(p.status.as_u16(), 400);
                        assert!(p.parameter.is_some());
                    }
                }
                if let Ok(search) = params.search()
                    && let Some(terms) = &search.text
                {
                    assert!(!terms.is_empty() && terms.len() <= 16);
                    assert!(terms.iter().all(|t| t.chars().any(char::is_alphanumeric)));
                }
            }
            Err(p) => {
                assert_eq!(p.status.as_u16(), 400);
                assert!(p.parameter.is_some());
            }
        }
    }
});
