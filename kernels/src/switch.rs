//! The one switch between the kernels and the references, for the whole process.
//!
//! On by default. `TROUPE_KERNELS=reference` in the environment turns it off at start-up, and
//! [`set_enabled`] flips it at run time (the benchmark compares both in one process).

use std::sync::atomic::{AtomicU8, Ordering};

const UNSET: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNSET);

/// Whether backends with kernels of their own use them (otherwise every backend runs the
/// references).
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let on = std::env::var("TROUPE_KERNELS").map_or(true, |v| v != "reference");
            // A concurrent `set_enabled` wins over the environment.
            let _ = STATE.compare_exchange(
                UNSET,
                if on { ON } else { OFF },
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            STATE.load(Ordering::Relaxed) == ON
        }
    }
}

/// Turns the kernels on or off for the whole process.
pub fn set_enabled(on: bool) {
    STATE.store(if on { ON } else { OFF }, Ordering::Relaxed);
}
