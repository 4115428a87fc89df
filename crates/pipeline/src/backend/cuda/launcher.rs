//! How operations go out ([`Launcher`]): at most one launch held back for
//! the next operation to share (deferred.rs: two stages computed by one
//! kernel over the same input go out as one launch; a held launch goes out
//! before any other operation, read, write or step boundary), and, when
//! profiling (`MOETRACE_PROFILE_OPS`), each operation between two timing
//! events (profile.rs). Programmatic launches belong to the recorded
//! graph's edges (graph.rs).

use super::deferred::Deferred;
use super::profile::OpProfiler;

/// The launch held back and the per-operation profiler.
pub(super) struct Launcher {
    held: Option<Deferred>,
    profiler: Option<OpProfiler>,
}

impl Launcher {
    /// Nothing held; `profiler` times every operation when given.
    pub(super) fn new(profiler: Option<OpProfiler>) -> Self {
        Self { held: None, profiler }
    }

    /// The launch held back, if any, which is no longer held.
    pub(super) fn take_held(&mut self) -> Option<Deferred> {
        self.held.take()
    }

    /// Holds `launch` back for the next operation (nothing else may be
    /// held: the caller launches that first).
    pub(super) fn hold(&mut self, launch: Deferred) {
        debug_assert!(self.held.is_none(), "one launch is held at a time");
        self.held = Some(launch);
    }

    /// Whether operations are timed.
    pub(super) fn profiling(&self) -> bool {
        self.profiler.is_some()
    }

    /// The profiler, when operations are timed.
    pub(super) fn profiler(&mut self) -> Option<&mut OpProfiler> {
        self.profiler.as_mut()
    }
}
