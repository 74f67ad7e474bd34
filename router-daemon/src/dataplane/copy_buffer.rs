//! The buffers response bytes pass through in the daemon, kept per thread
//! between exchanges instead of per connection.
//!
//! A connection holds one only while a response is on its way, so an idle
//! kept-alive connection holds none, and a new connection's first exchange
//! takes a buffer another exchange gave back instead of allocating 64 KiB
//! (which glibc then trims from the heap's top and faults back in).
//!
//! The free buffers are bounded for the whole process, not per thread: after
//! any burst of more than [`KEPT`] exchanges the daemon holds exactly
//! [`KEPT`] free buffers, however the burst fell on its threads, so its
//! memory at rest does not depend on which thread served what.
use std::{
    cell::RefCell,
    sync::atomic::{AtomicUsize, Ordering},
};

/// A buffer's size: the most one read from a backend takes.
pub(crate) const SIZE: usize = 64 * 1024;

/// Most free buffers kept by all threads together (2 MiB); more are freed.
const KEPT: usize = 32;

/// Free buffers kept now, all threads together.
static KEPT_NOW: AtomicUsize = AtomicUsize::new(0);

/// One thread's free buffers; counted out of [`KEPT_NOW`] when the thread
/// ends.
struct Free(Vec<Vec<u8>>);

impl Drop for Free {
    fn drop(&mut self) {
        KEPT_NOW.fetch_sub(self.0.len(), Ordering::Relaxed);
    }
}

thread_local! {
    static FREE: RefCell<Free> = const { RefCell::new(Free(Vec::new())) };
}

/// An empty buffer with room for at least [`SIZE`] bytes.
pub(crate) fn take() -> Vec<u8> {
    match FREE.with_borrow_mut(|free| free.0.pop()) {
        Some(buffer) => {
            KEPT_NOW.fetch_sub(1, Ordering::Relaxed);
            buffer
        }
        None => Vec::with_capacity(SIZE),
    }
}

/// Gives `buffer` back for a later [`take`] on this thread, unless the
/// daemon keeps enough already or the buffer grew past twice [`SIZE`] (a
/// response head that large is rare, and its memory is not kept).
pub(crate) fn give(mut buffer: Vec<u8>) {
    if buffer.capacity() < SIZE || buffer.capacity() > 2 * SIZE {
        return;
    }
    // A place under the bound first, so two threads giving at once cannot
    // both pass it.
    if KEPT_NOW.fetch_add(1, Ordering::Relaxed) >= KEPT {
        KEPT_NOW.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    buffer.clear();
    FREE.with_borrow_mut(|free| free.0.push(buffer));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bound is the process's: a test that gives buffers back while
    /// another fills the bound would see its own refused.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Free buffers this thread keeps.
    fn kept_here() -> usize {
        FREE.with_borrow(|free| free.0.len())
    }

    #[test]
    fn a_given_buffer_is_taken_again_empty_and_a_grown_one_is_not_kept() {
        let _alone = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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
        assert_eq!(kept_here(), 0, "a grown buffer is freed");
    }

    /// Takes `count` buffers, gives them all back, and returns how many
    /// this thread then keeps.
    fn cycle(count: usize) -> usize {
        let buffers: Vec<_> = (0..count).map(|_| take()).collect();
        for buffer in buffers {
            give(buffer);
        }
        kept_here()
    }

    #[test]
    fn the_process_keeps_a_bounded_number_of_buffers_whatever_the_threads() {
        let _alone = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Two threads each give back more than the bound, at once.
        let both = std::sync::Arc::new(std::sync::Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let both = std::sync::Arc::clone(&both);
                std::thread::spawn(move || {
                    both.wait();
                    let kept = cycle(KEPT + 5);
                    // Both have given back before either ends (and counts
                    // its buffers out).
                    both.wait();
                    kept
                })
            })
            .collect();
        let kept: Vec<usize> = threads
            .into_iter()
            .map(|thread| thread.join().expect("a giving thread"))
            .collect();
        assert!(kept.iter().sum::<usize>() <= KEPT, "{kept:?} kept");
        assert!(kept.iter().sum::<usize>() > 0, "nothing was kept");
        // The threads' ends gave their part of the bound back.
        let later = std::thread::spawn(|| cycle(KEPT))
            .join()
            .expect("a later thread");
        assert!(later > KEPT / 2, "a later thread keeps only {later}");
    }
}
