//! The witness worker ([`WitnessLink`]): asks the witness one question at a
//! time and hands the answers back in order.

use tokio::sync::mpsc;

use crate::mode::{Answer, Ask};

/// The witness worker: asks go in, answers (tag, answer, ms) come out, in order.
pub(crate) struct WitnessLink {
    pub(super) asks: mpsc::UnboundedSender<(Ask, String)>,
    answers: mpsc::UnboundedReceiver<(u64, Answer, f64)>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl WitnessLink {
    /// One task asks the witness, one question at a time, so answers come
    /// back in the order asked (and requests land in that order, see
    /// `witness::Witness::record_sync`).
    pub(super) fn spawn(w: witness::Witness, term: u64) -> WitnessLink {
        let (asks, mut rx) = mpsc::unbounded_channel::<(Ask, String)>();
        let (tx, answers) = mpsc::unbounded_channel();
        let task = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            while let Some((ask, peer)) = rx.recv().await {
                let (tag, (r, ms)) = match ask {
                    Ask::RecordSync { tag } => (tag, witness::timed(w.record_sync(term, &peer)).await),
                    Ask::RunAlone { tag } => (tag, witness::timed(w.run_alone(term)).await),
                };
                let answer = match r {
                    Ok(witness::Decision::Granted) => Answer::Granted,
                    Ok(witness::Decision::Superseded) => Answer::Superseded,
                    Ok(witness::Decision::Refused { term, why }) => {
                        tracing::error!(term, %why, "the witness refused us");
                        Answer::Refused { term }
                    }
                    Err(e) => Answer::Unreachable(e.to_string()),
                };
                if tx.send((tag, answer, ms)).is_err() {
                    return;
                }
            }
        }));
        WitnessLink { asks, answers, _task: task }
    }
}

/// The next witness answer; never yields without a witness.
pub(super) async fn next_answer(w: &mut Option<WitnessLink>) -> (u64, Answer, f64) {
    if let Some(l) = w {
        if let Some(a) = l.answers.recv().await {
            return a;
        }
    }
    std::future::pending().await
}
