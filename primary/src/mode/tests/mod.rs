//! Tests of the primary's state machine: a table of transitions and a
//! property test over any order of events.

mod property;
mod transitions;
mod witness;

use std::time::Duration;

use common::state::Output;
use runtime::status::Protection;

use super::*;

const GRACE: Duration = Duration::from_millis(300);

fn out(id: u32) -> Output {
    Output::Mark { cpu: 0, value: id }
}

fn id(o: &Output) -> u32 {
    match o {
        Output::Mark { value, .. } => *value,
        other => panic!("unexpected output {other:?}"),
    }
}

fn lost() -> Event {
    Event::SessionLost(Loss::Closed("data"))
}
