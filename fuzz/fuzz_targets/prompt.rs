//! Differential fuzzing of `router_daemon::prompt::extract` against serde_json.
//!
//! Run from `fuzz/` with `cargo +nightly fuzz run prompt`. Checks, for any input and
//! every endpoint: no panic; no false acceptance (serde_json rejects ⇒ `extract`
//! rejects); when both accept, the decoded `model` equals serde_json's; borrowed
//! keys point into the body; the conversation prefix lies within the key; and the
//! error kind is consistent with the parsed value.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use router_daemon::prompt::{Endpoint, PromptError, extract};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let parsed = serde_json::from_slice::<Value>(data);
    for endpoint in Endpoint::ALL {
        let result = extract(endpoint, data);
        let Ok(value) = &parsed else {
            assert!(result.is_err(), "false acceptance: {endpoint:?} {:?}", String::from_utf8_lossy(data));
            continue;
        };
        match (&result, value) {
            (Err(PromptError::NotAnObject), v) => assert!(!v.is_object()),
            (Err(PromptError::Malformed { .. }), _) => {
                panic!("valid JSON reported malformed: {result:?} {:?}", String::from_utf8_lossy(data))
            }
            (_, v) if !v.is_object() => panic!("non-object accepted: {result:?}"),
            (Err(PromptError::MissingField(field)), v) if *field == endpoint.prompt_field() => {
                assert!(v.get(field).is_none());
            }
            (Ok(input), v) => {
                assert_eq!(input.model.as_deref(), v.get("model").and_then(Value::as_str));
                assert!(v.get(endpoint.prompt_field()).is_some());
                assert!(input.conversation <= input.key.len());
                if let Cow::Borrowed(key) = &input.key {
                    let range = data.as_ptr_range();
                    assert!(key.is_empty() || range.contains(&key.as_ptr()));
                }
            }
            (Err(_), _) => {}
        }
    }
});
