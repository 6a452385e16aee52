//! Catching a panic of the CEL parser or interpreter without printing it.
//!
//! Rules and documents come from outside, so a bug in the CEL crate that panics on some input
//! must deny (or refuse the rule), not take the request down. `catch_unwind` alone still runs
//! the panic hook, which prints the message, and with `RUST_BACKTRACE` set a backtrace of
//! hundreds of lines, to stderr for every such input: noise an attacker can produce at will.
//! So while rule code runs, a thread-local flag tells the hook to keep the panic to itself;
//! the caller logs one line instead. Panics anywhere else reach the previous hook unchanged.

use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    static QUIET: Cell<bool> = const { Cell::new(false) };
    static MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

static INSTALL: Once = Once::new();

/// Wraps the process's panic hook once: quiet panics are recorded, others are passed on. An
/// application that installs its own hook later should chain to the one it replaces (as this
/// one does) so that rule panics stay quiet.
fn install_hook() {
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) {
                let location = info
                    .location()
                    .map(|l| format!(" at {}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                let payload = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                MESSAGE.with(|m| *m.borrow_mut() = Some(format!("{payload}{location}")));
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs `f`; a panic inside it is returned as `Err(message)` and not printed.
pub(crate) fn catch_quietly<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    install_hook();
    let was_quiet = QUIET.with(|q| q.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was_quiet));
    result.map_err(|_| {
        MESSAGE
            .with(|m| m.borrow_mut().take())
            .unwrap_or_else(|| "unknown panic".to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caught_panic_is_returned_with_its_message_and_place() {
        let caught = catch_quietly(|| -> u8 { panic!("rule boom {}", 7) });
        let message = caught.unwrap_err();
        assert!(message.starts_with("rule boom 7 at "), "{message}");
        assert!(message.contains("panics.rs"), "{message}");
        assert_eq!(catch_quietly(|| 5), Ok(5));
        // The flag is reset: the thread is not left quiet.
        assert!(!QUIET.with(Cell::get));
    }
}
