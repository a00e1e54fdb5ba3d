//! The fencing protocol as a model, checked with stateright (issue 11).
//!
//! Processes: the first primary `P1` (term 1), its secondary `S` (which
//! may take over and then runs as a primary), and `P3`, a fresh
//! `castor primary --replace` an operator starts for the same VM once
//! every earlier primary is dead (without `--replace` castor refuses a VM
//! id that has a term: a frozen primary's lease expires like a dead one's,
//! and the model finds the split brain that would allow). The witness holds `term` and `sync`.
//! Every process may crash, freeze and thaw at any moment (a frozen one
//! simply takes no step), the link between P1 and S may drop at any moment,
//! acks may be lost or arrive after S took over (P1 applies one only while
//! S answered a heartbeat within the timeout, as the replicator does), and
//! S takes over only after a heartbeat silence (or when P1 is frozen).
//!
//! The transactions are the ones `witness::Witness` runs:
//! record-sync (P1, at a session's first ack: `term == g` -> `sync = {S, g}`),
//! run-alone (P1 holding: `term == g` -> delete `sync`),
//! promote (S: `term == g && sync == {S, g}` -> `term = g + 1`, delete `sync`),
//! claim (P3: `term = t + 1`, when no primary's lease is alive and the
//! operator says every earlier primary is dead).
//!
//! Properties:
//! * at most one term releases output at any time: once a term has
//!   released, no lower term releases again;
//! * no output that was released is missing from the state a later
//!   primary runs (a takeover starts from every released epoch);
//! * with the witness up and one node up that holds the newest state,
//!   that node can serve by its own steps alone.
//!
//! Mutations of the transactions (dropping a term compare) must make the
//! checker find a counterexample: the tests below show it does.

use std::collections::{HashSet, VecDeque};

use stateright::{Checker, Model, Property};

/// Epochs a primary produces in the model.
const MAX_EPOCH: u8 = 3;
/// The secondary's name in `sync`.
const S: u8 = 2;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum PMode {
    Syncing,
    Protected,
    Holding,
    Alone,
    Fenced,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Prim {
    term: u8,
    mode: PMode,
    produced: u8,
    acked: u8,
    released: u8,
    up: bool,
    frozen: bool,
    /// A session with S is up.
    session: bool,
    /// S acknowledged an epoch in this session.
    session_acked: bool,
    /// S committed an epoch of this session (the first is a resync to
    /// everything produced: a live sync or a full-memory epoch).
    session_shipped: bool,
    /// The witness recorded S as caught up in this session.
    sync_ok: bool,
    /// S answered a heartbeat within the timeout (P1's view). An ack is
    /// applied only while this holds; a thawed P1 has been silent.
    fresh: bool,
}

impl Prim {
    fn new(term: u8, mode: PMode, produced: u8) -> Prim {
        Prim {
            term,
            mode,
            produced,
            acked: 0,
            released: produced,
            up: true,
            frozen: false,
            session: false,
            session_acked: false,
            session_shipped: false,
            sync_ok: false,
            fresh: true,
        }
    }
    fn acts(&self) -> bool {
        self.up && !self.frozen && self.mode != PMode::Fenced
    }
    fn serving(&self) -> bool {
        self.acts() && matches!(self.mode, PMode::Alone | PMode::Protected)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct St {
    term: u8,
    sync: Option<(u8, u8)>,
    p1: Prim,
    /// S as a secondary.
    s_up: bool,
    s_frozen: bool,
    /// S's committed epoch (0: none).
    replica: u8,
    /// S after its takeover (lineage of P1, continued).
    s_prim: Option<Prim>,
    /// A fresh primary (another guest of the same VM id).
    p3: Option<Prim>,
    /// The highest term that has released output.
    top_released: u8,
    /// The highest epoch of P1's lineage released by anyone.
    a_released: u8,
    stale_release: bool,
    lost: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Who {
    P1,
    S,
    P3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Action {
    Produce(Who),
    Ship,
    /// An ack reaches P1 (it may have been in flight when S took over).
    Ack,
    /// A heartbeat round trip between P1 and S.
    Heartbeat,
    /// Time passes without a heartbeat reply reaching P1.
    Silence,
    RecordSync,
    LoseSession,
    Reconnect,
    RunAlone,
    Promote,
    Claim,
    Crash(Who),
    Freeze(Who),
    Thaw(Who),
}

impl Action {
    fn who(&self) -> Who {
        match self {
            Action::Produce(w) | Action::Crash(w) | Action::Freeze(w) | Action::Thaw(w) => *w,
            Action::Ship
            | Action::Ack
            | Action::Heartbeat
            | Action::Silence
            | Action::RecordSync
            | Action::LoseSession
            | Action::Reconnect
            | Action::RunAlone => Who::P1,
            Action::Promote => Who::S,
            Action::Claim => Who::P3,
        }
    }
}

/// Which compare is dropped (to show the checker catches it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mutation {
    None,
    /// Promotion checks only that `sync` names S (no term anywhere).
    NoTermInPromote,
    /// Running alone deletes `sync` whatever the term.
    NoTermInRunAlone,
    /// P1 applies every ack, however long S has been silent (the suite saw
    /// this: a thawed primary released acked output after the takeover).
    NoAckFreshness,
}

struct Fencing {
    mutation: Mutation,
}

fn release(st: &mut St, who: Who, upto: u8) {
    let p = match who {
        Who::P1 => &mut st.p1,
        Who::S => st.s_prim.as_mut().expect("s runs"),
        Who::P3 => st.p3.as_mut().expect("p3 runs"),
    };
    if upto <= p.released {
        return;
    }
    p.released = upto;
    let term = p.term;
    if term < st.top_released {
        st.stale_release = true;
    }
    st.top_released = st.top_released.max(term);
    if who != Who::P3 {
        st.a_released = st.a_released.max(upto);
    }
}

impl Fencing {
    fn s_acts(st: &St) -> bool {
        st.s_up && !st.s_frozen && st.s_prim.is_none()
    }

    fn promote_allowed(&self, st: &St) -> bool {
        let g = st.p1.term; // the term S replicated
        match self.mutation {
            Mutation::NoTermInPromote => st.sync.map(|s| s.0) == Some(S),
            _ => st.term == g && st.sync == Some((S, g)),
        }
    }

    /// The one process up (not crashed, not frozen) that holds the newest
    /// state, if exactly one process is up.
    fn sole_holder(st: &St) -> Option<Who> {
        let p1 = st.p1.up && !st.p1.frozen;
        let s = if let Some(sp) = &st.s_prim { sp.up && !sp.frozen } else { st.s_up && !st.s_frozen };
        let p3 = st.p3.as_ref().is_some_and(|p| p.up && !p.frozen);
        match (p1, s, p3) {
            (true, false, false) if st.p1.mode != PMode::Fenced && st.term == st.p1.term => Some(Who::P1),
            (false, true, false) => match &st.s_prim {
                Some(sp) if sp.term == st.term => Some(Who::S),
                None if st.replica > 0 && st.sync == Some((S, st.term)) && st.term == st.p1.term => Some(Who::S),
                _ => None,
            },
            (false, false, true) if st.p3.as_ref().is_some_and(|p| p.term == st.term) => Some(Who::P3),
            _ => None,
        }
    }

    fn serving(st: &St, who: Who) -> bool {
        match who {
            Who::P1 => st.p1.serving(),
            Who::S => st.s_prim.as_ref().is_some_and(Prim::serving),
            Who::P3 => st.p3.as_ref().is_some_and(Prim::serving),
        }
    }

    /// Can `who` reach a serving state by its own (non-fault) steps?
    fn can_serve_alone(&self, st: &St, who: Who) -> bool {
        let mut seen = HashSet::new();
        let mut q = VecDeque::from([(st.clone(), 0)]);
        while let Some((s, d)) = q.pop_front() {
            if Self::serving(&s, who) {
                return true;
            }
            if d >= 8 || !seen.insert(s.clone()) {
                continue;
            }
            let mut acts = Vec::new();
            self.actions(&s, &mut acts);
            for a in acts {
                let fault = matches!(a, Action::Crash(_) | Action::Freeze(_) | Action::Thaw(_));
                if a.who() == who && !fault {
                    if let Some(n) = self.next_state(&s, a) {
                        q.push_back((n, d + 1));
                    }
                }
            }
        }
        false
    }
}

impl Model for Fencing {
    type State = St;
    type Action = Action;

    fn init_states(&self) -> Vec<St> {
        // P1 has claimed term 1 and dialed S: a session is syncing
        let mut p1 = Prim::new(1, PMode::Syncing, 0);
        p1.session = true;
        vec![St {
            term: 1,
            sync: None,
            p1,
            s_up: true,
            s_frozen: false,
            replica: 0,
            s_prim: None,
            p3: None,
            top_released: 0,
            a_released: 0,
            stale_release: false,
            lost: false,
        }]
    }

    fn actions(&self, st: &St, out: &mut Vec<Action>) {
        let p1 = &st.p1;
        if p1.acts() {
            if p1.produced < MAX_EPOCH {
                out.push(Action::Produce(Who::P1));
            }
            if p1.session && Self::s_acts(st) && (!p1.session_shipped || st.replica < p1.produced) {
                out.push(Action::Ship);
            }
            if p1.session && p1.session_shipped && st.replica > p1.acked {
                out.push(Action::Ack);
            }
            if p1.session && Self::s_acts(st) && !p1.fresh {
                out.push(Action::Heartbeat);
            }
            if p1.fresh {
                out.push(Action::Silence);
            }
            if p1.session && p1.session_acked && !p1.sync_ok {
                out.push(Action::RecordSync);
            }
            if p1.session {
                out.push(Action::LoseSession);
            }
            if !p1.session && Self::s_acts(st) && matches!(p1.mode, PMode::Holding | PMode::Alone) {
                out.push(Action::Reconnect);
            }
            if p1.mode == PMode::Holding {
                out.push(Action::RunAlone);
            }
        }
        // S takes over after its heartbeat timeout: heartbeats are request
        // and reply, so P1 has heard nothing either (or P1 is frozen/dead)
        let p1_silent = !p1.fresh || p1.frozen || !p1.up || !p1.session;
        if Self::s_acts(st) && st.replica > 0 && p1_silent {
            out.push(Action::Promote);
        }
        if let Some(sp) = &st.s_prim {
            if sp.acts() && sp.produced < MAX_EPOCH + 2 {
                out.push(Action::Produce(Who::S));
            }
        }
        if let Some(p3) = &st.p3 {
            if p3.acts() && p3.produced < 1 {
                out.push(Action::Produce(Who::P3));
            }
        }
        // a fresh primary claims an existing VM id only with `--replace`,
        // the operator's statement that every earlier primary is dead
        // (castor cannot check it: a frozen one's lease expires too)
        let p1_dead = !st.p1.up;
        let s_dead = st.s_prim.as_ref().is_none_or(|p| !p.up);
        if st.p3.is_none() && p1_dead && s_dead {
            out.push(Action::Claim);
        }
        for w in [Who::P1, Who::S, Who::P3] {
            let (up, frozen) = match w {
                Who::P1 => (st.p1.up, st.p1.frozen),
                Who::S => match &st.s_prim {
                    Some(p) => (p.up, p.frozen),
                    None => (st.s_up, st.s_frozen),
                },
                Who::P3 => match &st.p3 {
                    Some(p) => (p.up, p.frozen),
                    None => (false, false),
                },
            };
            if up {
                out.push(Action::Crash(w));
                out.push(if frozen { Action::Thaw(w) } else { Action::Freeze(w) });
            }
        }
    }

    fn next_state(&self, last: &St, a: Action) -> Option<St> {
        let mut st = last.clone();
        match a {
            Action::Produce(Who::P1) => {
                st.p1.produced += 1;
                if st.p1.mode == PMode::Alone {
                    let n = st.p1.produced;
                    release(&mut st, Who::P1, n);
                }
            }
            Action::Produce(Who::S) => {
                let sp = st.s_prim.as_mut()?;
                sp.produced += 1;
                let n = sp.produced;
                release(&mut st, Who::S, n);
            }
            Action::Produce(Who::P3) => {
                let p = st.p3.as_mut()?;
                p.produced += 1;
                let n = p.produced;
                release(&mut st, Who::P3, n);
            }
            Action::Ship => {
                if st.p1.session_shipped {
                    st.replica += 1;
                } else {
                    // the session's resync epoch: everything produced so far
                    st.replica = st.p1.produced.max(1);
                    st.p1.produced = st.replica;
                    st.p1.session_shipped = true;
                }
            }
            Action::Heartbeat => st.p1.fresh = true,
            Action::Silence => st.p1.fresh = false,
            Action::Ack if !st.p1.fresh && self.mutation != Mutation::NoAckFreshness => {
                // the replicator's freshness check: the session is lost
                st.p1.session = false;
                st.p1.session_shipped = false;
                st.p1.sync_ok = false;
                st.p1.session_acked = false;
                if matches!(st.p1.mode, PMode::Syncing | PMode::Protected) {
                    st.p1.mode = PMode::Holding;
                }
            }
            Action::Ack => {
                st.p1.acked = st.replica;
                st.p1.session_acked = true;
                if st.p1.sync_ok {
                    st.p1.mode = PMode::Protected;
                    let n = st.p1.acked;
                    release(&mut st, Who::P1, n);
                }
            }
            Action::RecordSync => {
                if st.term == st.p1.term {
                    st.sync = Some((S, st.p1.term));
                    st.p1.sync_ok = true;
                    st.p1.mode = PMode::Protected;
                    let n = st.p1.acked;
                    release(&mut st, Who::P1, n);
                } else {
                    st.p1.mode = PMode::Fenced;
                }
            }
            Action::LoseSession => {
                st.p1.session = false;
                st.p1.session_shipped = false;
                st.p1.sync_ok = false;
                st.p1.session_acked = false;
                if matches!(st.p1.mode, PMode::Syncing | PMode::Protected) {
                    st.p1.mode = PMode::Holding;
                }
            }
            Action::Reconnect => {
                // a new session resyncs S (its replica stays at its
                // committed epoch until the resync's epoch commits)
                st.p1.session = true;
                st.p1.fresh = true;
                st.p1.mode = PMode::Syncing;
                st.p1.acked = 0;
            }
            Action::RunAlone => {
                if self.mutation == Mutation::NoTermInRunAlone || st.term == st.p1.term {
                    st.sync = None;
                    st.p1.mode = PMode::Alone;
                    let n = st.p1.produced;
                    release(&mut st, Who::P1, n);
                } else {
                    st.p1.mode = PMode::Fenced;
                }
            }
            Action::Promote => {
                if !self.promote_allowed(&st) {
                    return None; // refused: nothing changes
                }
                st.term += 1;
                st.sync = None;
                if st.replica < st.a_released {
                    st.lost = true;
                }
                let mut sp = Prim::new(st.term, PMode::Alone, st.replica);
                sp.released = st.replica;
                // P1 learns of it only by its own steps (a lost session,
                // a refused transaction)
                st.s_prim = Some(sp);
            }
            Action::Claim => {
                st.term += 1;
                st.p3 = Some(Prim::new(st.term, PMode::Alone, 0));
            }
            Action::Crash(w) | Action::Freeze(w) | Action::Thaw(w) => {
                let (up, frozen): (&mut bool, &mut bool) = match w {
                    Who::P1 => (&mut st.p1.up, &mut st.p1.frozen),
                    Who::S => match st.s_prim.as_mut() {
                        Some(p) => (&mut p.up, &mut p.frozen),
                        None => (&mut st.s_up, &mut st.s_frozen),
                    },
                    Who::P3 => {
                        let p = st.p3.as_mut()?;
                        (&mut p.up, &mut p.frozen)
                    }
                };
                match a {
                    Action::Crash(_) => *up = false,
                    Action::Freeze(_) => *frozen = true,
                    _ => *frozen = false,
                }
                if matches!(a, Action::Thaw(Who::P1)) {
                    // it was silent for as long as it was frozen
                    st.p1.fresh = false;
                }
            }
        }
        Some(st)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("at most one term releases output", |_, st: &St| !st.stale_release),
            Property::always("released output survives a takeover", |_, st: &St| !st.lost),
            Property::always("one node up with the newest state can serve", |m: &Fencing, st: &St| {
                Fencing::sole_holder(st).is_none_or(|w| m.can_serve_alone(st, w))
            }),
            Property::sometimes("the secondary takes over and serves", |_, st: &St| {
                st.s_prim.as_ref().is_some_and(|p| p.released > p.produced.saturating_sub(1) && p.produced > 0)
            }),
            Property::sometimes("the primary runs alone", |_, st: &St| st.p1.mode == PMode::Alone),
        ]
    }
}

fn check(mutation: Mutation) -> (usize, Vec<&'static str>) {
    let c = Fencing { mutation }.checker().spawn_bfs().join();
    let mut found: Vec<&'static str> = c.discoveries().keys().copied().collect();
    found.sort();
    if let Some(p) = c.discovery("at most one term releases output") {
        eprintln!("{mutation:?}: counterexample {:?}", p.into_actions());
    }
    (c.unique_state_count(), found)
}

#[test]
fn the_fencing_protocol_holds_its_properties() {
    let c = Fencing { mutation: Mutation::None }.checker().spawn_bfs().join();
    eprintln!("fencing model: {} states", c.unique_state_count());
    c.assert_properties();
}

#[test]
fn dropping_the_term_compare_from_the_promotion_is_caught() {
    let (states, found) = check(Mutation::NoTermInPromote);
    eprintln!("promotion without a term compare: {states} states, discoveries {found:?}");
    assert!(found.contains(&"at most one term releases output"), "{found:?}");
}

#[test]
fn dropping_the_term_compare_from_running_alone_is_caught() {
    let (states, found) = check(Mutation::NoTermInRunAlone);
    eprintln!("run-alone without a term compare: {states} states, discoveries {found:?}");
    assert!(found.contains(&"at most one term releases output"), "{found:?}");
}

#[test]
fn dropping_the_ack_freshness_check_is_caught() {
    let (states, found) = check(Mutation::NoAckFreshness);
    eprintln!("acks applied without a fresh heartbeat: {states} states, discoveries {found:?}");
    assert!(found.contains(&"at most one term releases output"), "{found:?}");
}
