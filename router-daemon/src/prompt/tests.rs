//! Tests of prompt extraction: every endpoint's shapes, the key encoding,
//! validation against serde_json, and property tests.
#![allow(
    clippy::unwrap_used,
    reason = "tests panic on unexpected results by design"
)]
use super::*;

use proptest::prelude::*;
use serde_json::Value;

use Endpoint::{ChatCompletions as Chat, Completions, Embeddings, Responses};

fn run(ep: Endpoint, body: &str) -> Result<RoutingInput<'_>, PromptError> {
    extract(ep, body.as_bytes())
}

fn key(ep: Endpoint, body: &str) -> Vec<u8> {
    run(ep, body).unwrap().key.into_owned()
}

fn model(body: &str) -> Option<String> {
    run(Completions, body).unwrap().model.map(Cow::into_owned)
}

fn serde_accepts(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok()
}

fn wrong(field: &'static str) -> impl Fn(&Result<RoutingInput<'_>, PromptError>) -> bool {
    move |r| matches!(r, Err(PromptError::WrongType { field: f, .. }) if *f == field)
}

// ---- Completions -------------------------------------------------------------

#[test]
fn tutorial_bodies_first_key_is_prefix_of_second() {
    let first = r#"{"model": "meta-llama/Llama-3.2-1B-Instruct", "prompt": "What is the capital of France?", "max_tokens": 100}"#;
    let follow_up = "What is the capital of France? And what is its population?";
    assert_eq!(follow_up.len(), 58);
    let second = first.replace("What is the capital of France?", follow_up);
    let a = run(Completions, first).unwrap();
    let b = run(Completions, &second).unwrap();
    assert_eq!(a.model.as_deref(), Some("meta-llama/Llama-3.2-1B-Instruct"));
    assert!(matches!(a.model, Some(Cow::Borrowed(_))));
    assert!(
        matches!(a.key, Cow::Borrowed(_)),
        "a string prompt is zero-copy"
    );
    assert_eq!(&*a.key, b"What is the capital of France?");
    assert_eq!(&*b.key, follow_up.as_bytes());
    assert!(b.key.starts_with(&a.key));
    assert_ne!(a.key, b.key);
}

#[test]
fn string_prompt_is_raw_bytes_with_escapes_kept() {
    let body = r#"{"prompt":"a\"b\\c\nd\u00e9\/\ud83d\ude00 é"}"#;
    let r = run(Completions, body).unwrap();
    assert!(matches!(r.key, Cow::Borrowed(_)));
    assert_eq!(&*r.key, r#"a\"b\\c\nd\u00e9\/\ud83d\ude00 é"#.as_bytes());
    assert_eq!(r.model, None);
}

#[test]
fn string_prompt_edge_contents() {
    assert_eq!(key(Completions, r#"{"prompt":""}"#), b"");
    assert_eq!(key(Completions, r#"{"prompt":"x\\","model":"m"}"#), br"x\\");
    assert_eq!(
        key(Completions, r#"{"prompt":"\\\"","model":"m"}"#),
        br#"\\\""#
    );
    assert_eq!(key(Completions, r#"{"prompt":"\"\"\"\\"}"#), br#"\"\"\"\\"#);
    // DEL and other printable bytes need no escaping.
    assert_eq!(
        key(Completions, "{\"prompt\":\"a\u{7f}b\"}"),
        "a\u{7f}b".as_bytes()
    );
}

#[test]
fn array_of_strings_prompt() {
    assert_eq!(
        key(Completions, r#"{"prompt":["ab", "c\"d",""]}"#),
        b"ab\x1Ec\\\"d\x1E\x1E"
    );
    let one = key(Completions, r#"{"prompt":["ab"]}"#);
    let two = key(Completions, r#"{"prompt":["ab","cd"]}"#);
    assert!(two.starts_with(&one));
}

#[test]
fn token_id_prompts() {
    assert_eq!(
        key(Completions, "{\"prompt\":[1, 23 ,\n456]}"),
        b"1,23,456,"
    );
    assert_eq!(key(Completions, r#"{"prompt":[0]}"#), b"0,");
    assert_eq!(
        key(Completions, r#"{"prompt":[18446744073709551615]}"#),
        b"18446744073709551615,"
    );
    let short = key(Completions, r#"{"prompt":[1,23]}"#);
    let long = key(Completions, r#"{"prompt":[1,23,456]}"#);
    assert!(long.starts_with(&short));
    // "1,2" must not be a prefix of "12": each id is terminated.
    assert!(!key(Completions, r#"{"prompt":[12]}"#).starts_with(b"1,"));
}

#[test]
fn batched_token_id_prompts() {
    assert_eq!(
        key(Completions, r#"{"prompt":[[1,2],[3]]}"#),
        b"1,2,\x1E3,\x1E"
    );
    assert_eq!(key(Completions, r#"{"prompt":[[], [7]]}"#), b"\x1E7,\x1E");
    assert_eq!(key(Completions, r#"{"prompt":[]}"#), b"");
    assert_eq!(key(Completions, r#"{"prompt":[ ]}"#), b"");
}

#[test]
fn prompt_of_wrong_type() {
    let is_wrong = wrong("prompt");
    for p in [
        "1",
        "null",
        "true",
        "{}",
        r#"{"prompt":"x"}"#,
        r#"["a",1]"#,
        r#"[1,"a"]"#,
        "[1.5]",
        "[1.0]",
        "[-1]",
        "[-0]",
        "[1e3]",
        "[18446744073709551616]",
        "[100000000000000000000]",
        r#"[[1],"a"]"#,
        r#"[[1,"a"]]"#,
        "[[1.5]]",
        "[[[1]]]",
        "[true]",
        "[null]",
        "[{}]",
        r#"["a",["b"]]"#,
        "[[1],2]",
    ] {
        let body = format!(r#"{{"model":"m","prompt":{p}}}"#);
        assert!(is_wrong(&run(Completions, &body)), "{body}");
        assert!(serde_accepts(body.as_bytes()), "{body}");
    }
}

#[test]
fn missing_prompt() {
    for body in [
        r#"{}"#,
        r#"{"model":"m"}"#,
        r#"{"messages":[{"role":"user","content":"x"}]}"#,
    ] {
        assert_eq!(
            run(Completions, body),
            Err(PromptError::MissingField("prompt")),
            "{body}"
        );
    }
}

// ---- model --------------------------------------------------------------------

#[test]
fn model_is_decoded_and_borrowed_when_possible() {
    let r = run(Completions, r#"{"model":"a/b","prompt":""}"#).unwrap();
    assert!(matches!(r.model, Some(Cow::Borrowed("a/b"))));
    let r = run(
        Completions,
        r#"{"model":"a\/b\u00e9\"\ud83d\ude00\n","prompt":""}"#,
    )
    .unwrap();
    assert!(matches!(&r.model, Some(Cow::Owned(m)) if m == "a/bé\"😀\n"));
    assert_eq!(model(r#"{"prompt":""}"#), None);
    assert_eq!(model(r#"{"model":"","prompt":""}"#), Some(String::new()));
    assert_eq!(model(r#"{"model":"é","prompt":""}"#), Some("é".to_owned()));
}

#[test]
fn model_of_wrong_type() {
    for m in ["null", "1", "[]", r#"{"model":"x"}"#, "false", r#"["x"]"#] {
        let body = format!(r#"{{"model":{m},"prompt":"p"}}"#);
        assert!(wrong("model")(&run(Completions, &body)), "{body}");
    }
    // The model is checked before the prompt.
    assert!(wrong("model")(&run(Completions, r#"{"model":1}"#)));
    assert!(wrong("model")(&run(Chat, r#"{"messages":3,"model":1}"#)));
}

// ---- top-level key handling ------------------------------------------------------

#[test]
fn nested_and_in_string_decoys_are_ignored() {
    let bodies = [
        r#"{"metadata":{"prompt":"decoy","model":"bad"},"prompt":"real","model":"good"}"#,
        r#"{"a":[{"prompt":"decoy"},["prompt","model"]],"prompt":"real","model":"good"}"#,
        r#"{"note":"\"prompt\":\"decoy\",\"model\":\"bad\"","prompt":"real","model":"good"}"#,
        r#"{"x":"prompt","y":"model","prompt":"real","z":{"a":{"b":{"prompt":[1]}}},"model":"good"}"#,
        r#"{"prompt":"real","model":"good","messages":[{"role":"user","content":"x","prompt":"d"}]}"#,
        r#"{"prompt\"":"decoy","\"prompt":"decoy","prompt":"real","model ":"bad","model":"good"}"#,
    ];
    for body in bodies {
        let r = run(Completions, body).unwrap();
        assert_eq!(&*r.key, b"real", "{body}");
        assert_eq!(r.model.as_deref(), Some("good"), "{body}");
    }
    let r = run(Completions, r#"{"meta":{"prompt":"decoy"}}"#);
    assert_eq!(r, Err(PromptError::MissingField("prompt")));
}

#[test]
fn duplicate_keys_last_one_wins() {
    assert_eq!(key(Completions, r#"{"prompt":"a","prompt":"b"}"#), b"b");
    assert_eq!(key(Completions, r#"{"prompt":1,"prompt":"b"}"#), b"b");
    assert!(wrong("prompt")(&run(
        Completions,
        r#"{"prompt":"b","prompt":1}"#
    )));
    assert_eq!(
        model(r#"{"model":"a","prompt":"","model":"b"}"#),
        Some("b".to_owned())
    );
    assert_eq!(
        model(r#"{"model":1,"prompt":"","model":"b"}"#),
        Some("b".to_owned())
    );
    assert_eq!(
        key(Completions, r#"{"prompt":["a"],"prompt":["b"]}"#),
        b"b\x1E"
    );
    assert_eq!(key(Completions, r#"{"prompt":[1,2],"prompt":"c"}"#), b"c");
    assert_eq!(
        key(Completions, r#"{"prompt":"c","prompt":[[3]]}"#),
        b"3,\x1E"
    );
    assert_eq!(
        key(
            Chat,
            r#"{"messages":[{"role":"a"}],"messages":[{"role":"b"}]}"#
        ),
        b"b\x1F\x1E"
    );
    assert!(wrong("messages")(&run(
        Chat,
        r#"{"messages":[{"role":"a"}],"messages":1}"#
    )));
    let chat = r#"{"messages":[{"role":"a","content":"x","role":"b","content":"y"}]}"#;
    assert_eq!(key(Chat, chat), b"b\x1Fy\x1E");
    for body in [r#"{"prompt":"a","prompt":"b"}"#, chat] {
        assert!(serde_accepts(body.as_bytes()));
    }
}

#[test]
fn key_order_and_whitespace_do_not_matter() {
    let bodies = [
        r#"{"model":"m","prompt":"p","max_tokens":5}"#,
        r#"{"max_tokens":5,"prompt":"p","model":"m"}"#,
        "\r\n\t {\n\t\"prompt\"\r\n:\t\"p\" ,\n  \"model\" :   \"m\"\n}\n\t \r\n",
        "{ \"stream\" : [ true , false , null ] , \"prompt\" : \"p\" , \"model\" : \"m\" , \"n\" : { } }",
    ];
    for body in bodies {
        let r = run(Completions, body).unwrap();
        assert_eq!(
            (&*r.key, r.model.as_deref()),
            (&b"p"[..], Some("m")),
            "{body:?}"
        );
    }
}

#[test]
fn escaped_key_names_are_decoded() {
    let r = run(
        Completions,
        r#"{"pr\u006fmpt":"p","\u006D\u006f\u0064\u0065\u006c":"m"}"#,
    )
    .unwrap();
    assert_eq!((&*r.key, r.model.as_deref()), (&b"p"[..], Some("m")));
    // Escaped and plain spellings are the same key: the last one wins.
    assert_eq!(
        key(Completions, r#"{"prompt":"a","pr\u006fmpt":"b"}"#),
        b"b"
    );
    assert_eq!(
        key(Completions, r#"{"pr\u006fmpt":"a","prompt":"b"}"#),
        b"b"
    );
    // Keys that only look similar are different keys.
    for body in [
        r#"{"prompt\u0000":"x"}"#,
        r#"{"Prompt":"x"}"#,
        r#"{"pr\\ompt":"x"}"#,
        r#"{"prompt ":"x"}"#,
        r#"{"\u0070rompts":"x"}"#,
    ] {
        assert_eq!(
            run(Completions, body),
            Err(PromptError::MissingField("prompt")),
            "{body}"
        );
    }
    let chat = r#"{"m\u0065ssages":[{"r\u006fle":"user","c\u006Fntent":[{"t\u0079pe":"t\u0065xt","t\u0065xt":"hi"}],"tool\u005fcalls":[1]}]}"#;
    assert_eq!(key(Chat, chat), b"user\x1Fhi\x1D[1]\x1E");
}

// ---- ChatCompletions ------------------------------------------------------------

#[test]
fn chat_messages_encoding_and_prefix() {
    let one = r#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Capital of France?"}]}"#;
    let two = r#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Capital of France?"},{"role":"assistant","content":"Paris."},{"role":"user","content":"Population?"}]}"#;
    let k1 = key(Chat, one);
    let k2 = key(Chat, two);
    assert_eq!(k1, b"system\x1FBe brief.\x1Euser\x1FCapital of France?\x1E");
    assert!(k2.starts_with(&k1));
    assert_eq!(run(Chat, one).unwrap().model.as_deref(), Some("m"));
    assert_eq!(key(Chat, r#"{"messages":[]}"#), b"");
}

#[test]
fn chat_member_order_is_irrelevant() {
    let a = r#"{"messages":[{"role":"user","content":"hi","tool_calls":[{"id":"1"}],"name":"x"}]}"#;
    let b = r#"{"messages":[{"name":"x","tool_calls":[{"id":"1"}],"content":"hi","role":"user"}]}"#;
    let c = r#"{"messages":[{"tool_calls":[{"id":"1"}],"role":"user","name":"x","content":"hi"}]}"#;
    let expected = b"user\x1Fhi[{\"id\":\"1\"}]\x1E";
    for body in [a, b, c] {
        assert_eq!(key(Chat, body), expected, "{body}");
    }
}

#[test]
fn chat_content_parts() {
    let body = r#"{"messages":[{"role":"user","content":[
        {"type":"text","text":"What is \"this\"?"},
        {"image_url":{"detail":"low","url":"https://x/y.png"},"type":"image_url"},
        {"type":"image_url","image_url":"data:image/png;base64,AAA"},
        {"type":"input_audio", "input_audio":{"data":"QQ==","format":"wav"}},
        {"text":"no type"},
        "bare string",
        42
    ]}]}"#;
    let expected = [
        &b"user\x1F"[..],
        br#"What is \"this\"?"#,
        b"\x1D",
        b"https://x/y.png",
        b"\x1D",
        b"data:image/png;base64,AAA",
        b"\x1D",
        br#"{"type":"input_audio", "input_audio":{"data":"QQ==","format":"wav"}}"#,
        b"\x1D",
        br#"{"text":"no type"}"#,
        b"\x1D",
        br#""bare string""#,
        b"\x1D",
        b"42",
        b"\x1D\x1E",
    ]
    .concat();
    assert_eq!(key(Chat, body), expected);
    // Adding a part to the last message extends its key up to that message's
    // closing 0x1E (adding a whole message extends the key itself).
    let one = r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"}]}]}"#;
    let two = r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#;
    let k1 = key(Chat, one);
    assert_eq!(k1.last(), Some(&RECORD_SEP));
    assert!(key(Chat, two).starts_with(&k1[..k1.len() - 1]));
    // An escaped part type is decoded before comparing.
    let esc = r#"{"messages":[{"role":"user","content":[{"type":"t\u0065xt","text":"a"}]}]}"#;
    assert_eq!(key(Chat, esc), key(Chat, one));
}

#[test]
fn chat_null_content_and_tool_calls() {
    let body = r#"{"messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},{"role":"tool","tool_call_id":"c1","content":"42"}]}"#;
    let expected = [
        &b"assistant\x1F"[..],
        br#"[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]"#,
        b"\x1Etool\x1F42\x1E",
    ]
    .concat();
    assert_eq!(key(Chat, body), expected);
    assert_eq!(key(Chat, r#"{"messages":[{"role":"a"}]}"#), b"a\x1F\x1E");
    assert_eq!(
        key(
            Chat,
            r#"{"messages":[{"role":"a","content":"x","tool_calls":null}]}"#
        ),
        b"a\x1Fx\x1E"
    );
    assert_eq!(
        key(Chat, r#"{"messages":[{"role":"a","content":[]}]}"#),
        b"a\x1F\x1E"
    );
}

#[test]
fn chat_errors() {
    let cases: &[(&str, PromptError)] = &[
        (r#"{"model":"m"}"#, PromptError::MissingField("messages")),
        (r#"{"prompt":"p"}"#, PromptError::MissingField("messages")),
        (
            r#"{"messages":[{"content":"x"}]}"#,
            PromptError::MissingField("messages[].role"),
        ),
        (
            r#"{"messages":[{"role":"u","content":[{"type":"text"}]}]}"#,
            PromptError::MissingField("messages[].content[].text"),
        ),
        (
            r#"{"messages":[{"role":"u","content":[{"type":"image_url"}]}]}"#,
            PromptError::MissingField("messages[].content[].image_url"),
        ),
        (
            r#"{"messages":[{"role":"u","content":[{"type":"image_url","image_url":{"detail":"low"}}]}]}"#,
            PromptError::MissingField("messages[].content[].image_url.url"),
        ),
    ];
    for (body, err) in cases {
        assert_eq!(run(Chat, body).as_ref().err(), Some(err), "{body}");
    }
    let wrong_cases: &[(&str, &str)] = &[
        (r#"{"messages":"hi"}"#, "messages"),
        (r#"{"messages":{"role":"user"}}"#, "messages"),
        (r#"{"messages":null}"#, "messages"),
        (r#"{"messages":["hi"]}"#, "messages"),
        (
            r#"{"messages":[{"role":"u","content":"x"},[]]}"#,
            "messages",
        ),
        (
            r#"{"messages":[{"role":1,"content":"x"}]}"#,
            "messages[].role",
        ),
        (r#"{"messages":[{"role":null}]}"#, "messages[].role"),
        (
            r#"{"messages":[{"role":"u","content":1}]}"#,
            "messages[].content",
        ),
        (
            r#"{"messages":[{"role":"u","content":{"text":"x"}}]}"#,
            "messages[].content",
        ),
        (
            r#"{"messages":[{"role":"u","content":true}]}"#,
            "messages[].content",
        ),
        (
            r#"{"messages":[{"role":"u","content":[{"type":"text","text":["x"]}]}]}"#,
            "messages[].content[].text",
        ),
        (
            r#"{"messages":[{"role":"u","content":[{"type":"image_url","image_url":1}]}]}"#,
            "messages[].content[].image_url",
        ),
        (
            r#"{"messages":[{"role":"u","content":[{"type":"image_url","image_url":{"url":null}}]}]}"#,
            "messages[].content[].image_url.url",
        ),
    ];
    for (body, field) in wrong_cases {
        assert!(wrong(field)(&run(Chat, body)), "{body}");
    }
}

#[test]
fn trusted_rescan_handles_backslash_runs_before_quotes() {
    // Content-part arrays are walked a second time by a scanner that finds string
    // ends by the parity of the backslashes before a quote.
    for n in 0..7 {
        let s = format!("a{}\\\"b{}", "\\\\".repeat(n), "\\\\".repeat(n));
        let other = format!(r#"{{"type":"other","v":["{s}"]}}"#);
        let body = format!(
            r#"{{"messages":[{{"role":"u","content":[{{"x":"{s}","text":"{s}","type":"text"}},{{"type":"image_url","image_url":{{"d":"{s}","url":"{s}"}}}},{other}]}}]}}"#
        );
        assert!(serde_accepts(body.as_bytes()), "{body}");
        let expected = format!("u\x1F{s}\x1D{s}\x1D{other}\x1D\x1E");
        assert_eq!(key(Chat, &body), expected.as_bytes(), "{body}");
    }
}

// ---- validation ------------------------------------------------------------------

#[test]
fn not_an_object() {
    for body in [
        "",
        "   ",
        "[]",
        "\"x\"",
        "null",
        "1",
        "[{\"prompt\":\"x\"}]",
        "\u{feff}{}",
        "x{}",
    ] {
        for ep in Endpoint::ALL {
            assert_eq!(run(ep, body), Err(PromptError::NotAnObject), "{body:?}");
        }
    }
}

/// Bodies that are not valid JSON (or that serde_json rejects for other reasons).
const INVALID: &[&str] = &[
    r#"{"prompt":"x""#,
    r#"{"prompt":"x"#,
    r#"{"prompt":"x\"}"#,
    r#"{"prompt":"x"}}"#,
    r#"{"prompt":"x"} x"#,
    r#"{"prompt":"x"}{}"#,
    r#"{"prompt":"x",}"#,
    r#"{"prompt":"x",,"a":1}"#,
    r#"{"prompt" "x"}"#,
    r#"{"prompt":"x" "a":1}"#,
    r#"{"prompt":}"#,
    r#"{"prompt"}"#,
    r#"{,"prompt":"x"}"#,
    r#"{prompt:"x"}"#,
    r#"{'prompt':'x'}"#,
    r#"{"prompt":"x",/*c*/"a":1}"#,
    r#"{"prompt":"x","a":[1,2}"#,
    r#"{"prompt":"x","a":[1,2]]}"#,
    r#"{"prompt":"x","a":{"b":1]}"#,
    r#"{"prompt":"x","a":[1,]}"#,
    r#"{"prompt":"x","a":[,1]}"#,
    r#"{"prompt":"x","a":{"b"}}"#,
    r#"{"prompt":"x","a":{"b":1,}}"#,
    r#"{"prompt":"x","a":{1:2}}"#,
    r#"{"prompt":"x","a":tru}"#,
    r#"{"prompt":"x","a":True}"#,
    r#"{"prompt":"x","a":nul}"#,
    r#"{"prompt":"x","a":nulll}"#,
    r#"{"prompt":"x","a":falsey}"#,
    r#"{"prompt":"x","a":NaN}"#,
    r#"{"prompt":"x","a":Infinity}"#,
    r#"{"prompt":"x","a":-Infinity}"#,
    r#"{"prompt":"x","a":01}"#,
    r#"{"prompt":"x","a":-01}"#,
    r#"{"prompt":"x","a":1.}"#,
    r#"{"prompt":"x","a":.5}"#,
    r#"{"prompt":"x","a":+1}"#,
    r#"{"prompt":"x","a":-}"#,
    r#"{"prompt":"x","a":1e}"#,
    r#"{"prompt":"x","a":1e+}"#,
    r#"{"prompt":"x","a":1.e5}"#,
    r#"{"prompt":"x","a":0x10}"#,
    r#"{"prompt":"x","a":1e400}"#,
    r#"{"prompt":"x","a":-1e400}"#,
    r#"{"prompt":"x","a":1.8e308}"#,
    r#"{"prompt":"x","a":1e99999999999}"#,
    r#"{"prompt":"a\qb"}"#,
    r#"{"prompt":"a\x41"}"#,
    r#"{"prompt":"a\u12"}"#,
    r#"{"prompt":"a\u12G4"}"#,
    r#"{"prompt":"a\U0041"}"#,
    r#"{"prompt":"\ud800"}"#,
    r#"{"prompt":"\ud800x"}"#,
    r#"{"prompt":"\ud800\n"}"#,
    r#"{"prompt":"\ud800\u0041"}"#,
    r#"{"prompt":"\ud800\ud800"}"#,
    r#"{"prompt":"\udc00"}"#,
    r#"{"prompt":"\udfff\ud800"}"#,
    r#"{"pr\ud800ompt":"x"}"#,
    r#"{"prompt":"x","model":"\ud83d"}"#,
    "{\"prompt\":\"a\nb\"}",
    "{\"prompt\":\"a\tb\"}",
    "{\"prompt\":\"a\u{0}b\"}",
    "{\"prompt\":\"a\u{1f}b\"}",
    "{\"prompt\":\"x\",\"a\":\"\u{1}\"}",
    "{\"pr\u{1}ompt\":\"x\"}",
    "{\"prompt\":\"x\"\u{0}}",
    "{\"prompt\":\"x\"}\u{c}",
    "{\"prompt\":\"x\"}\u{a0}",
    "{\u{a0}\"prompt\":\"x\"}",
    "{\"prompt\":\"x\"}\u{feff}",
    "{",
    "{\"",
    "{\"prompt\"",
    "{\"prompt\":",
    "{\"prompt\":\"x\"",
    "{\"prompt\":\"x\",",
    "{\"prompt\":\"x\\",
];

#[test]
fn invalid_json_is_rejected_like_serde() {
    for body in INVALID {
        assert!(
            !serde_accepts(body.as_bytes()),
            "serde_json accepts {body:?}"
        );
        for ep in Endpoint::ALL {
            let r = run(ep, body);
            assert!(
                matches!(r, Err(PromptError::Malformed { .. })),
                "{ep:?} {body:?}: {r:?}"
            );
        }
    }
}

#[test]
fn invalid_utf8_is_rejected() {
    for bad in [
        &b"\xff"[..],
        b"\xc3",
        b"\xc3(",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        b"\xe2\x82",
    ] {
        for (pre, post) in [
            (&b"{\"prompt\":\""[..], &b"\"}"[..]),
            (b"{\"prompt\":\"\",\"x\":[\"a", b"\"]}"),
            (b"{\"", b"\":1,\"prompt\":\"\"}"),
            (b"{\"prompt\":\"\"}", b""),
            (b"{\"prompt\":\"\",", b"\"a\":1}"),
        ] {
            let body = [pre, bad, post].concat();
            assert!(!serde_accepts(&body));
            for ep in Endpoint::ALL {
                assert!(extract(ep, &body).is_err(), "{body:?}");
            }
        }
    }
    // Valid multi-byte UTF-8 anywhere in strings is fine.
    let body = "{\"prompt\":\"é東😀\",\"é\":[\"😀\"]}";
    assert_eq!(key(Completions, body), "é東😀".as_bytes());
}

/// Valid JSON that exercises the edges of the grammar; serde_json accepts all of it.
const VALID: &[&str] = &[
    r#"{"prompt":"","a":[]}"#,
    r#"{"prompt":"","a":{}}"#,
    r#"{"prompt":"","a":[[],{},[{}],{"":[]}]}"#,
    r#"{"prompt":"","":""}"#,
    r#"{"prompt":"","a":[true,false,null]}"#,
    r#"{"prompt":"","a":[0,-0,0.0,-0.0,0e0,0E+0,0e-0,1,-1,12.5e3,1E-7,-1.5e+10]}"#,
    r#"{"prompt":"","a":[18446744073709551615,18446744073709551616,-9223372036854775809]}"#,
    r#"{"prompt":"","a":[1e308,1.7976931348623157e308,-1.7976931348623157e308]}"#,
    r#"{"prompt":"","a":[1e-400,0e999999999999999,0.0e400,1e-99999999999]}"#,
    r#"{"prompt":"","a":[123456789012345678901234567890e-10]}"#,
    r#"{"prompt":"","a":"\u0000\u001f\u007f\uffff\uFFFF\ud800\udc00\uDBFF\uDFFF"}"#,
    r#"{"prompt":"","a":"\"\\\/\b\f\n\r\t"}"#,
    "{\"prompt\":\"\",\"a\":\"\u{7f}\u{80}\u{10ffff}\"}",
    " \t\r\n{ \t\r\n\"prompt\" \t\r\n: \t\r\n\"\" \t\r\n} \t\r\n",
];

#[test]
fn valid_json_edges_are_accepted() {
    for body in VALID {
        assert!(
            serde_accepts(body.as_bytes()),
            "serde_json rejects {body:?}"
        );
        let r = run(Completions, body);
        assert!(r.is_ok(), "{body:?}: {r:?}");
    }
}

#[test]
fn nesting_limit_matches_serde() {
    // serde_json allows 127 nested arrays/objects, the top-level object included.
    for n in 120..=130usize {
        let arrays = format!("{}{}", "[".repeat(n - 1), "]".repeat(n - 1));
        let objects = format!("{}1{}", r#"{"a":"#.repeat(n - 1), "}".repeat(n - 1));
        for inner in [arrays, objects] {
            let body = format!(r#"{{"prompt":[],"x":{inner}}}"#);
            let ok = run(Completions, &body).is_ok();
            assert_eq!(ok, serde_accepts(body.as_bytes()), "n={n} {body}");
            assert_eq!(ok, n <= 127, "n={n}");
        }
    }
    let deep = format!(r#"{{"prompt":{}1{}}}"#, "[".repeat(200), "]".repeat(200));
    assert!(matches!(
        run(Completions, &deep),
        Err(PromptError::Malformed { .. })
    ));
    // Deep nesting that is also unbalanced does not overflow anything.
    let junk = "[".repeat(100_000);
    assert!(run(Completions, &format!(r#"{{"prompt":{junk}"#)).is_err());
}

#[test]
fn number_range_matches_serde() {
    let numbers = [
        "1e308",
        "1e309",
        "9e307",
        "1.7976931348623157e308",
        "1.7976931348623158e308",
        "1.7976931348623159e308",
        "17976931348623157e292",
        "17976931348623159e292",
        "179769313486231570000000000000000000000e270",
        "0.17976931348623157e309",
        "18446744073709551615e289",
        "18446744073709551616e289",
        "18446744073709551616e290",
        "1844674407370955161.5e290",
        "1844674407370955161.6e290",
        "-1e309",
        "0e309",
        "0.000e999999",
        "1e2147483647",
        "1e2147483648",
        "0e2147483648",
        "1e-2147483648",
        "1e+000000000000000000000000308",
        "1e+000000000000000000000000309",
    ];
    let long_int = format!("1{}", "0".repeat(308));
    let longer_int = format!("1{}", "0".repeat(309));
    let long_frac = format!("1{}.5", "0".repeat(307));
    for n in numbers
        .iter()
        .copied()
        .chain([&*long_int, &*longer_int, &*long_frac])
    {
        let body = format!(r#"{{"prompt":"","n":{n}}}"#);
        assert_eq!(
            run(Completions, &body).is_ok(),
            serde_accepts(body.as_bytes()),
            "{n}"
        );
    }
}

#[test]
fn malformed_offsets_point_at_the_problem() {
    let at = |body: &str| match run(Completions, body) {
        Err(PromptError::Malformed { offset, .. }) => offset,
        other => panic!("{body}: {other:?}"),
    };
    assert_eq!(at(r#"{"prompt":"x",}"#), 14);
    assert_eq!(at(r#"{"prompt":"a\qb"}"#), 12);
    assert_eq!(at("{\"prompt\":\"a\u{1}\"}"), 12);
    assert_eq!(at(r#"{"prompt":"x"} x"#), 15);
    assert_eq!(at(r#"{"prompt":tru}"#), 10);
    assert_eq!(at(r#"{"prompt":"x""#), 13);
    assert_eq!(at(r#"{"prompt":"x"#), 12);
}

#[test]
fn error_messages_are_readable() {
    assert_eq!(
        PromptError::NotAnObject.to_string(),
        "request body must be a JSON object"
    );
    assert_eq!(
        PromptError::Malformed {
            offset: 7,
            what: "invalid number"
        }
        .to_string(),
        "malformed JSON at byte 7: invalid number"
    );
    assert_eq!(
        PromptError::MissingField("prompt").to_string(),
        "missing required field `prompt`"
    );
    assert_eq!(
        PromptError::WrongType {
            field: "model",
            expected: "a string"
        }
        .to_string(),
        "field `model` must be a string"
    );
    let err = run(Completions, r#"{"prompt":"x",}"#).unwrap_err();
    assert_eq!(
        err.to_string(),
        "malformed JSON at byte 14: expected a string key"
    );
    let err = run(Completions, r#"{"prompt":"x""#).unwrap_err();
    assert_eq!(
        err.to_string(),
        "malformed JSON at byte 13: unexpected end of input"
    );
    let err = run(Completions, r#"{"prompt":5}"#).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("field `prompt` must be a string, an array of strings")
    );
}

#[test]
fn long_prompts_with_escapes_everywhere() {
    // Escapes at every alignment relative to the scanner's 64-byte chunks.
    for gap in [1, 2, 3, 7, 31, 32, 33, 63, 64, 65, 1000] {
        let mut s = String::new();
        let mut i = 0;
        while s.len() < 100_000 {
            s.push_str(["\\n", "\\\"", "\\\\", "\\u00e9", "\\ud83d\\ude00", "é"][i % 6]);
            s.push_str(&"x".repeat(gap));
            i += 1;
        }
        let body = format!(r#"{{"model":"m","prompt":"{s}","after":"\\"}}"#);
        let r = run(Completions, &body).unwrap();
        assert_eq!(&*r.key, s.as_bytes());
        assert!(matches!(r.key, Cow::Borrowed(_)));
        let chat = format!(r#"{{"messages":[{{"role":"u","content":"{s}"}}]}}"#);
        assert_eq!(key(Chat, &chat), format!("u\x1F{s}\x1E").as_bytes());
        // A control character far into the string is still found.
        let bad = body.replacen("xxx", "x\u{1}x", 1);
        if bad != body {
            assert!(run(Completions, &bad).is_err());
        }
    }
}

#[test]
fn bad_bytes_are_found_at_every_position_of_long_strings() {
    // Every offset relative to the 64-byte chunks of the ASCII fast path.
    for len in [1, 63, 64, 65, 127, 128, 129, 200] {
        for p in 0..len {
            for bad in [
                &b"\x00"[..],
                b"\x1f",
                b"\n",
                b"\xff",
                b"\x80",
                b"\xc3",
                b"\xed\xa0\x80",
            ] {
                let mut s = vec![b'a'; len];
                s.splice(p..=p, bad.iter().copied());
                let body = [&b"{\"prompt\":\""[..], &s, b"\"}"].concat();
                assert!(!serde_accepts(&body));
                assert!(
                    matches!(
                        extract(Completions, &body),
                        Err(PromptError::Malformed { .. })
                    ),
                    "len {len} pos {p} byte {bad:?}"
                );
            }
            let mut s = vec![b'a'; len];
            s.splice(p..=p, "é".bytes());
            let body = [&b"{\"prompt\":\""[..], &s, b"\"}"].concat();
            assert_eq!(&*extract(Completions, &body).unwrap().key, &s[..]);
        }
    }
}

#[test]
fn endpoint_field_names() {
    assert_eq!(Completions.prompt_field(), "prompt");
    assert_eq!(Chat.prompt_field(), "messages");
    assert_eq!(Embeddings.prompt_field(), "input");
    assert_eq!(Responses.prompt_field(), "input");
}

// ---- Embeddings, Responses, conversation prefix -------------------------------

#[test]
fn embeddings_input_is_keyed_like_a_prompt() {
    for input in [
        r#""some text""#,
        r#"["a","b"]"#,
        "[1, 23]",
        "[[1],[2,3]]",
        "[]",
    ] {
        let e = format!(r#"{{"model":"e","input":{input}}}"#);
        let c = format!(r#"{{"model":"e","prompt":{input}}}"#);
        assert_eq!(run(Embeddings, &e), run(Completions, &c), "{input}");
    }
    assert!(wrong("input")(&run(Embeddings, r#"{"input":[{"a":1}]}"#)));
    assert!(wrong("input")(&run(Embeddings, r#"{"input":3.5}"#)));
    assert_eq!(
        run(Embeddings, r#"{"prompt":"x"}"#),
        Err(PromptError::MissingField("input"))
    );
}

#[test]
fn responses_items_are_keyed_like_messages() {
    let body = r#"{"model":"m","instructions":"be brief","input":[
        {"role":"system","content":"sys"},
        {"type":"message","role":"user","content":[{"type":"input_text","text":"hi"},{"type":"input_image","image_url":"u"}]},
        {"type":"function_call","call_id":"c1","name":"f","arguments":"{}"},
        {"role":"assistant","content":[{"type":"output_text","text":"yo"}]}
    ]}"#;
    let r = run(Responses, body).unwrap();
    let mut want =
        b"system\x1fsys\x1euser\x1fhi\x1d{\"type\":\"input_image\",\"image_url\":\"u\"}\x1d\x1e"
            .to_vec();
    let user_end = want.len();
    want.extend_from_slice(
        b"{\"type\":\"function_call\",\"call_id\":\"c1\",\"name\":\"f\",\"arguments\":\"{}\"}\x1eassistant\x1fyo\x1d\x1e",
    );
    assert_eq!(
        String::from_utf8_lossy(&r.key),
        String::from_utf8_lossy(&want)
    );
    assert_eq!(r.conversation, user_end);
    // A string input is borrowed, like a prompt.
    let r = run(Responses, r#"{"input":"hello"}"#).unwrap();
    assert!(matches!(r.key, Cow::Borrowed(b"hello")));
    assert_eq!(r.conversation, 5);
    // Items do not mix with other elements; roles must be strings.
    assert!(wrong("input")(&run(
        Responses,
        r#"{"input":[{"role":"user"},"x"]}"#
    )));
    assert!(wrong("input[].role")(&run(
        Responses,
        r#"{"input":[{"role":1}]}"#
    )));
    assert!(wrong("input[].content")(&run(
        Responses,
        r#"{"input":[{"role":"user","content":5}]}"#
    )));
}

#[test]
fn the_system_part_and_an_opening_reply_are_found_in_chat_keys() {
    let chat = |messages: Value| {
        let body = serde_json::json!({"model": "m", "messages": messages}).to_string();
        let input = extract(Endpoint::ChatCompletions, body.as_bytes()).expect("valid");
        (input.key.to_vec(), input.conversation)
    };
    let (key, conversation) = chat(serde_json::json!([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "bye"},
    ]));
    let system = preamble_len(&key[..conversation]).expect("a system part");
    assert_eq!(&key[..system], b"system\x1fbe brief\x1e");
    let reply = opening_reply_len(&key[conversation..]);
    assert_eq!(
        &key[conversation..conversation + reply],
        b"assistant\x1fhello there\x1e"
    );
    // No system message; a user turn is no reply.
    let (key, conversation) = chat(serde_json::json!([{"role": "user", "content": "hi"}]));
    assert_eq!(preamble_len(&key[..conversation]), None);
    assert_eq!(opening_reply_len(&key), 0);
}

#[test]
fn conversation_prefix_ends_after_the_first_user_message() {
    let body = |msgs: &str| format!(r#"{{"model":"m","messages":[{msgs}]}}"#);
    let sys = r#"{"role":"system","content":"You are helpful."}"#;
    let one = body(&format!(r#"{sys},{{"role":"user","content":"first"}}"#));
    let three = body(&format!(
        r#"{sys},{{"role":"user","content":"first"}},{{"role":"assistant","content":"a"}},{{"role":"user","content":"more"}}"#
    ));
    let other = body(&format!(r#"{sys},{{"role":"user","content":"second"}}"#));
    let (one, three, other) = (
        run(Chat, &one).unwrap(),
        run(Chat, &three).unwrap(),
        run(Chat, &other).unwrap(),
    );
    assert_eq!(one.conversation, one.key.len());
    assert_eq!(three.conversation, one.conversation);
    assert_eq!((one.later_turns, three.later_turns), (false, true));
    assert_eq!(&three.key[..three.conversation], &one.key[..]);
    assert_ne!(
        &other.key[..other.conversation],
        &one.key[..one.conversation]
    );
    // No user message: the whole key. An escaped role does not count.
    for msgs in [
        sys.to_owned(),
        format!(r#"{{"role":"us\u0065r","content":"x"}},{sys}"#),
    ] {
        let b = body(&msgs);
        let r = run(Chat, &b).unwrap();
        assert_eq!(r.conversation, r.key.len(), "{msgs}");
    }
}

#[test]
fn flat_prompts_name_their_conversation_by_a_bounded_prefix() {
    let short = run(Completions, r#"{"prompt":"short"}"#).unwrap();
    assert_eq!(short.conversation, 5);
    let long = format!(
        r#"{{"prompt":"{}"}}"#,
        "x".repeat(3 * FLAT_CONVERSATION_BYTES)
    );
    let long = run(Completions, &long).unwrap();
    assert_eq!(long.conversation, FLAT_CONVERSATION_BYTES);
    // Longer than its conversation prefix, but without turns.
    assert!(!long.later_turns);
    let ids = run(Embeddings, r#"{"input":[1,2,3]}"#).unwrap();
    assert_eq!(ids.conversation, 6);
    assert_eq!(run(Chat, r#"{"messages":[]}"#).unwrap().conversation, 0);
}

// ---- property tests against serde_json --------------------------------------------

/// A JSON document as generated: object members keep their order and duplicates.
#[derive(Clone, Debug)]
enum Node {
    Null,
    Bool(bool),
    /// The number's JSON text (always valid and in range for serde_json).
    Num(String),
    Str(String),
    Arr(Vec<Node>),
    Obj(Vec<(String, Node)>),
}

/// What the oracle sees: a value plus its exact JSON text in the body.
#[derive(Clone, Debug)]
struct On {
    json: Vec<u8>,
    v: Ov,
}

#[derive(Clone, Debug)]
enum Ov {
    Null,
    Bool(bool),
    Num {
        is_u64: bool,
    },
    /// `raw`: the bytes between the quotes as written.
    Str {
        val: String,
        raw: Vec<u8>,
    },
    Arr(Vec<On>),
    Obj(Vec<(String, On)>),
}

/// The outcome of `extract`, comparable with the oracle's.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Ok {
        model: Option<String>,
        key: Vec<u8>,
        conversation: usize,
        later_turns: bool,
    },
    NotAnObject,
    Malformed,
    Missing(&'static str),
    Wrong(&'static str),
}

impl Outcome {
    /// The outcome with the key bytes dropped (for bodies whose raw forms the
    /// oracle cannot know).
    fn coarse(self) -> Self {
        match self {
            Self::Ok { model, .. } => Self::Ok {
                model,
                key: Vec::new(),
                conversation: 0,
                later_turns: false,
            },
            other => other,
        }
    }
}

fn outcome(r: &Result<RoutingInput<'_>, PromptError>) -> Outcome {
    match r {
        Ok(ri) => Outcome::Ok {
            model: ri.model.as_deref().map(str::to_owned),
            key: ri.key.to_vec(),
            conversation: ri.conversation,
            later_turns: ri.later_turns,
        },
        Err(PromptError::NotAnObject) => Outcome::NotAnObject,
        Err(PromptError::Malformed { .. }) => Outcome::Malformed,
        Err(PromptError::MissingField(f)) => Outcome::Missing(f),
        Err(PromptError::WrongType { field, .. }) => Outcome::Wrong(field),
    }
}

/// Oracle input from a parsed `Value`: raw forms are serde_json's compact
/// serialization, which is exactly the body when the body is `to_vec(value)`.
fn on_from_value(v: &Value) -> On {
    let json = serde_json::to_vec(v).unwrap();
    let v = match v {
        Value::Null => Ov::Null,
        Value::Bool(b) => Ov::Bool(*b),
        Value::Number(n) => Ov::Num { is_u64: n.is_u64() },
        Value::String(s) => Ov::Str {
            val: s.clone(),
            raw: json[1..json.len() - 1].to_vec(),
        },
        Value::Array(a) => Ov::Arr(a.iter().map(on_from_value).collect()),
        Value::Object(m) => Ov::Obj(
            m.iter()
                .map(|(k, v)| (k.clone(), on_from_value(v)))
                .collect(),
        ),
    };
    On { json, v }
}

/// The `Value` serde_json must parse from a serialized `On` (last duplicate wins).
fn on_to_value(on: &On) -> Value {
    match &on.v {
        Ov::Null => Value::Null,
        Ov::Bool(b) => Value::Bool(*b),
        Ov::Num { .. } => serde_json::from_slice(&on.json).unwrap(),
        Ov::Str { val, .. } => Value::String(val.clone()),
        Ov::Arr(a) => Value::Array(a.iter().map(on_to_value).collect()),
        Ov::Obj(m) => {
            let mut map = serde_json::Map::new();
            for (k, v) in m {
                map.insert(k.clone(), on_to_value(v));
            }
            Value::Object(map)
        }
    }
}

fn node_to_value(n: &Node) -> Value {
    match n {
        Node::Null => Value::Null,
        Node::Bool(b) => Value::Bool(*b),
        Node::Num(t) => serde_json::from_str(t).unwrap(),
        Node::Str(s) => Value::String(s.clone()),
        Node::Arr(a) => Value::Array(a.iter().map(node_to_value).collect()),
        Node::Obj(m) => {
            let mut map = serde_json::Map::new();
            for (k, v) in m {
                map.insert(k.clone(), node_to_value(v));
            }
            Value::Object(map)
        }
    }
}

fn last<'a>(members: &'a [(String, On)], name: &str) -> Option<&'a On> {
    members
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// The expected outcome of `extract(ep, body)` for a valid body parsed as `doc`.
fn oracle(ep: Endpoint, doc: &On) -> Outcome {
    let Ov::Obj(top) = &doc.v else {
        return Outcome::NotAnObject;
    };
    let model = match last(top, "model").map(|m| &m.v) {
        None => None,
        Some(Ov::Str { val, .. }) => Some(val.clone()),
        Some(_) => return Outcome::Wrong("model"),
    };
    let field = ep.prompt_field();
    let Some(p) = last(top, field) else {
        return Outcome::Missing(field);
    };
    let key = match ep {
        Completions => oracle_prompt(p, "prompt", false),
        Embeddings => oracle_prompt(p, "input", false),
        Responses => oracle_prompt(p, "input", true),
        Chat => oracle_messages(p),
    };
    match key {
        Ok((key, turns)) => Outcome::Ok {
            conversation: turns.unwrap_or(FLAT_CONVERSATION_BYTES).min(key.len()),
            later_turns: turns.is_some_and(|turns| turns < key.len()),
            model,
            key,
        },
        Err(e) => e,
    }
}

/// A key, and for prompts made of turns the length of the conversation prefix.
type OracleKey = Result<(Vec<u8>, Option<usize>), Outcome>;

fn oracle_prompt(p: &On, field: &'static str, items: bool) -> OracleKey {
    let wrong = || Outcome::Wrong(field);
    let token = |n: &On, out: &mut Vec<u8>| match n.v {
        Ov::Num { is_u64: true } => {
            out.extend_from_slice(&n.json);
            out.push(b',');
            Ok(())
        }
        _ => Err(wrong()),
    };
    let elements = match &p.v {
        Ov::Str { raw, .. } => return Ok((raw.clone(), None)),
        Ov::Arr(elements) => elements,
        _ => return Err(wrong()),
    };
    let mut out = Vec::new();
    match elements.first().map(|i| &i.v) {
        Some(Ov::Obj(_)) if items => {
            let mut first_user = None;
            for it in elements {
                let Ov::Obj(members) = &it.v else {
                    return Err(wrong());
                };
                if last(members, "role").is_none() {
                    out.extend_from_slice(&it.json);
                    out.push(RECORD_SEP);
                    continue;
                }
                let user = oracle_message(members, &RESPONSES_PATHS, false, &mut out)?;
                if user && first_user.is_none() {
                    first_user = Some(out.len());
                }
            }
            return Ok((out.clone(), Some(first_user.unwrap_or(out.len()))));
        }
        None => {}
        Some(Ov::Str { .. }) => {
            for it in elements {
                let Ov::Str { raw, .. } = &it.v else {
                    return Err(wrong());
                };
                out.extend_from_slice(raw);
                out.push(RECORD_SEP);
            }
        }
        Some(Ov::Num { .. }) => {
            for it in elements {
                token(it, &mut out)?;
            }
        }
        Some(Ov::Arr(_)) => {
            for it in elements {
                let Ov::Arr(inner) = &it.v else {
                    return Err(wrong());
                };
                for t in inner {
                    token(t, &mut out)?;
                }
                out.push(RECORD_SEP);
            }
        }
        Some(_) => return Err(wrong()),
    }
    Ok((out, None))
}

fn oracle_messages(p: &On) -> OracleKey {
    let Ov::Arr(messages) = &p.v else {
        return Err(Outcome::Wrong("messages"));
    };
    let mut out = Vec::new();
    let mut first_user = None;
    for m in messages {
        let Ov::Obj(members) = &m.v else {
            return Err(Outcome::Wrong("messages"));
        };
        let user = oracle_message(members, &CHAT_PATHS, true, &mut out)?;
        if user && first_user.is_none() {
            first_user = Some(out.len());
        }
    }
    let conversation = first_user.unwrap_or(out.len());
    Ok((out, Some(conversation)))
}

/// Appends one message; true if its role is written `user`.
fn oracle_message(
    members: &[(String, On)],
    paths: &MessagePaths,
    tool_calls: bool,
    out: &mut Vec<u8>,
) -> Result<bool, Outcome> {
    let role = last(members, "role").ok_or(Outcome::Missing(paths.role))?;
    let Ov::Str { raw, .. } = &role.v else {
        return Err(Outcome::Wrong(paths.role));
    };
    let user = raw == b"user";
    out.extend_from_slice(raw);
    out.push(ROLE_SEP);
    match last(members, "content").map(|c| &c.v) {
        None | Some(Ov::Null) => {}
        Some(Ov::Str { raw, .. }) => out.extend_from_slice(raw),
        Some(Ov::Arr(parts)) => {
            for part in parts {
                oracle_part(part, paths, out)?;
                out.push(PART_SEP);
            }
        }
        Some(_) => return Err(Outcome::Wrong(paths.content)),
    }
    if tool_calls
        && let Some(tc) = last(members, "tool_calls")
        && !matches!(tc.v, Ov::Null)
    {
        out.extend_from_slice(&tc.json);
    }
    out.push(RECORD_SEP);
    Ok(user)
}

fn oracle_part(part: &On, paths: &MessagePaths, out: &mut Vec<u8>) -> Result<(), Outcome> {
    let Ov::Obj(members) = &part.v else {
        out.extend_from_slice(&part.json);
        return Ok(());
    };
    let ty = match last(members, "type").map(|t| &t.v) {
        Some(Ov::Str { val, .. }) => val.as_str(),
        _ => "",
    };
    let raw_string = |v: &On, field| match &v.v {
        Ov::Str { raw, .. } => Ok(raw.clone()),
        _ => Err(Outcome::Wrong(field)),
    };
    let is_text = paths.part_types[..paths.text_types].contains(&ty);
    let is_image = ty == "image_url";
    if is_text {
        let text = last(members, "text").ok_or(Outcome::Missing(paths.text))?;
        out.extend(raw_string(text, paths.text)?);
    } else if is_image {
        let image = last(members, "image_url").ok_or(Outcome::Missing(paths.image_url))?;
        let url = match &image.v {
            Ov::Str { .. } => image,
            Ov::Obj(m) => last(m, "url").ok_or(Outcome::Missing(paths.url))?,
            _ => return Err(Outcome::Wrong(paths.image_url)),
        };
        out.extend(raw_string(url, paths.url)?);
    } else {
        out.extend_from_slice(&part.json);
    }
    Ok(())
}

// -- generators

const NAMES: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "role",
    "content",
    "tool_calls",
    "type",
    "text",
    "image_url",
    "url",
    "metadata",
    "input",
    "input_text",
];

fn text() -> BoxedStrategy<String> {
    let tricky = prop::sample::select(vec![
        '"',
        '\\',
        '/',
        '\n',
        '\t',
        '\r',
        '\u{0}',
        '\u{8}',
        '\u{c}',
        '\u{1f}',
        '\u{7f}',
        '\u{80}',
        'é',
        '€',
        '😀',
        '\u{2028}',
        '\u{feff}',
        '\u{10ffff}',
        'a',
        ' ',
        '{',
        '[',
        ':',
        ',',
        'u',
    ]);
    prop_oneof![
        3 => "[a-z ]{0,12}",
        1 => prop::sample::select(NAMES).prop_map(str::to_owned),
        1 => prop::sample::select(vec![
            r#""prompt":"decoy""#,
            r#"{"model":"decoy"}"#,
            r#"\"prompt\"#,
            "text",
            "image_url",
            "user",
            "",
        ])
        .prop_map(str::to_owned),
        2 => prop::collection::vec(any::<char>(), 0..6).prop_map(|v| v.into_iter().collect()),
        2 => prop::collection::vec(tricky, 0..10).prop_map(|v| v.into_iter().collect()),
    ]
    .boxed()
}

fn key_name() -> BoxedStrategy<String> {
    prop_oneof![2 => prop::sample::select(NAMES).prop_map(str::to_owned), 3 => text()].boxed()
}

fn number() -> BoxedStrategy<String> {
    prop_oneof![
        any::<u32>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| serde_json::to_string(&f).unwrap()),
        "-?(0|[1-9][0-9]{0,24})(\\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?"
            .prop_filter("in range for serde_json", |t| {
                serde_json::from_str::<Value>(t).is_ok()
            }),
    ]
    .boxed()
}

fn token() -> BoxedStrategy<Node> {
    prop_oneof![
        4 => (0u32..200_000).prop_map(|n| Node::Num(n.to_string())),
        1 => any::<u64>().prop_map(|n| Node::Num(n.to_string())),
        1 => Just(Node::Num(u64::MAX.to_string())),
    ]
    .boxed()
}

fn leaf() -> BoxedStrategy<Node> {
    prop_oneof![
        Just(Node::Null),
        any::<bool>().prop_map(Node::Bool),
        number().prop_map(Node::Num),
        text().prop_map(Node::Str),
    ]
    .boxed()
}

/// Any JSON value, with keys that are often the interesting names (decoys).
fn node() -> BoxedStrategy<Node> {
    leaf()
        .prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Node::Arr),
                prop::collection::vec((key_name(), inner), 0..4).prop_map(Node::Obj),
            ]
        })
        .boxed()
}

fn prompt_value() -> BoxedStrategy<Node> {
    prop_oneof![
        4 => text().prop_map(Node::Str),
        2 => prop::collection::vec(text().prop_map(Node::Str), 0..4).prop_map(Node::Arr),
        2 => prop::collection::vec(token(), 0..6).prop_map(Node::Arr),
        2 => prop::collection::vec(prop::collection::vec(token(), 0..4).prop_map(Node::Arr), 0..3)
            .prop_map(Node::Arr),
        1 => prop::collection::vec(prop_oneof![token(), leaf()], 1..4).prop_map(Node::Arr),
        1 => node(),
    ]
    .boxed()
}

/// Object members in random order, with occasional extra (possibly duplicate) ones.
fn shuffled(
    members: Vec<Option<(String, Node)>>,
    extra: Vec<(String, Node)>,
) -> BoxedStrategy<Node> {
    let mut all: Vec<_> = members.into_iter().flatten().collect();
    all.extend(extra);
    Just(all).prop_shuffle().prop_map(Node::Obj).boxed()
}

fn extras(max: usize) -> BoxedStrategy<Vec<(String, Node)>> {
    prop::collection::vec(
        (prop_oneof![4 => "[a-z_]{1,8}", 1 => key_name()], node()),
        0..max,
    )
    .boxed()
}

fn part() -> BoxedStrategy<Node> {
    let s = |x: &str| Node::Str(x.to_owned());
    let text_type = prop::sample::select(vec!["text", "text", "input_text", "output_text"]);
    let text_part = (text(), extras(2), text_type).prop_flat_map(move |(t, ex, ty)| {
        shuffled(
            vec![
                Some(("type".into(), s(ty))),
                Some(("text".into(), Node::Str(t))),
            ],
            ex,
        )
    });
    let image_url = prop_oneof![
        2 => text().prop_map(Node::Str),
        3 => (text(), prop::option::of(text())).prop_map(|(u, d)| {
            let mut m = vec![("url".to_owned(), Node::Str(u))];
            m.extend(d.map(|d| ("detail".to_owned(), Node::Str(d))));
            Node::Obj(m)
        }),
        1 => node(),
    ];
    let image_part = (image_url, extras(2)).prop_flat_map(move |(iu, ex)| {
        shuffled(
            vec![
                Some(("type".into(), s("image_url"))),
                Some(("image_url".into(), iu)),
            ],
            ex,
        )
    });
    let other_part = (node(), extras(2)).prop_flat_map(move |(v, ex)| {
        shuffled(
            vec![
                Some(("type".into(), s("input_audio"))),
                Some(("input_audio".into(), v)),
            ],
            ex,
        )
    });
    prop_oneof![4 => text_part, 2 => image_part, 1 => other_part, 1 => node()].boxed()
}

fn message() -> BoxedStrategy<Node> {
    let role = prop_oneof![
        4 => prop::sample::select(vec!["system", "user", "assistant", "tool"]).prop_map(|r| Node::Str(r.into())),
        1 => text().prop_map(Node::Str),
        1 => leaf(),
    ];
    let content = prop_oneof![
        4 => text().prop_map(Node::Str),
        3 => prop::collection::vec(part(), 0..4).prop_map(Node::Arr),
        1 => Just(Node::Null),
        1 => node(),
    ];
    let tool_calls = prop_oneof![Just(Node::Null), node()];
    (
        prop::option::weighted(0.95, role),
        prop::option::weighted(0.9, content),
        prop::option::weighted(0.2, tool_calls),
        extras(2),
    )
        .prop_flat_map(|(role, content, tool_calls, ex)| {
            shuffled(
                vec![
                    role.map(|v| ("role".to_owned(), v)),
                    content.map(|v| ("content".to_owned(), v)),
                    tool_calls.map(|v| ("tool_calls".to_owned(), v)),
                ],
                ex,
            )
        })
        .boxed()
}

/// A request body: `model`, `prompt` and `messages` (each usually well-formed,
/// sometimes not), extra fields with nested decoys, in random order.
fn document() -> BoxedStrategy<Node> {
    let model = prop_oneof![9 => text().prop_map(Node::Str), 1 => node()];
    let messages =
        prop_oneof![6 => prop::collection::vec(message(), 0..4).prop_map(Node::Arr), 1 => node()];
    let input = prop_oneof![
        4 => prompt_value(),
        4 => prop::collection::vec(message(), 0..4).prop_map(Node::Arr),
        1 => prop::collection::vec(prop_oneof![message(), node()], 1..4).prop_map(Node::Arr),
    ];
    let decoy = prop::option::weighted(
        0.3,
        (text(), text()).prop_map(|(p, m)| {
            Node::Obj(vec![
                ("prompt".into(), Node::Str(p)),
                ("model".into(), Node::Str(m)),
                ("messages".into(), Node::Arr(vec![])),
            ])
        }),
    );
    (
        prop::option::weighted(0.85, model),
        prop::option::weighted(0.85, prompt_value()),
        prop::option::weighted(0.85, messages),
        prop::option::weighted(0.85, input),
        decoy,
        extras(4),
    )
        .prop_flat_map(|(model, prompt, messages, input, decoy, ex)| {
            shuffled(
                vec![
                    model.map(|v| ("model".to_owned(), v)),
                    prompt.map(|v| ("prompt".to_owned(), v)),
                    messages.map(|v| ("messages".to_owned(), v)),
                    input.map(|v| ("input".to_owned(), v)),
                    decoy.map(|v| ("metadata".to_owned(), v)),
                ],
                ex,
            )
        })
        .boxed()
}

/// Random formatting: whitespace choices and string escaping styles, used in turn.
#[derive(Clone, Debug)]
struct Fmt {
    ws: Vec<u8>,
    esc: Vec<u8>,
    next_ws: usize,
    next_esc: usize,
}

fn fmt() -> BoxedStrategy<Fmt> {
    (
        prop_oneof![
            Just(vec![0u8]),
            Just(vec![1u8]),
            prop::collection::vec(any::<u8>(), 1..32),
        ],
        prop_oneof![Just(vec![0u8]), prop::collection::vec(0u8..3, 1..16)],
    )
        .prop_map(|(ws, esc)| Fmt {
            ws,
            esc,
            next_ws: 0,
            next_esc: 0,
        })
        .boxed()
}

impl Fmt {
    fn ws(&mut self, out: &mut Vec<u8>) {
        const WS: &[&str] = &["", " ", "", "\n", "\t", "\r\n    ", "  ", "", "\n\n\t \r"];
        let c = self.ws[self.next_ws % self.ws.len()];
        self.next_ws += 1;
        out.extend_from_slice(WS[usize::from(c) % WS.len()].as_bytes());
    }

    /// The string's JSON contents (without quotes) in one of three styles.
    fn escape(&mut self, s: &str) -> Vec<u8> {
        let style = self.esc[self.next_esc % self.esc.len()];
        self.next_esc += 1;
        if style == 0 {
            let q = serde_json::to_string(s).unwrap();
            return q.as_bytes()[1..q.len() - 1].to_vec();
        }
        let mut out = String::new();
        for ch in s.chars() {
            match ch {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '/' if style == 1 => out.push_str("\\/"),
                '\n' if style == 2 => out.push_str("\\n"),
                '\u{8}' if style == 2 => out.push_str("\\b"),
                '\u{c}' if style == 2 => out.push_str("\\f"),
                'o' | 'e' | 't' | '\u{80}'.. if style == 1 => {
                    let mut units = [0u16; 2];
                    for u in ch.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04X}"));
                    }
                }
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.into_bytes()
    }
}

/// Serializes `n` into `out` with random formatting and returns the oracle's view,
/// whose `json` fields are the exact bytes written.
fn serialize(n: &Node, f: &mut Fmt, out: &mut Vec<u8>) -> On {
    let start = out.len();
    let v = match n {
        Node::Null => {
            out.extend_from_slice(b"null");
            Ov::Null
        }
        Node::Bool(b) => {
            out.extend_from_slice(if *b { b"true" } else { b"false" });
            Ov::Bool(*b)
        }
        Node::Num(t) => {
            out.extend_from_slice(t.as_bytes());
            Ov::Num {
                is_u64: serde_json::from_str::<Value>(t).unwrap().is_u64(),
            }
        }
        Node::Str(s) => {
            let raw = f.escape(s);
            out.push(b'"');
            out.extend_from_slice(&raw);
            out.push(b'"');
            Ov::Str {
                val: s.clone(),
                raw,
            }
        }
        Node::Arr(items) => {
            out.push(b'[');
            f.ws(out);
            let mut ons = Vec::new();
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    f.ws(out);
                    out.push(b',');
                    f.ws(out);
                }
                ons.push(serialize(item, f, out));
            }
            f.ws(out);
            out.push(b']');
            Ov::Arr(ons)
        }
        Node::Obj(members) => {
            out.push(b'{');
            f.ws(out);
            let mut ons = Vec::new();
            for (i, (k, v)) in members.iter().enumerate() {
                if i > 0 {
                    f.ws(out);
                    out.push(b',');
                    f.ws(out);
                }
                out.push(b'"');
                let raw = f.escape(k);
                out.extend_from_slice(&raw);
                out.push(b'"');
                f.ws(out);
                out.push(b':');
                f.ws(out);
                ons.push((k.clone(), serialize(v, f, out)));
            }
            f.ws(out);
            out.push(b'}');
            Ov::Obj(ons)
        }
    };
    On {
        json: out[start..].to_vec(),
        v,
    }
}

fn formatted(doc: &Node, mut f: Fmt) -> (Vec<u8>, On) {
    let mut body = Vec::new();
    f.ws(&mut body);
    let on = serialize(doc, &mut f, &mut body);
    f.ws(&mut body);
    (body, on)
}

/// For any body: if serde_json rejects it, `extract` rejects it; if serde_json
/// accepts it, `extract` agrees with the oracle (up to the raw key bytes, which the
/// parsed `Value` cannot give for arbitrary formatting).
fn check_against_serde(body: &[u8]) -> Result<(), TestCaseError> {
    match serde_json::from_slice::<Value>(body) {
        Err(e) => {
            for ep in Endpoint::ALL {
                let r = extract(ep, body);
                prop_assert!(
                    r.is_err(),
                    "false acceptance ({ep:?}): serde_json says {e}; body {:?}; got {r:?}",
                    String::from_utf8_lossy(body)
                );
            }
        }
        Ok(v) => {
            let on = on_from_value(&v);
            for ep in Endpoint::ALL {
                prop_assert_eq!(
                    outcome(&extract(ep, body)).coarse(),
                    oracle(ep, &on).coarse(),
                    "{:?} {:?}",
                    ep,
                    String::from_utf8_lossy(body)
                );
            }
        }
    }
    Ok(())
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(prop::sample::Index, u8),
    Set(prop::sample::Index, u8),
    Delete(prop::sample::Index),
    Insert(prop::sample::Index, u8),
}

fn mutation() -> BoxedStrategy<Mutation> {
    let byte = prop_oneof![
        3 => prop::sample::select(b"\"\\{}[]:, \n0123456789-+.eEuntfalsr/\x00\x1f\x7f\x80\xc3\xff".to_vec()),
        1 => any::<u8>(),
    ];
    prop_oneof![
        (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, bit)| Mutation::Flip(i, bit)),
        (any::<prop::sample::Index>(), byte.clone()).prop_map(|(i, b)| Mutation::Set(i, b)),
        any::<prop::sample::Index>().prop_map(Mutation::Delete),
        (any::<prop::sample::Index>(), byte).prop_map(|(i, b)| Mutation::Insert(i, b)),
    ]
    .boxed()
}

const FRAGMENTS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    " ",
    "\n",
    "\"",
    "\\",
    "\"prompt\"",
    "\"model\"",
    "\"messages\"",
    "\"role\"",
    "\"content\"",
    "\"type\"",
    "\"text\"",
    "\"image_url\"",
    "\"url\"",
    "\"x\"",
    "\"\\u00e9\"",
    "\"\\ud83d\\ude00\"",
    "\"\\ud83d\"",
    "\"\\udc00\"",
    "\\u",
    "\\u00",
    "0",
    "1",
    "-",
    ".",
    "e",
    "E",
    "+",
    "1e400",
    "1e308",
    "-0",
    "007",
    "true",
    "false",
    "null",
    "nul",
    "\"a\\\"b\"",
    "\"a\\\\\"",
    "\u{7f}",
    "\t",
    "é",
    "\u{1}",
    "[1,2]",
    "[[3]]",
    "{\"type\":\"text\",\"text\":\"t\"}",
    "\"pr\\u006fmpt\"",
    "\"input\"",
    "\"input_text\"",
    "{\"role\":\"user\",\"content\":\"c\"}",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Compact serde_json serialization of a random `Value`: the oracle is computed
    /// from the parsed `Value` alone (raw forms by re-serializing with serde_json).
    #[test]
    fn matches_oracle_on_serde_serialized_documents(doc in document()) {
        // serde_json's default float parsing is not an exact round trip, so iterate
        // serialize/parse to a fixed point: then re-serializing any part of the
        // parsed value gives exactly the bytes of the body.
        let mut value = node_to_value(&doc);
        let mut body = serde_json::to_vec(&value).unwrap();
        for _ in 0..4 {
            let parsed: Value = serde_json::from_slice(&body).unwrap();
            if parsed == value {
                break;
            }
            value = parsed;
            body = serde_json::to_vec(&value).unwrap();
        }
        let parsed: Value = serde_json::from_slice(&body).unwrap();
        prop_assume!(serde_json::to_vec(&parsed).unwrap() == body);
        let on = on_from_value(&parsed);
        for ep in Endpoint::ALL {
            prop_assert_eq!(outcome(&extract(ep, &body)), oracle(ep, &on), "{:?}", ep);
        }
    }

    /// Random whitespace, escaping styles, member order and duplicate keys. The
    /// serializer records the bytes it wrote for every value, and serde_json must
    /// parse the body to exactly the generated value (last duplicate wins).
    #[test]
    fn matches_oracle_on_randomly_formatted_documents(
        doc in prop_oneof![20 => document(), 1 => node()],
        f in fmt(),
    ) {
        let (body, on) = formatted(&doc, f);
        let parsed: Value = serde_json::from_slice(&body).unwrap();
        prop_assert_eq!(&parsed, &on_to_value(&on));
        for ep in Endpoint::ALL {
            prop_assert_eq!(
                outcome(&extract(ep, &body)),
                oracle(ep, &on),
                "{:?} {:?}", ep, String::from_utf8_lossy(&body)
            );
        }
    }

    /// Pretty-printed serde_json output (serde_json's own whitespace).
    #[test]
    fn pretty_printed_documents_match_compact_ones(doc in document()) {
        let value = node_to_value(&doc);
        let pretty = serde_json::to_vec_pretty(&value).unwrap();
        let compact = serde_json::to_vec(&value).unwrap();
        for ep in Endpoint::ALL {
            let p = outcome(&extract(ep, &pretty));
            let c = outcome(&extract(ep, &compact));
            // Raw JSON of parts and tool calls keeps its whitespace, so compare
            // keys only when the compact key has none of those.
            prop_assert_eq!(p.clone().coarse(), c.clone().coarse());
            if let (Outcome::Ok { key: pk, .. }, Outcome::Ok { key: ck, .. }) = (&p, &c)
                && matches!(ep, Completions | Embeddings)
            {
                prop_assert_eq!(pk, ck);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// Randomly damaged documents (bit flips, byte changes, deletions, insertions):
    /// never accepted where serde_json rejects, and judged like the oracle where
    /// serde_json accepts.
    #[test]
    fn mutated_documents_are_never_falsely_accepted(
        doc in document(),
        f in fmt(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let (mut body, _) = formatted(&doc, f);
        for m in mutations {
            match m {
                Mutation::Flip(i, bit) if !body.is_empty() => {
                    let i = i.index(body.len());
                    body[i] ^= 1 << bit;
                }
                Mutation::Set(i, b) if !body.is_empty() => {
                    let i = i.index(body.len());
                    body[i] = b;
                }
                Mutation::Delete(i) if !body.is_empty() => {
                    body.remove(i.index(body.len()));
                }
                Mutation::Insert(i, b) => {
                    let i = i.index(body.len() + 1);
                    body.insert(i, b);
                }
                _ => {}
            }
        }
        check_against_serde(&body)?;
    }

    /// Soup of JSON fragments: likely to be nearly valid in many ways.
    #[test]
    fn fragment_soup_is_never_falsely_accepted(
        open in any::<bool>(),
        parts in prop::collection::vec(prop::sample::select(FRAGMENTS), 0..40),
    ) {
        let mut body = if open { String::from("{") } else { String::new() };
        body.extend(parts);
        check_against_serde(body.as_bytes())?;
    }

    /// Arbitrary bytes, never a panic, never a false acceptance.
    #[test]
    fn arbitrary_bytes_are_never_falsely_accepted(
        prefix in prop::sample::select(vec![&b""[..], b"{", b"{\"prompt\":", b"{\"prompt\":\"\",\"a\":"]),
        bytes in prop::collection::vec(any::<u8>(), 0..48),
    ) {
        check_against_serde(&[prefix, &bytes].concat())?;
    }

    /// Numbers near and past the limits of f64, compared with serde_json.
    #[test]
    fn number_acceptance_matches_serde(
        n in prop_oneof![
            "-?(0|[1-9][0-9]{0,30})(\\.[0-9]{0,30})?([eE][+-]?[0-9]{1,12})?",
            "1\\.797693134862315[0-9]{0,8}[eE]308",
            "17976931348623157[0-9]{0,6}e29[0-9]",
            "184467440737095516[0-9]{0,4}(\\.[0-9]{0,4})?e(28[0-9]|29[0-9])",
            "[1-9][0-9]{295,312}(\\.[0-9]{1,3})?",
            "0\\.0{0,30}[1-9][0-9]{0,20}e3[0-9]{2}",
        ],
    ) {
        let body = format!(r#"{{"prompt":"","n":{n}}}"#);
        prop_assert_eq!(
            extract(Completions, body.as_bytes()).is_ok(),
            serde_accepts(body.as_bytes()),
            "{}", n
        );
    }
}

proptest! {
    /// Appending messages to a conversation appends to its key.
    #[test]
    fn extending_a_conversation_extends_the_key(
        messages in prop::collection::vec(
            (
                prop::sample::select(vec!["system", "user", "assistant"]),
                text(),
                any::<bool>(),
            ),
            1..6,
        ),
        keep in any::<prop::sample::Index>(),
    ) {
        let body = |msgs: &[(&str, String, bool)]| {
            let ms: Vec<Value> = msgs
                .iter()
                .map(|(role, text, parts)| {
                    if *parts {
                        serde_json::json!({"content": [{"text": text, "type": "text"}], "role": role})
                    } else {
                        serde_json::json!({"role": role, "content": text})
                    }
                })
                .collect();
            serde_json::to_vec(&serde_json::json!({"model": "m", "messages": ms})).unwrap()
        };
        let k = keep.index(messages.len() + 1);
        let full = body(&messages);
        let prefix = body(&messages[..k]);
        let full = extract(Chat, &full).unwrap();
        let prefix = extract(Chat, &prefix).unwrap();
        prop_assert!(full.key.starts_with(&prefix.key));
        // Once the first user message is in, later turns keep the conversation.
        if messages[..k].iter().any(|(role, _, _)| *role == "user") {
            prop_assert_eq!(full.conversation, prefix.conversation);
        }
    }

    /// Extending a text or token prompt extends its key.
    #[test]
    fn extending_a_prompt_extends_the_key(
        a in text(),
        b in text(),
        tokens in prop::collection::vec(any::<u32>(), 0..20),
        keep in any::<prop::sample::Index>(),
    ) {
        let body = |p: Value| serde_json::to_vec(&serde_json::json!({"prompt": p})).unwrap();
        let short = body(Value::String(a.clone()));
        let long = body(Value::String(format!("{a}{b}")));
        let short_key = extract(Completions, &short).unwrap().key.into_owned();
        let long_key = extract(Completions, &long).unwrap().key.into_owned();
        prop_assert!(long_key.starts_with(&short_key));

        let k = keep.index(tokens.len() + 1);
        let short = body(serde_json::json!(tokens[..k]));
        let long = body(serde_json::json!(tokens));
        let short_key = extract(Completions, &short).unwrap().key.into_owned();
        let long_key = extract(Completions, &long).unwrap().key.into_owned();
        prop_assert!(long_key.starts_with(&short_key));
    }
}
