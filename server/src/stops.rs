//! Stop strings over streamed text: text is held back while it could still be the start of a stop
//! string, and nothing at or past the first stop string is ever emitted.

/// Scans a reply's text deltas for stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopScanner {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopScanner {
    /// A scanner for `stops` (none: every delta passes as it is).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string was met.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Takes a delta; returns the text that can be emitted now.
    pub fn push(&mut self, delta: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(delta);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return out;
        }
        // Hold back the longest tail that some stop string starts with.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_prefix_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        out
    }

    /// The reply ended: what is still held back (nothing after a stop).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The length of the longest proper prefix of `stop` that `text` ends with, on a character
/// boundary of `text`.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .filter(|&n| stop.is_char_boundary(n))
        .find(|&n| text.is_char_boundary(text.len() - n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut s = StopScanner::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out: String = deltas.iter().map(|d| s.push(d)).collect();
        out.push_str(&s.finish());
        (out, s.stopped())
    }

    #[test]
    fn text_stops_before_the_first_stop_string_even_split_across_deltas() {
        assert_eq!(
            run(&["\nUser:"], &["Hi", " there\nUs", "er: more"]),
            ("Hi there".into(), true)
        );
        assert_eq!(run(&["END", "xx"], &["aaxE", "ND"]), ("aax".into(), true));
        assert_eq!(run(&["END", "xx"], &["ax", "xEND"]), ("a".into(), true));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn a_partial_match_is_held_back_then_released_when_it_fails() {
        let mut s = StopScanner::new(vec!["STOP".into()]);
        assert_eq!(s.push("go ST"), "go ");
        assert_eq!(s.push("O"), "");
        assert_eq!(s.push("RM"), "STORM");
        assert!(!s.stopped());
        assert_eq!(run(&["ß!"], &["aß", "b"]), ("aßb".into(), false));
    }
}
