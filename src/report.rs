//! Talking to the user: one line per phase with the elapsed time, like the virt tools, on stdout (on
//! stderr with --json, whose report owns stdout); warnings and errors on stderr.

use std::io::Write;
use std::time::Instant;

use crate::settings::Verbosity;

pub struct Reporter {
    start: Instant,
    verbosity: Verbosity,
    json: bool,
}

impl Reporter {
    pub fn new(verbosity: Verbosity, json: bool) -> Self {
        Reporter { start: Instant::now(), verbosity, json }
    }

    pub fn elapsed_secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// A phase starts: `[  12.3] Opening the image`.
    pub fn phase(&self, what: &str) {
        if self.verbosity >= Verbosity::Normal {
            self.progress(&format!("[{:6.1}] {what}", self.elapsed_secs()));
        }
    }

    /// Detail shown with -v.
    pub fn detail(&self, what: &str) {
        if self.verbosity >= Verbosity::Verbose {
            self.progress(&format!("         {what}"));
        }
    }

    pub fn warn(&self, what: &str) {
        eprintln!("cloudimg: warning: {what}");
    }

    fn progress(&self, line: &str) {
        if self.json {
            eprintln!("{line}");
        } else {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}
