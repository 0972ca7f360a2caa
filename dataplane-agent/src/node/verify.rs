//! Program loads that survive an interrupted verifier.

use aya::programs::ProgramError;

/// How often a load is tried when the verifier was interrupted (libbpf
/// tries as often).
const LOAD_ATTEMPTS: usize = 5;

/// Runs `load` (one program's `load()`) again when the kernel gave up
/// verifying because a signal was pending: the verifier checks
/// `signal_pending()` as it walks the program and answers EAGAIN, and a
/// process with a handler for SIGCHLD (tokio's, reaping the `ip` and
/// `nft` children) gets such signals at any time. Any other error, or the
/// last attempt's, is returned as it is: a program the kernel refuses is
/// never taken for an interrupted one.
pub fn load_uninterrupted(
    load: impl FnMut() -> Result<(), ProgramError>,
) -> Result<(), ProgramError> {
    retry_interrupted(
        load,
        |error| matches!(error, ProgramError::LoadError { io_error, .. } if is_eagain(io_error)),
    )
}

fn is_eagain(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::WouldBlock
}

/// `attempt` until it succeeds, fails otherwise than `interrupted`, or
/// was tried `LOAD_ATTEMPTS` times.
fn retry_interrupted<E>(
    mut attempt: impl FnMut() -> Result<(), E>,
    interrupted: impl Fn(&E) -> bool,
) -> Result<(), E> {
    let mut tried = 1;
    loop {
        match attempt() {
            Err(ref error) if interrupted(error) && tried < LOAD_ATTEMPTS => tried += 1,
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::Cell, io};

    use super::*;

    /// EAGAIN and EACCES on Linux (every architecture the agent runs on).
    const EAGAIN: i32 = 11;
    const EACCES: i32 = 13;

    fn failing_with(errno: i32) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(errno))
    }

    fn interrupted(error: &io::Error) -> bool {
        is_eagain(error)
    }

    #[test]
    fn an_interrupted_verification_is_tried_again() {
        let calls = Cell::new(0);
        let result = retry_interrupted(
            || {
                calls.set(calls.get() + 1);
                if calls.get() < 3 {
                    failing_with(EAGAIN)
                } else {
                    Ok(())
                }
            },
            interrupted,
        );
        assert!(result.is_ok());
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn a_refused_program_is_not_tried_again() {
        let calls = Cell::new(0);
        let result = retry_interrupted(
            || {
                calls.set(calls.get() + 1);
                failing_with(EACCES)
            },
            interrupted,
        );
        assert_eq!(result.unwrap_err().raw_os_error(), Some(EACCES));
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn interruptions_end_after_the_last_attempt() {
        let calls = Cell::new(0);
        let result = retry_interrupted(
            || {
                calls.set(calls.get() + 1);
                failing_with(EAGAIN)
            },
            interrupted,
        );
        assert_eq!(result.unwrap_err().raw_os_error(), Some(EAGAIN));
        assert_eq!(calls.get(), LOAD_ATTEMPTS);
    }
}
