//! Host tests only: a simulated Ethernet wire between two smoltcp devices.

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::vec;
use std::vec::Vec;

pub type Wire = Rc<RefCell<VecDeque<Vec<u8>>>>;

/// One end of the wire. With `budget`, at most that many frames may be sent
/// until the test refills it (like TX buffers the device returns per epoch).
pub struct Port {
    pub rx: Wire,
    pub tx: Wire,
    pub budget: Option<Rc<Cell<usize>>>,
}

pub struct Rx(Vec<u8>);
pub struct Tx<'a> {
    wire: &'a Wire,
    budget: Option<&'a Rc<Cell<usize>>>,
}

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0u8; len];
        let r = f(&mut b);
        if let Some(c) = self.budget {
            c.set(c.get() - 1);
        }
        self.wire.borrow_mut().push_back(b);
        r
    }
}

impl Port {
    fn can_send(&self) -> bool {
        self.budget.as_ref().is_none_or(|c| c.get() > 0)
    }
}

impl phy::Device for Port {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, _now: Instant) -> Option<(Rx, Tx<'_>)> {
        if !self.can_send() {
            return None;
        }
        let f = self.rx.borrow_mut().pop_front()?;
        Some((Rx(f), Tx { wire: &self.tx, budget: self.budget.as_ref() }))
    }
    fn transmit(&mut self, _now: Instant) -> Option<Tx<'_>> {
        self.can_send().then_some(Tx { wire: &self.tx, budget: self.budget.as_ref() })
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

