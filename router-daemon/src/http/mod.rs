//! HTTP/1.1 framing, both ways: client requests (`request`) and backend
//! responses ([`response`]), with one parser for each framing field both
//! read (`chunk`) and one set of limits.
pub(crate) mod chunk;
pub(crate) mod request;
pub mod response;

pub(crate) use self::request::{CONTINUE, Head, ok_response};
pub use self::{
    chunk::{ChunkError, ChunkLimits, ChunkedDecoder},
    request::{Framing, Limits, parse_head},
};

/// Most header fields in any head, request or response; parsed into a stack
/// array (and the ceiling of [`Limits::max_headers`]).
pub(crate) const MAX_HEADERS: usize = 64;

/// Longest chunk-size or trailer line accepted, either way.
pub(crate) const MAX_LINE: usize = 4096;
