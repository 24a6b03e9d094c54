//! Progress bars of long operations qemu-img shows none for (`check`'s walk
//! of the L2 tables, `bitmap --merge`): drawn on stderr at a terminal only,
//! so quiet, JSON and piped use print exactly what qemu-img prints.

use std::io::IsTerminal;

/// A bar drawn once the work is large enough to be worth one.
pub struct Bar {
    show: bool,
    template: &'static str,
    bar: Option<indicatif::ProgressBar>,
    shown: u64,
}

impl Bar {
    /// Totals below this draw nothing (done in a blink).
    const MIN_TOTAL: u64 = 256;

    /// A bar with an indicatif `template`; `wanted`: the command's options
    /// allow one (not quiet, not JSON). Drawn only when stderr is a terminal.
    pub fn new(wanted: bool, template: &'static str) -> Bar {
        Bar {
            show: wanted && std::io::stderr().is_terminal(),
            template,
            bar: None,
            shown: u64::MAX,
        }
    }

    /// `done` of `total` units are done; redrawn per percent, not per unit.
    pub fn update(&mut self, done: u64, total: u64) {
        if !self.show || total < Self::MIN_TOTAL || done * 100 / total == self.shown {
            return;
        }
        self.shown = done * 100 / total;
        let template = self.template;
        let pb = self.bar.get_or_insert_with(|| {
            let pb = indicatif::ProgressBar::new(total);
            pb.set_style(
                indicatif::ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            pb
        });
        pb.set_length(total);
        pb.set_position(done);
    }

    /// Removes the bar from the terminal.
    pub fn finish(self) {
        if let Some(pb) = self.bar {
            pb.finish_and_clear();
        }
    }
}
