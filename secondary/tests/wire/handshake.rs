//! Replication wire, handshake refusals: a stale generation, a guest CPU
//! the secondary's host cannot run.

use common::proto;
use primary::sender::{Offer, SenderError, Session};
use secondary::receiver::ReceiverConfig;

use super::{expect_refusal, offer, pair, Fixture};

#[tokio::test]
async fn a_stale_generation_is_fenced() {
    let mut fx = Fixture::new();
    fx.cfg = ReceiverConfig::new(fx.secret.clone(), 5, pair());
    let f = &fx;
    expect_refusal(f, "stale-generation", |addr| async move {
        let r = Session::connect(addr, &f.secret, &offer(&f.shape, 4, &pair())).await;
        assert!(matches!(r, Err(SenderError::Refused { code: proto::RefuseCode::StaleGeneration, .. })), "{r:?}");
    })
    .await;
}

/// Issue 28, item 3: a primary whose guest was given CPU features this
/// host's KVM lacks is refused when the pair forms (before, the pair was
/// protected and the takeover died at failover), and nothing reaches the
/// replica.
#[tokio::test]
async fn a_guest_cpu_this_host_cannot_run_is_refused_in_the_handshake() {
    let mut fx = Fixture::new();
    let guest = vmm::cpu::host_model().expect("host model");
    let mut poorer = guest.clone();
    for f in &mut poorer.features {
        if f.0 == 1 && f.2 == 'd' {
            f.3 &= !(1 << 26); // no SSE2
        }
    }
    fx.cfg.host_cpu = Some(poorer);
    let f = &fx;
    expect_refusal(f, "cannot-restore", |addr| async move {
        let o = Offer { cpu: guest.clone(), ..offer(&f.shape, 1, &pair()) };
        match Session::connect(addr, &f.secret, &o).await {
            Err(SenderError::Refused { code: proto::RefuseCode::Cpu, reason }) => {
                assert!(reason.contains("CPUID 0x1.0 d") && reason.contains("0x04000000"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    })
    .await;
    // the same guest on a host that has it all
    fx.cfg.host_cpu = Some(vmm::cpu::host_model().expect("host model"));
    let (addr, server) = fx.serve_one().await;
    let o = Offer { cpu: vmm::cpu::host_model().expect("host model"), ..offer(&fx.shape, 1, &pair()) };
    let s = Session::connect(addr, &fx.secret, &o).await.expect("a host that has every feature accepts");
    drop(s);
    let _ = server.await;
}
