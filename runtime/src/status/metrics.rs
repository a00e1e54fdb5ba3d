//! The node's Prometheus metrics text.

use super::{NodeStatus, Protection};

impl NodeStatus {
    /// Prometheus metrics (OpenMetrics text, prometheus-client): gauges and
    /// counters read from the status, the two latency histograms cumulative
    /// since the node started.
    pub fn metrics(&self) -> String {
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let s = self.snapshot();
        let mut r = prometheus_client::registry::Registry::with_prefix("castor");
        r.register("generation", "Fencing generation of this node", ConstGauge::new(s.generation as i64));
        r.register("epoch", "Current epoch (primary) or committed epoch (secondary)", ConstGauge::new(s.epoch as i64));
        r.register(
            "epochs_in_flight",
            "Epochs sent and not yet acknowledged",
            ConstGauge::new(s.epochs_in_flight as i64),
        );
        r.register(
            "protected",
            "1 while a secondary protects this primary",
            ConstGauge::new(i64::from(s.protection == Protection::Protected)),
        );
        r.register("held_outputs", "Outputs waiting for their epoch's ack", ConstGauge::new(s.held_outputs as i64));
        r.register("last_epoch_pages", "Pages in the last epoch", ConstGauge::new(s.last_epoch.pages as i64));
        r.register(
            "last_epoch_len_us",
            "How long the guest ran in the last epoch (us): the timer's length, or shorter when output ended it",
            ConstGauge::new(s.last_epoch.len_us),
        );
        r.register(
            "ack_latency_us_p50",
            "Median epoch ack latency (us), recent epochs",
            ConstGauge::new(s.ack_latency_us_p50),
        );
        r.register(
            "ack_latency_us_p99",
            "p99 epoch ack latency (us), recent epochs",
            ConstGauge::new(s.ack_latency_us_p99),
        );
        r.register(
            "output_hold_us_p99",
            "p99 of how long output waited for its epoch's ack (us; from the guest sending it to its release), recent epochs",
            ConstGauge::new(s.output_hold_us_p99),
        );
        r.register("epochs", "Epochs completed", ConstCounter::new(s.epochs));
        r.register("pages", "Pages shipped in epochs", ConstCounter::new(s.pages_total));
        r.register(
            "last_epoch_precopied_pages",
            "Pages of the last epoch copied by pre-copy rounds while the guest ran",
            ConstGauge::new(s.last_epoch.precopied as i64),
        );
        r.register(
            "precopy_rounds",
            "Pre-copy rounds (pages copied while the guest ran)",
            ConstCounter::new(s.precopy_rounds),
        );
        r.register(
            "precopied_pages",
            "Pages shipped from pre-copy rounds instead of being copied in a pause",
            ConstCounter::new(s.precopied_pages),
        );
        r.register(
            "pages_unchanged",
            "Pages reported dirty but not shipped (same content as the copy last shipped)",
            ConstCounter::new(s.pages_unchanged_total),
        );
        r.register(
            "pages_delta",
            "Pages shipped as sub-page deltas against the copy the secondary holds",
            ConstCounter::new(s.pages_delta_total),
        );
        r.register("bytes", "Page bytes shipped in epochs", ConstCounter::new(s.bytes_total));
        r.register("failovers", "Failovers this node performed", ConstCounter::new(s.failovers));
        r.register(
            "tracking_lost",
            "Epochs sent as full resyncs because dirty tracking was lost",
            ConstCounter::new(s.tracking_lost),
        );
        r.register("released_outputs", "Outputs released by output commit", ConstCounter::new(s.released_outputs));
        r.register(
            "released_frames",
            "Network frames of the guest released by output commit",
            ConstCounter::new(s.released_frames),
        );
        r.register(
            "resent_frames",
            "Network frames sent again at takeover (the restored state's unwritten frames)",
            ConstCounter::new(s.resent_frames),
        );
        r.register("syncs", "Secondary sessions started (initial syncs and resyncs)", ConstCounter::new(s.syncs));
        r.register("console_dropped", "Guest console lines dropped for backlog", ConstCounter::new(s.console_dropped));
        r.register("net_rx_frames", "Frames the network card handed to the guest", ConstCounter::new(s.net_rx_frames));
        r.register("net_rx_dropped", "Frames the network card dropped on receive", ConstCounter::new(s.net_rx_dropped));
        r.register(
            "net_tx_frames",
            "Frames the guest sent through its network card",
            ConstCounter::new(s.net_tx_frames),
        );
        r.register("net_interrupts", "Interrupts the network card raised", ConstCounter::new(s.net_interrupts));
        r.register("marks_dropped", "Guest marker writes dropped for backlog", ConstCounter::new(s.marks_dropped));
        if let Some(w) = &s.witness {
            r.register(
                "witness_reachable",
                "1 while the witness's last answer was definite",
                ConstGauge::new(i64::from(w.state == "ok")),
            );
            r.register(
                "witness_sync_recorded",
                "1 while the witness records this primary's secondary as caught up",
                ConstGauge::new(i64::from(w.sync_recorded)),
            );
            r.register(
                "witness_last_txn_ms",
                "Latency of the last witness transaction (ms)",
                ConstGauge::new(w.last_txn_ms),
            );
            r.register("witness_txns", "Witness transactions", ConstCounter::new(w.txns));
        }
        r.register("epoch_pause_us", "Guest pause per epoch boundary (us)", self.pause_hist.clone());
        r.register(
            "epoch_phase_us",
            "Parts of each epoch boundary's pause (us): stop (kick until parked), collect (harvest), copy, save, resume (until every vCPU thread left its park)",
            self.phase_hist.clone(),
        );
        r.register("epoch_ack_us", "Time from sending an epoch to its ack (us)", self.ack_hist.clone());
        r.register(
            "output_hold_us",
            "How long each acknowledged epoch's oldest output waited, from the guest sending it to its release (us)",
            self.hold_hist.clone(),
        );
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &r).is_err() {
            tracing::error!("metrics encoding failed");
        }
        out
    }
}
