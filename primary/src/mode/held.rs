//! Output held until its epoch is acknowledged ([`HeldOutputs`]).

use std::collections::BTreeMap;
use std::time::Instant;

use common::state::Output;

/// Output waiting for its epoch's ack: epoch -> (outputs, sent at).
#[derive(Debug, Default)]
pub struct HeldOutputs {
    by_epoch: BTreeMap<u64, (Vec<Output>, Instant)>,
}

impl HeldOutputs {
    pub fn insert(&mut self, epoch: u64, outputs: Vec<Output>, at: Instant) {
        self.by_epoch.entry(epoch).or_insert_with(|| (Vec::new(), at)).0.extend(outputs);
    }

    /// Removes and returns everything of epochs `<= epoch`, oldest first.
    pub fn take_through(&mut self, epoch: u64) -> Vec<Output> {
        let Some(after) = epoch.checked_add(1) else {
            // every key is <= u64::MAX
            return self.take_all();
        };
        let later = self.by_epoch.split_off(&after);
        let ready = std::mem::replace(&mut self.by_epoch, later);
        ready.into_values().flat_map(|v| v.0).collect()
    }

    pub fn take_all(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.by_epoch).into_values().flat_map(|v| v.0).collect()
    }

    /// Outputs waiting.
    pub fn count(&self) -> u64 {
        self.by_epoch.values().map(|v| v.0.len() as u64).sum()
    }

    /// When `epoch` was handed to the secondary, if it waits.
    pub fn sent_at(&self, epoch: u64) -> Option<Instant> {
        self.by_epoch.get(&epoch).map(|v| v.1)
    }

    /// When the oldest waiting epoch in `lo..=hi` was sent.
    pub fn oldest_in(&self, lo: u64, hi: u64) -> Option<Instant> {
        if lo > hi {
            return None;
        }
        self.by_epoch.range(lo..=hi).next().map(|v| v.1 .1)
    }
}
