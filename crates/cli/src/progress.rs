//! Progress on stderr: one line rewritten in place on a terminal, one line
//! per layer otherwise (so logs show how far a long run got).

use std::io::IsTerminal;

use pipeline::ForwardEvent;

/// Progress display for `run`.
pub struct Progress {
    enabled: bool,
    terminal: bool,
    steps: usize,
    dirty: bool,
}

impl Progress {
    /// A display for a run of `steps` steps; `enabled` false prints nothing.
    pub fn new(enabled: bool, steps: usize) -> Self {
        Self { enabled, terminal: std::io::stderr().is_terminal(), steps, dirty: false }
    }

    /// Prints a whole line.
    pub fn line(&mut self, text: &str) {
        if self.enabled {
            self.clear();
            crate::say!("{text}");
        }
    }

    /// Shows a forward event.
    pub fn forward(&mut self, event: &ForwardEvent) {
        if !self.enabled {
            return;
        }
        match event {
            ForwardEvent::StepStarted { step, start_position, tokens } => {
                if !self.terminal {
                    crate::say!("step {}/{}: {tokens} tokens at position {start_position}", step + 1, self.steps);
                }
            }
            ForwardEvent::LayerDone { step, layer, layers } => {
                let text = format!("step {}/{} layer {}/{}", step + 1, self.steps, layer + 1, layers);
                if self.terminal {
                    crate::say_inline!("\r{text:<40}");
                    self.dirty = true;
                } else {
                    crate::say!("  {text}");
                }
            }
            ForwardEvent::StepDone { step, next_token } => {
                if let Some(t) = next_token {
                    self.line(&format!("step {}/{}: next token {t}", step + 1, self.steps));
                }
            }
        }
    }

    /// Clears the in-place line, if any.
    pub fn clear(&mut self) {
        if self.dirty {
            crate::say_inline!("\r{:<40}\r", "");
            self.dirty = false;
        }
    }
}
