//! Standard output and error for the text commands.
//!
//! `kopilka quarantine | head` closes the pipe after ten lines; std's `println!` panics on
//! the write that follows (exit 101). Every text command writes through here instead: a
//! closed pipe (`EPIPE`) makes the rest of the output go nowhere, quietly, and the command
//! still finishes its work (an import piped into `head` imports every file) and exits with
//! its own status. Any other write error (a full disk under a redirect) is said once on
//! standard error, then output stops the same way.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

static STDOUT_GONE: AtomicBool = AtomicBool::new(false);
static STDERR_GONE: AtomicBool = AtomicBool::new(false);

/// Standard output that never fails: see the module comment.
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if STDOUT_GONE.load(Ordering::Relaxed) {
            return Ok(buf.len());
        }
        match io::stdout().lock().write(buf) {
            Ok(n) => Ok(n),
            Err(e) => {
                gone(e);
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if STDOUT_GONE.load(Ordering::Relaxed) {
            return Ok(());
        }
        if let Err(e) = io::stdout().lock().flush() {
            gone(e);
        }
        Ok(())
    }
}

fn gone(e: io::Error) {
    if !STDOUT_GONE.swap(true, Ordering::Relaxed) && e.kind() != io::ErrorKind::BrokenPipe {
        err(format_args!("kopilka: cannot write to standard output: {e}\n"));
    }
}

/// `print!` through [`Stdout`].
pub fn out(args: fmt::Arguments<'_>) {
    let _ = Stdout.write_fmt(args);
}

/// `eprint!` that ends quietly when standard error is closed too.
pub fn err(args: fmt::Arguments<'_>) {
    if STDERR_GONE.load(Ordering::Relaxed) {
        return;
    }
    if io::stderr().lock().write_fmt(args).is_err() {
        STDERR_GONE.store(true, Ordering::Relaxed);
    }
}
