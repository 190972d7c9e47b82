//! Talking to the user: one line per phase with the elapsed time, like the virt tools, on stdout (on
//! stderr with --json, whose report owns stdout); warnings and errors on stderr.

use std::borrow::Cow;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// How much is said on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
    /// Also libguestfs's appliance messages.
    Debug,
}

/// Shared by the main thread and the output writer, whose lines and bars interleave.
pub struct Reporter {
    start: Instant,
    verbosity: Verbosity,
    json: bool,
    /// Every bar and spinner, so that a line printed while one is drawn goes above it, not over it.
    bars: MultiProgress,
    /// Seconds spent in each phase, in the order the phases were first timed.
    phases: Mutex<Vec<(&'static str, f64)>>,
}

impl Reporter {
    pub fn new(verbosity: Verbosity, json: bool) -> Self {
        Reporter { start: Instant::now(), verbosity, json, bars: MultiProgress::new(), phases: Mutex::default() }
    }

    /// Adds the time since `since` to `phase`'s total and returns it, in seconds.
    pub fn took(&self, phase: &'static str, since: Instant) -> f64 {
        let secs = since.elapsed().as_secs_f64();
        let mut phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        match phases.iter_mut().find(|(name, _)| *name == phase) {
            Some((_, total)) => *total += secs,
            None => phases.push((phase, secs)),
        }
        secs
    }

    /// The totals of [`Reporter::took`]: `launch 26.1 s, editing 28.0 s, ...`.
    pub fn phase_totals(&self) -> String {
        let phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        phases.iter().map(|(name, secs)| format!("{name} {secs:.1} s")).collect::<Vec<_>>().join(", ")
    }

    pub fn elapsed_secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// A phase starts: `[  12.3] Opening the image`.
    pub fn phase(&self, what: &str) {
        if self.verbosity >= Verbosity::Normal {
            self.line(&format!("[{:6.1}] {what}", self.elapsed_secs()));
        }
    }

    /// Detail shown with -v.
    pub fn detail(&self, what: &str) {
        if self.verbosity >= Verbosity::Verbose {
            self.line(&format!("         {what}"));
        }
    }

    /// A long phase with a known end: a bar on a terminal, a plain line at each quarter otherwise.
    pub fn progress(&self, label: &str) -> Progress<'_> {
        let bar = self.on_terminal().then(|| {
            let bar = ProgressBar::new(100).with_message(label.to_string());
            bar.set_style(
                ProgressStyle::with_template("         {msg} [{bar:30}] {pos:>3}% {elapsed}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            self.bars.add(bar)
        });
        Progress { reporter: self, label: label.to_string(), bar, quarters: 0 }
    }

    /// A long phase with no measurable progress (the appliance launch): a ticking spinner with the
    /// elapsed time on a terminal, nothing more otherwise. It stops when dropped.
    pub fn spinner(&self, label: &str) -> Option<ProgressBar> {
        self.on_terminal().then(|| {
            let spinner = ProgressBar::new_spinner().with_message(label.to_string());
            spinner.set_style(
                ProgressStyle::with_template("         {spinner} {msg} {elapsed}").expect("a valid template"),
            );
            let spinner = self.bars.add(spinner);
            spinner.enable_steady_tick(Duration::from_millis(200));
            spinner
        })
    }

    /// Bars are drawn on stderr, so they need a terminal there and a human reader.
    fn on_terminal(&self) -> bool {
        self.verbosity >= Verbosity::Normal && std::io::stderr().is_terminal()
    }

    pub fn warn(&self, what: &str) {
        self.bars.suspend(|| eprintln!("cloudimg: warning: {}", for_terminal(what)));
    }

    fn line(&self, line: &str) {
        let line = for_terminal(line);
        self.bars.suspend(|| {
            if self.json {
                eprintln!("{line}");
            } else {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        });
    }
}

/// Text safe to print on a terminal: control characters, which could move the cursor, rewrite the
/// screen or the window title, or answer back, are shown as `\x1b`-style escapes, as are the Unicode
/// marks that reorder text; newlines and tabs stay. Guest data (os-release, file names, YAML errors
/// quoting the file) reaches every message, so everything cloudimg prints for people goes through
/// here (JSON is escaped by serde).
pub fn for_terminal(text: &str) -> Cow<'_, str> {
    let escaped = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(escaped) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            c if !escaped(c) => out.push(c),
            c if u32::from(c) <= 0xff => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
        }
    }
    Cow::Owned(out)
}

/// See [`Reporter::progress`].
pub struct Progress<'a> {
    reporter: &'a Reporter,
    label: String,
    bar: Option<ProgressBar>,
    /// Quarters already reported as plain lines.
    quarters: u32,
}

impl Progress<'_> {
    pub fn set(&mut self, percent: f64) {
        match &self.bar {
            Some(bar) => bar.set_position(percent.clamp(0.0, 100.0) as u64),
            None => {
                if let Some(quarter) = quarter_reached(self.quarters, percent) {
                    self.quarters = quarter;
                    if self.reporter.verbosity >= Verbosity::Normal {
                        self.reporter.line(&format!("         {}: {}%", self.label, quarter * 25));
                    }
                }
            }
        }
    }
}

impl Drop for Progress<'_> {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The quarter (1–4) that `percent` newly reaches after `done` quarters, if any.
fn quarter_reached(done: u32, percent: f64) -> Option<u32> {
    let quarter = (percent.clamp(0.0, 100.0) / 25.0).floor() as u32;
    (quarter > done).then_some(quarter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_and_reordering_marks_are_shown_escaped() {
        assert_eq!(for_terminal("plain text\n\twith a tab"), "plain text\n\twith a tab");
        assert_eq!(
            for_terminal("Debian \x1b]0;pwned\x07\x1b[2J\r\u{9b}31m\u{202e}txt.exe\u{7f}"),
            "Debian \\x1b]0;pwned\\x07\\x1b[2J\\x0d\\x9b31m\\u{202e}txt.exe\\x7f"
        );
        assert!(matches!(for_terminal("é 日本"), Cow::Borrowed(_)));
    }

    #[test]
    fn phase_times_add_up_in_the_order_first_seen() {
        let report = Reporter::new(Verbosity::Quiet, false);
        let long_ago = Instant::now() - Duration::from_secs(2);
        assert!(report.took("launch", long_ago) >= 2.0);
        report.took("editing", long_ago);
        report.took("editing", long_ago);
        let totals = report.phase_totals();
        let (launch, editing) = totals.split_once(", editing ").expect(&totals);
        assert!(launch.starts_with("launch 2."), "{totals}");
        assert!(editing.starts_with('4') && editing.ends_with(" s"), "{totals}");
    }

    #[test]
    fn plain_progress_lines_come_once_per_quarter() {
        assert_eq!(quarter_reached(0, 10.0), None);
        assert_eq!(quarter_reached(0, 25.0), Some(1));
        assert_eq!(quarter_reached(1, 49.9), None);
        assert_eq!(quarter_reached(1, 80.0), Some(3));
        assert_eq!(quarter_reached(3, 100.0), Some(4));
        assert_eq!(quarter_reached(4, 100.0), None);
    }
}
