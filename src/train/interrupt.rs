//! Ctrl-C and SIGTERM during `linly-lora train`. Without this a signal kills the run where it
//! stands and everything since the last `save_every` checkpoint is gone (the GPU recipe saves
//! once, at its end). The first signal now asks the run to stop at the next step boundary and
//! write a checkpoint there; a second one ends the process at once, as Ctrl-C does elsewhere.
//!
//! The handler only sets a flag (all it may safely do); the training loop reads it through
//! [`requested`]. Handlers are process-wide, so they are installed by the `train` command, not
//! by the library's [`crate::train::run::train`]: a program or test that runs several trainings
//! in one process stops them with [`crate::train::run::TrainOptions::stop`] instead.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Whether a signal asked the run to stop since [`install`].
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Installed handlers: how many guards hold them, and the actions they replaced.
#[cfg(unix)]
static INSTALLED: Mutex<(usize, Option<[libc::sigaction; 2]>)> = Mutex::new((0, None));
#[cfg(not(unix))]
static INSTALLED: Mutex<(usize, Option<()>)> = Mutex::new((0, None));

#[cfg(unix)]
const SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

/// Keeps the handlers installed while it lives; the last guard dropped puts back what was there.
#[must_use = "the handlers are removed when the guard is dropped"]
pub struct Guard(());

/// Installs the handlers for SIGINT and SIGTERM (nothing on non-Unix systems, where a signal
/// still ends the run at once).
pub fn install() -> Guard {
    let mut g = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if g.0 == 0 {
        REQUESTED.store(false, Ordering::SeqCst);
        #[cfg(unix)]
        {
            g.1 = Some(SIGNALS.map(|sig| {
                // SAFETY: a zeroed sigaction is a valid value to fill; `on_signal` only touches an
                // atomic, calls write(2) and, the second time, signal(2) and raise(3), all of
                // which are async-signal-safe.
                unsafe {
                    let mut new: libc::sigaction = std::mem::zeroed();
                    new.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                    libc::sigemptyset(&mut new.sa_mask);
                    let mut old: libc::sigaction = std::mem::zeroed();
                    libc::sigaction(sig, &new, &mut old);
                    old
                }
            }));
        }
    }
    g.0 += 1;
    Guard(())
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut g = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
        g.0 -= 1;
        if g.0 == 0 {
            #[cfg(unix)]
            if let Some(old) = g.1.take() {
                for (sig, old) in SIGNALS.iter().zip(old) {
                    // SAFETY: restores the action saved by `install`.
                    unsafe {
                        libc::sigaction(*sig, &old, std::ptr::null_mut());
                    }
                }
            }
        }
    }
}

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    if REQUESTED.swap(true, Ordering::SeqCst) {
        // The second signal: the default action, which ends the process.
        // SAFETY: signal(2) and raise(3) are async-signal-safe.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        return;
    }
    let msg: &[u8] = b"\nlinly-lora train: stopping after the step under way and writing a checkpoint (signal again to quit at once)\n";
    // SAFETY: write(2) on stderr is async-signal-safe; a short write only shortens the message.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// One signal sets the flag and the process goes on; the guard puts back the old action.
    /// (The second signal's default action would end the test process, so it is not sent.)
    #[test]
    fn a_signal_sets_the_flag_and_the_guard_restores_the_old_action() {
        let before = unsafe {
            let mut a: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGTERM, std::ptr::null(), &mut a);
            a.sa_sigaction
        };
        {
            let _g = install();
            assert!(!requested());
            // SAFETY: the handler installed above catches it.
            unsafe {
                libc::raise(libc::SIGTERM);
            }
            assert!(requested());
        }
        let after = unsafe {
            let mut a: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGTERM, std::ptr::null(), &mut a);
            a.sa_sigaction
        };
        assert_eq!(before, after);
    }
}
