//! A node's tokio runtime: how many workers it runs, and why.

/// Runtime workers of a node, beside its main thread (the node's own loop)
/// and the heartbeat thread (`common::beats`): one for a node with a
/// network card (`--net`), two without.
///
/// With a card the guest's clients talk to the guest through the TAP, and
/// the runtime carries the link and the card's frames: with one worker the
/// link's tasks hand off without cross-thread wakes (this project's 2-core
/// host, interleaved rounds: +4% INCR/s at 64 connections, ~0.07 ms less
/// added p50 at 16; docs/benchmarks.md, sixth session). Without a card the
/// kv guest's clients (thousands of connections) are served on this
/// runtime, and one worker cost 15-20% of their unprotected rate in
/// `castor bench --quick`. Heartbeats no longer share these workers: with
/// them on a single worker, the pair lost its session in 2 of 8 runs of the
/// 1 GiB sync test beside two busy loops (fifth session); on their own
/// thread, 0 of 8.
fn node_workers(net: bool) -> usize {
    if net {
        1
    } else {
        2
    }
}

/// A node's runtime ([`node_workers`] worker threads).
pub(crate) fn runtime(net: bool) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(node_workers(net))
        .enable_all()
        .build()
        .expect("tokio runtime")
}
