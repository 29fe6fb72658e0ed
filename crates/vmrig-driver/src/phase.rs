//! Where a machine stands in its life, and the moves between phases that are allowed.
//!
//! What the API calls do in each phase (`machine.rs`):
//! - commands (`execute`, `succeed`, the waits) accept every phase: they connect first,
//!   which boots an `Off` machine, waits for the shell of a `Booting` one, waits for the
//!   new shell after a reboot in place, and waits for QEMU to exit and boots anew after a
//!   reboot that ends QEMU;
//! - `start` launches QEMU from `Off` and does nothing in the others;
//! - `shutdown` does nothing when `Off`, waits for QEMU's exit in `RebootingToExit`, and
//!   otherwise connects and powers off; `wait_for_shutdown` waits for QEMU's exit in any
//!   phase; `crash` kills QEMU in any phase;
//! - `reboot` and `switch_root` connect (to `Ready`) and then leave it for a reboot phase.
//!
//! QEMU can die on its own in any phase but `Off`; the phase is what the driver last
//! established, and every call also checks the process.

/// A machine's phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No QEMU: not started yet, powered off, or crashed.
    Off,
    /// QEMU runs, and its shell has not answered yet (a boot, or a restore from a snapshot,
    /// or a shell that went away while QEMU kept running).
    Booting,
    /// The shell answers commands.
    Ready,
    /// Ctrl+Alt+Delete with `allow_reboot`, or `switch_root`: the guest comes back inside
    /// the same QEMU; the next command waits for its new shell.
    RebootingInPlace,
    /// Ctrl+Alt+Delete without `allow_reboot` (`-no-reboot`): QEMU exits once the guest is
    /// down; the next command waits for that and boots the machine again.
    RebootingToExit,
}

impl Phase {
    /// Whether a machine may go from `self` to `to`. Staying in a phase is always allowed.
    pub fn may_become(self, to: Phase) -> bool {
        use Phase::*;
        self == to
            || matches!(
                (self, to),
                (Off, Booting)
                    | (Booting, Ready)
                    | (Ready, Booting)
                    | (Ready, RebootingInPlace)
                    | (Ready, RebootingToExit)
                    | (RebootingInPlace, Ready)
                    // QEMU exited or was killed: from any phase.
                    | (_, Off)
            )
    }

    /// Whether the shell answers (upstream's `connected`).
    pub fn is_connected(self) -> bool {
        self == Phase::Ready
    }
}

#[cfg(test)]
mod tests {
    use super::Phase::{self, *};

    const ALL: [Phase; 5] = [Off, Booting, Ready, RebootingInPlace, RebootingToExit];

    #[test]
    fn the_moves_of_a_life() {
        // Boot, reboot in place, reboot out of QEMU, boot again, crash.
        let life = [
            Off,
            Booting,
            Ready,
            RebootingInPlace,
            Ready,
            RebootingToExit,
            Off,
            Booting,
            Ready,
            Booting,
            Ready,
            Off,
        ];
        for pair in life.windows(2) {
            assert!(
                pair[0].may_become(pair[1]),
                "{:?} -> {:?}",
                pair[0],
                pair[1]
            );
        }
    }

    #[test]
    fn moves_that_skip_a_step_are_refused() {
        let refused = [
            (Off, Ready),
            (Off, RebootingInPlace),
            (Off, RebootingToExit),
            (Booting, RebootingInPlace),
            (Booting, RebootingToExit),
            (RebootingToExit, Ready),
            (RebootingToExit, Booting),
            (RebootingToExit, RebootingInPlace),
            (RebootingInPlace, RebootingToExit),
            (RebootingInPlace, Booting),
        ];
        for (from, to) in refused {
            assert!(!from.may_become(to), "{from:?} -> {to:?}");
        }
        for p in ALL {
            assert!(p.may_become(p) && p.may_become(Off), "{p:?}");
        }
        let allowed = ALL
            .iter()
            .flat_map(|a| ALL.iter().map(move |b| (a, b)))
            .filter(|(a, b)| a.may_become(**b))
            .count();
        // 5 stays, 4 moves to Off, and the 6 steps of a life.
        assert_eq!(allowed, 5 + 4 + 6);
    }

    #[test]
    fn only_ready_is_connected() {
        for p in ALL {
            assert_eq!(p.is_connected(), p == Ready, "{p:?}");
        }
    }
}
