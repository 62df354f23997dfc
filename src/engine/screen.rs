//! What claude shows on its terminal: a bounded, ANSI-stripped tail for error messages,
//! and recognition of the screens that would block an unattended claude.

use std::time::Duration;

/// Characters of plain terminal text kept for error messages.
const TAIL_CHARS: usize = 4000;
/// Characters of whitespace-free text searched for screen markers.
const SQUASHED_CHARS: usize = 2000;

/// Screens synthesis reacts to. Markers are matched with all whitespace removed, because the
/// TUI moves the cursor instead of printing spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prompt {
    /// "I am using this for local development": option 1 is preselected, `\r` accepts.
    DevChannels,
    /// Workspace trust: the default answer exits claude; accepting is the operator's call.
    WorkspaceTrust,
    /// "Detected a custom API key ... Do you want to use this API key?": the default is No.
    ApiKeyApproval,
    /// "Interrupted" after an ESC.
    Interrupted,
}

impl Prompt {
    /// What the operator has to do about a screen synthesis does not answer by itself.
    pub fn advice(self) -> &'static str {
        match self {
            Prompt::WorkspaceTrust => {
                "claude asks whether to trust the workspace (\"Is this a project you trust?\"): run `claude` once \
                 in the workspace folder and answer \"Yes, I trust this folder\", or set trust_workspace = yes."
            }
            Prompt::ApiKeyApproval => {
                "claude asks whether to use the ANTHROPIC_API_KEY of its environment (its default answer is No): \
                 run `claude` once as this user and answer Yes, or remove the variable."
            }
            Prompt::DevChannels | Prompt::Interrupted => "",
        }
    }
}

const MARKERS: &[(&str, Prompt)] = &[
    ("Iamusingthisforlocaldevelopment", Prompt::DevChannels),
    ("Yes,Itrustthisfolder", Prompt::WorkspaceTrust),
    ("DoyouwanttousethisAPIkey?", Prompt::ApiKeyApproval),
    ("Interrupted", Prompt::Interrupted),
];

/// Pause between seeing the development-channels warning and pressing Enter, in case a TUI drops
/// keys that arrive before it has finished drawing the dialog. Claude Code 2.1.332 is already in
/// raw mode when the warning shows and took Enter at once in 50 of 50 spawns (30 of 30 at 50 ms,
/// two claudes starting together): see docs/claude-footprint.md.
pub const CONFIRM_DELAY: Duration = Duration::from_millis(50);
/// How to accept the workspace-trust screen, as Claude Code 2.1.332 draws it ("❯ No, exit" selected,
/// "Yes, I trust this folder" below, no numbers): arrow down once the screen has been drawn for
/// `TRUST_DELAY` (keys that come earlier move the cursor but Enter then does not confirm), then,
/// once the redraw shows the selection off "No, exit" (`trust_selection`), Enter after
/// `TRUST_DELAY`. Claude records the trust in `~/.claude.json` itself.
pub const TRUST_DELAY: Duration = Duration::from_millis(300);
pub const TRUST_SELECT: &str = "\x1b[B";
pub const TRUST_CONFIRM: &str = "\r";

/// Where terminal output drawn after `TRUST_SELECT` puts the trust screen's selection marker `❯`:
/// `Some(true)` off "No, exit" (on "Yes, I trust this folder"), `Some(false)` still on it, `None`
/// when the output draws no marker. The TUI may redraw only the cells that changed (a lone `❯`
/// moved down a line), so the marker's neighbourhood is all there is to go by.
pub fn trust_selection(output: &str) -> Option<bool> {
    let squashed: String = strip_ansi(output).chars().filter(|c| !c.is_whitespace()).collect();
    let at = squashed.rfind('❯')?;
    Some(!squashed[at..].starts_with("❯No,exit"))
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Screen {
    tail: String,
    squashed: String,
}

impl Screen {
    /// Add terminal output; returns the prompts newly visible in it.
    pub fn push(&mut self, raw: &str) -> Vec<Prompt> {
        let plain = strip_ansi(raw);
        self.tail.push_str(&plain);
        keep_last(&mut self.tail, TAIL_CHARS);
        self.squashed.extend(plain.chars().filter(|c| !c.is_whitespace()));
        let mut found = Vec::new();
        for (marker, prompt) in MARKERS {
            if let Some(i) = self.squashed.find(marker) {
                found.push(*prompt);
                // Forget it, so one appearance is reported once.
                self.squashed.drain(..i + marker.len());
            }
        }
        keep_last(&mut self.squashed, SQUASHED_CHARS);
        found
    }

    /// The last `n` non-blank lines, for error messages and logs.
    pub fn last_lines(&self, n: usize) -> String {
        let lines: Vec<&str> = self.tail.lines().map(str::trim_end).filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

fn keep_last(s: &mut String, max_chars: usize) {
    let count = s.chars().count();
    if count > max_chars {
        let cut = s.char_indices().nth(count - max_chars).map_or(0, |(i, _)| i);
        s.drain(..cut);
    }
}

/// Remove CSI, OSC and other escape sequences; cursor movement becomes a space so that
/// words placed by cursor jumps stay apart in the tail.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                Some('[') => {
                    // CSI: parameters and intermediates, then one final byte in @..~
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            if matches!(c, 'C' | 'G' | 'H' | 'f') {
                                out.push(' ');
                            }
                            break;
                        }
                    }
                }
                Some(']') => {
                    // OSC: until BEL or ESC \
                    while let Some(c) = chars.next() {
                        if c == '\x07' || (c == '\x1b' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                Some('(' | ')') => {
                    chars.next();
                }
                _ => {}
            },
            '\r' => {}
            c if c.is_control() && c != '\n' && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_escapes() {
        assert_eq!(strip_ansi("\x1b[1;31mred\x1b[0m \x1b]0;title\x07ok\r\n"), "red ok\n");
    }

    #[test]
    fn finds_a_marker_split_across_reads_and_drawn_with_cursor_moves() {
        let mut s = Screen::default();
        assert!(s.push("I am \x1b[2Cusing this for lo").is_empty());
        assert_eq!(s.push("cal development"), vec![Prompt::DevChannels]);
        assert!(s.push(" more").is_empty(), "reported once");
    }

    #[test]
    fn the_trust_screen_and_where_its_selection_moves() {
        let mut s = Screen::default();
        let first = "Quick safety check\r\n  \u{276f} No, exit \r\n Yes, I trust this folder\r\n";
        assert_eq!(s.push(first), vec![Prompt::WorkspaceTrust]);
        assert_eq!(trust_selection(first), Some(false));
        // Redrawn whole lines, or (seen under load) only the cells that changed.
        assert_eq!(trust_selection("\r    No, exit\r   \u{276f} Yes, I trust this folder \r"), Some(true));
        assert_eq!(trust_selection("\x1b[12;3H \x1b[13;3H\u{276f}"), Some(true));
        assert_eq!(trust_selection("\x1b[?25l"), None);
    }

    #[test]
    fn last_lines_skip_blank_ones() {
        let mut s = Screen::default();
        s.push("a\n\n b\nc\n   \n");
        assert_eq!(s.last_lines(2), " b\nc");
    }
}
