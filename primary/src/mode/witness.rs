//! The witness's part in the core: its questions ([`Ask`]), answers
//! ([`Answer`]), and how the core asks and takes an answer.

use std::time::{Duration, Instant};

use super::{Actions, Mode, PrimaryState};

/// A question for the witness; its answer comes back as [`Event::Witness`]
/// with the same tag.
///
/// [`Event::Witness`]: super::Event::Witness
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Record this session's secondary as caught up (compares our term).
    RecordSync { tag: u64 },
    /// Delete the sync record so we may release and run alone.
    RunAlone { tag: u64 },
}

/// The witness's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Granted,
    /// A later request of ours landed first: ask again if still needed.
    Superseded,
    /// The term moved on to `term`: we are fenced.
    Refused {
        term: u64,
    },
    Unreachable(String),
}

/// What this node knows of its witness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WitnessView {
    /// No witness configured.
    None,
    /// Its last answer was definite.
    Ok,
    Unreachable(String),
}

/// How often an unanswered question is asked again.
pub const WITNESS_RETRY: Duration = Duration::from_millis(200);

/// What the core asks the witness ([`Ask`] without its tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Question {
    RecordSync,
    RunAlone,
}

/// The question the core waits on: asked, or to be asked again.
#[derive(Debug, Clone, Copy)]
pub(super) struct OpenQuestion {
    pub(super) question: Question,
    pub(super) tag: u64,
    /// `None` while in flight; else when to ask again.
    pub(super) retry_at: Option<Instant>,
}

impl PrimaryState {
    pub(super) fn ask(&mut self, question: Question, actions: &mut Actions) {
        self.next_tag += 1;
        let tag = self.next_tag;
        self.asking = Some(OpenQuestion { question, tag, retry_at: None });
        actions.ask = Some(match question {
            Question::RecordSync => Ask::RecordSync { tag },
            Question::RunAlone => Ask::RunAlone { tag },
        });
    }

    pub(super) fn on_witness(&mut self, tag: u64, answer: Answer, now: Instant, actions: &mut Actions) {
        if let Answer::Refused { term } = answer {
            // definite, whichever question it answers
            self.witness_view = WitnessView::Ok;
            *actions = self.fence(term);
            return;
        }
        let Some(p) = self.asking.filter(|p| p.tag == tag) else { return };
        match answer {
            Answer::Granted => {
                self.witness_view = WitnessView::Ok;
                self.asking = None;
                match p.question {
                    Question::RecordSync if self.mode.in_session() => {
                        self.sync_recorded = true;
                        if let Some(e) = self.acked_unrecorded.take() {
                            if matches!(self.mode, Mode::Syncing | Mode::Protected) {
                                self.mode = Mode::Protected;
                            }
                            actions.release = self.held.take_through(e);
                        }
                    }
                    Question::RunAlone if matches!(self.mode, Mode::Holding { .. }) => *actions = self.go_unprotected(),
                    _ => {}
                }
            }
            Answer::Superseded => self.asking = Some(OpenQuestion { retry_at: Some(now), ..p }),
            Answer::Unreachable(why) => {
                self.witness_view = WitnessView::Unreachable(why);
                self.asking = Some(OpenQuestion { retry_at: Some(now + WITNESS_RETRY), ..p });
            }
            Answer::Refused { .. } => unreachable!("handled above"),
        }
    }
}
