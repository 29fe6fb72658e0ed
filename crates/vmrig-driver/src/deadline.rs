//! The global timeout's deadline, shared by every wait of a run and the watchdog. It can
//! be lifted once: `--pause-on-failure` keeps the machines for the user's REPL after the
//! script failed, so nothing may time out from then on.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When the run's global timeout ends (see the module doc).
#[derive(Debug)]
pub struct Deadline {
    at: Mutex<Instant>,
}

/// What "no deadline" is: far enough never to come, near enough not to overflow `Instant`.
const LIFTED: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl Deadline {
    pub fn new(at: Instant) -> Deadline {
        Deadline { at: Mutex::new(at) }
    }

    pub fn get(&self) -> Instant {
        *self.at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on nothing times out globally (the watchdog goes back to sleep).
    pub fn lift(&self) {
        *self.at.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now() + LIFTED;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lifted_deadline_is_in_the_far_future() {
        let d = Deadline::new(Instant::now());
        assert!(d.get() <= Instant::now());
        d.lift();
        assert!(d.get() > Instant::now() + Duration::from_secs(10 * 365 * 24 * 3600));
    }
}
