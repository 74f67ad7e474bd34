//! The buffers response bytes pass through in the daemon, kept per thread
//! between exchanges instead of per connection.
//!
//! A connection holds one only while a response is on its way, so an idle
//! kept-alive connection holds none, and a new connection's first exchange
//! takes a buffer another exchange gave back instead of allocating 64 KiB
//! (which glibc then trims from the heap's top and faults back in).
use std::cell::RefCell;

/// A buffer's size: the most one read from a backend takes.
pub(crate) const SIZE: usize = 64 * 1024;

/// Most free buffers a thread keeps (1 MiB); more are freed.
const KEPT: usize = 16;

thread_local! {
    static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for at least [`SIZE`] bytes.
pub(crate) fn take() -> Vec<u8> {
    FREE.with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| Vec::with_capacity(SIZE))
}

/// Gives `buffer` back for a later [`take`] on this thread, unless the
/// thread keeps enough already or the buffer grew past twice [`SIZE`] (a
/// response head that large is rare, and its memory is not kept).
pub(crate) fn give(mut buffer: Vec<u8>) {
    if buffer.capacity() < SIZE || buffer.capacity() > 2 * SIZE {
        return;
    }
    buffer.clear();
    FREE.with_borrow_mut(|free| {
        if free.len() < KEPT {
            free.push(buffer);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_is_taken_again_empty_and_a_grown_one_is_not_kept() {
        let mut buffer = take();
        assert!(buffer.capacity() >= SIZE);
        buffer.extend_from_slice(b"response bytes");
        let at = buffer.as_ptr();
        give(buffer);
        let again = take();
        assert_eq!(again.as_ptr(), at, "the given buffer comes back");
        assert!(again.is_empty());

        let mut grown = again;
        grown.reserve(3 * SIZE);
        give(grown);
        assert_eq!(FREE.with_borrow(Vec::len), 0, "a grown buffer is freed");
    }

    #[test]
    fn a_thread_keeps_a_bounded_number_of_buffers() {
        let buffers: Vec<_> = (0..KEPT + 5).map(|_| take()).collect();
        for buffer in buffers {
            give(buffer);
        }
        assert_eq!(FREE.with_borrow(Vec::len), KEPT);
    }
}
