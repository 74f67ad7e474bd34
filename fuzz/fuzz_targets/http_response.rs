//! Response framing: a backend's head and `BodyTracker` on any bytes.
//!
//! Run with `cargo xtask fuzz http_response`. Checks, for any input: no
//! panic; a parsed head lies within the input; the tracker finds the same
//! end of the body whether the bytes arrive at once or in pieces of any
//! size, and never claims more bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use router_daemon::http::response::{BodyTracker, parse_head};

/// Feeds `body` to a tracker in pieces of `piece` bytes; returns the bytes
/// that belong to the body, whether it ended, or the error.
fn track(
    framing: router_daemon::http::response::BodyFraming,
    body: &[u8],
    piece: usize,
) -> Result<(usize, bool), router_daemon::http::response::FramingError> {
    let mut tracker = BodyTracker::new(framing);
    let mut taken = 0;
    for chunk in body.chunks(piece.max(1)) {
        let used = tracker.advance(chunk)?;
        assert!(used <= chunk.len());
        taken += used;
        if used < chunk.len() {
            assert!(tracker.is_done(), "stopped early without ending");
            break;
        }
    }
    Ok((taken, tracker.is_done()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&piece, data)) = data.split_first() else {
        return;
    };
    let Ok(Some(head)) = parse_head(data, false) else {
        return;
    };
    assert!(head.len <= data.len());
    let body = &data[head.len..];
    let whole = track(head.body, body, body.len());
    let pieces = track(head.body, body, usize::from(piece));
    match (&whole, &pieces) {
        (Ok(whole), Ok(pieces)) => assert_eq!(whole, pieces, "pieces of {piece}"),
        // An error may be found at a different point, but not only one way.
        (Err(_), Err(_)) => {}
        _ => panic!("{whole:?} whole vs {pieces:?} in pieces of {piece}"),
    }
});
