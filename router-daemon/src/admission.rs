//! How many client connections the daemon holds open at once
//! (`--max-connections`): a connection past the limit is refused with a
//! clear error instead of the daemon running out of file descriptors.
use prometheus_client::metrics::gauge::Gauge;

/// The open client connections, counted against a limit; the count is the
/// `router_client_connections` gauge.
#[derive(Debug)]
pub(crate) struct Admission {
    open: Gauge,
    max: usize,
}

/// One admitted connection; gives its place back when dropped.
#[derive(Debug)]
pub(crate) struct Admitted {
    open: Gauge,
}

impl Admission {
    /// Admits at most `max` connections at once, counting them in `open`.
    pub(crate) fn new(open: Gauge, max: usize) -> Self {
        Self { open, max }
    }

    /// A place for one more connection, or None at the limit.
    pub(crate) fn admit(&self) -> Option<Admitted> {
        let before = self.open.inc();
        let max = i64::try_from(self.max).unwrap_or(i64::MAX);
        if before >= max {
            self.open.dec();
            return None;
        }
        Some(Admitted {
            open: self.open.clone(),
        })
    }

    /// Connections admitted and not yet ended.
    pub(crate) fn open(&self) -> usize {
        usize::try_from(self.open.get()).unwrap_or(0)
    }

    /// The limit.
    pub(crate) fn max(&self) -> usize {
        self.max
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.open.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_and_frees_places_as_connections_end() {
        let open = Gauge::default();
        let admission = Admission::new(open.clone(), 2);
        let first = admission.admit().expect("first");
        let second = admission.admit().expect("second");
        assert!(admission.admit().is_none(), "a third is over the limit");
        assert_eq!(admission.open(), 2);
        drop(first);
        let third = admission.admit().expect("a place was freed");
        drop((second, third));
        assert_eq!(open.get(), 0);
    }
}
