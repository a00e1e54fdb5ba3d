//! The guest ABI: mirrors `vmm/guest/abi.h` (guest physical layout, ports,
//! hypercalls, workload parameters). The built-in image is embedded here.

/// The built-in guest image (kernel + workloads), built from `vmm/guest` by build.rs.
pub static GUEST_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.bin"));

/// The networked guest (kernel + the Rust workload of `vmm/guest/net`: virtio-net,
/// smoltcp, a RESP2 server), built by build.rs. Runs [`WorkloadKind::Net`].
pub static GUEST_NET_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest-net.bin"));

/// The built-in image that runs `kind`.
pub fn guest_image(kind: WorkloadKind) -> &'static [u8] {
    match kind {
        WorkloadKind::Net => GUEST_NET_IMAGE,
        _ => GUEST_IMAGE,
    }
}

pub const PAGE_SIZE: u64 = 0x1000;
pub const BOOT_INFO_GPA: u64 = 0x1000;
pub const GDT_GPA: u64 = 0x2000;
pub const TSS_GPA: u64 = 0x3000;
pub const IDT_GPA: u64 = 0x4000;
pub const PML4_GPA: u64 = 0x20000;
pub const PDPT_GPA: u64 = 0x21000;
pub const PD_GPA: u64 = 0x22000;
/// Page directories available for the identity map (one per GiB).
pub const MAX_PD_PAGES: u64 = 64;
pub const IMAGE_GPA: u64 = 0x100000;
pub const IMAGE_MAX: u64 = 0x100000;
pub const KSTACK_GPA: u64 = 0x200000;
pub const KSTACK_SIZE: u64 = 0x4000;
pub const USTACK_GPA: u64 = 0x220000;
pub const USTACK_SIZE: u64 = 0x8000;
pub const PERCPU_GPA: u64 = 0x300000;
pub const MAILBOX_GPA: u64 = 0x310000;
pub const KV_HEADER_GPA: u64 = 0x320000;
/// Everything below this is the guest kernel's own (tables, stacks, per-cpu data).
pub const KERNEL_END: u64 = 0x400000;
pub const MAX_CPUS: u32 = 8;

pub const SEL_KCODE: u16 = 0x08;
pub const SEL_KDATA: u16 = 0x10;
pub const SEL_TSS0: u16 = 0x28;

pub const PORT_CONSOLE: u16 = 0x500;
pub const PORT_DONE: u16 = 0x501;
pub const PORT_FAULT: u16 = 0x502;
pub const PORT_KV_POLL: u16 = 0x510;
pub const PORT_KV_RESP: u16 = 0x511;
pub const PORT_MARK: u16 = 0x520;

pub const VEC_WAKE: u32 = 0x40;
/// MSI vector of the virtio-net card (sent to vCPU 0).
pub const VEC_NET: u32 = 0x41;

/// The virtio-mmio window of the network card (virtio 1.x, version 2, device
/// id 1): the start of the 3 GiB hole.
pub const NET_MMIO_GPA: u64 = 0xC000_0000;
pub const NET_MMIO_SIZE: u64 = 0x1000;
/// RAM the networked workload uses above `heap_offset` (stack, heap, rings).
pub const NET_WORKLOAD_BYTES: u64 = 32 << 20;
/// The TCP port the networked guest serves when none is given.
pub const NET_DEFAULT_PORT: u16 = 6379;

pub const PC_TICKS: u64 = 0x00;
pub const PC_WRITES: u64 = 0x08;
pub const PC_STAMP: u64 = 0x10;
pub const PC_KV_OPS: u64 = 0x20;

pub const KV_MAX_BATCH: usize = 32;
pub const KV_RESP_OFF: u64 = 0x800;

pub const BOOT_MAGIC: u64 = 0x3154_4f4f_4252_5453;
pub const IMAGE_MAGIC: u64 = 0x3147_4d49_5254_5343;

/// Guest console line limit (bytes), as in `struct con_buf`.
pub const CONSOLE_MAX: u32 = 252;

/// Which workload the guest's CPL3 code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u32)]
pub enum WorkloadKind {
    /// Waits for interrupts (no writes at CPL3).
    Idle = 0,
    /// The memory writer.
    Dirty = 1,
    /// The key-value service.
    Kv = 2,
    /// CPL0 (emulated) page writes: used to provoke ring overflow.
    KernelWrite = 3,
    /// The networked guest ([`GUEST_NET_IMAGE`]): a RESP2 server behind the
    /// virtio-net card, on vCPU 0 (other vCPUs idle).
    Net = 4,
}

/// Page selection pattern of the `dirty` workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u32)]
pub enum Pattern {
    Sequential = 0,
    Random = 1,
    HotCold = 2,
}

/// Workload parameters handed to the guest in its boot info: the one list
/// of them (`struct boot_info` of user.c from `ws_pages` on, with the kind
/// at `workload`); [`BootInfo::to_bytes`] lays them out for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkloadConfig {
    pub kind: WorkloadKind,
    /// dirty: pages in each vCPU's working set; kwrite: pages per round.
    pub ws_pages: u64,
    /// dirty: distance between working-set pages, in pages (spreads the set over RAM).
    pub ws_stride: u64,
    pub pattern: Pattern,
    /// hot/cold: percentage of writes that go to the hot tenth of the set.
    pub hot_percent: u32,
    /// Page writes per second per vCPU, 0 = as fast as possible.
    pub rate: u64,
    pub seed: u64,
    /// Progress line period in ms, 0 = none.
    pub report_ms: u64,
    /// dirty: writes per vCPU before reporting done; kwrite: rounds. 0 = forever.
    pub max_writes: u64,
    /// kv: table slots (power of two).
    pub kv_slots: u64,
    /// kv: client dedup slots (power of two).
    pub kv_clients: u64,
    /// dirty: a console line after every page write (a guest flooding its
    /// console; the VMM bounds and counts what it keeps).
    pub console_flood: bool,
    /// net: the guest's address and the port it serves.
    #[serde(default)]
    pub net: NetAddr,
}

/// The networked guest's static IPv4 settings (boot info `net_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetAddr {
    pub ipv4: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<std::net::Ipv4Addr>,
    pub port: u16,
}

impl Default for NetAddr {
    /// Unset: the guest reports that it has no address and waits.
    fn default() -> Self {
        NetAddr { ipv4: std::net::Ipv4Addr::UNSPECIFIED, prefix: 24, gateway: None, port: NET_DEFAULT_PORT }
    }
}

/// The boot-info encoding of an IPv4 address (octets in memory order).
pub fn ipv4_word(addr: std::net::Ipv4Addr) -> u32 {
    u32::from_le_bytes(addr.octets())
}

impl WorkloadConfig {
    /// A `dirty` writer.
    pub fn dirty(ws_pages: u64, pattern: Pattern, rate: u64) -> Self {
        WorkloadConfig { kind: WorkloadKind::Dirty, ws_pages, pattern, rate, ..Self::idle() }
    }
    /// The networked guest (a RESP2 server behind the virtio-net card).
    pub fn net(net: NetAddr) -> Self {
        WorkloadConfig { kind: WorkloadKind::Net, net, ..Self::idle() }
    }
    /// The `kv` service.
    pub fn kv() -> Self {
        WorkloadConfig { kind: WorkloadKind::Kv, ..Self::idle() }
    }
    /// A guest that only takes timer interrupts.
    pub fn idle() -> Self {
        WorkloadConfig {
            kind: WorkloadKind::Idle,
            ws_pages: 0,
            ws_stride: 1,
            pattern: Pattern::Sequential,
            hot_percent: 90,
            rate: 0,
            seed: 1,
            report_ms: 1000,
            max_writes: 0,
            kv_slots: 1 << 16,
            kv_clients: 1 << 12,
            console_flood: false,
            net: NetAddr::default(),
        }
    }
}

/// Size of `struct boot_info` (user.c asserts the same).
pub const BOOT_INFO_SIZE: usize = 160;

/// `struct boot_info` of user.c, written by the VMM at [`BOOT_INFO_GPA`]
/// (after [`BOOT_MAGIC`]): the machine's part, and its workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    pub ncpus: u32,
    pub tsc_khz: u64,
    pub timer_count: u64,
    pub ram_size: u64,
    pub hole_start: u64,
    pub hole_size: u64,
    pub heap_offset: u64,
    pub workload: WorkloadConfig,
}

impl BootInfo {
    /// The little-endian bytes the guest reads, in `struct boot_info`'s order.
    pub fn to_bytes(&self) -> Vec<u8> {
        let w = &self.workload;
        let mut v = Vec::with_capacity(BOOT_INFO_SIZE);
        v.extend_from_slice(&BOOT_MAGIC.to_le_bytes());
        v.extend_from_slice(&self.ncpus.to_le_bytes());
        v.extend_from_slice(&(w.kind as u32).to_le_bytes());
        for x in [
            self.tsc_khz,
            self.timer_count,
            self.ram_size,
            self.hole_start,
            self.hole_size,
            self.heap_offset,
            w.ws_pages,
            w.ws_stride,
        ] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.extend_from_slice(&(w.pattern as u32).to_le_bytes());
        v.extend_from_slice(&w.hot_percent.to_le_bytes());
        for x in [w.rate, w.seed, w.report_ms, w.max_writes, w.kv_slots, w.kv_clients, u64::from(w.console_flood)] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        let n = &w.net;
        let net = [ipv4_word(n.ipv4), u32::from(n.prefix), n.gateway.map_or(0, ipv4_word), u32::from(n.port)];
        for x in net {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }
}

pub use common::state::{KvOp, KvRequest, KvResponse};

pub const KV_OK: u32 = 0;
pub const KV_NOT_FOUND: u32 = 1;

/// Mailbox encoding of a request (`struct kv_req`).
pub fn kv_request_bytes(r: &KvRequest) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0..4].copy_from_slice(&r.client.to_le_bytes());
    b[4..8].copy_from_slice(&r.seq.to_le_bytes());
    b[8..12].copy_from_slice(&(r.op as u32).to_le_bytes());
    b[16..24].copy_from_slice(&r.key.to_le_bytes());
    b[24..32].copy_from_slice(&r.value.to_le_bytes());
    b
}

/// Decodes a mailbox response (`struct kv_resp`).
pub fn kv_response_from_bytes(b: &[u8; 32]) -> KvResponse {
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    KvResponse { client: u32_at(0), seq: u32_at(4), status: u32_at(8), value: u64_at(16), ops: u64_at(24) }
}

/// The header at the start of the image (`image_header` in boot.S).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    pub entry: u64,
    pub vector_table: u64,
    pub user_main: u64,
    pub bss_start: u64,
    pub image_end: u64,
}

/// Why an image was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AbiError {
    #[error("guest image too small or bad magic")]
    BadMagic,
    #[error("guest image address {0:#x} outside the image window")]
    BadAddress(u64),
}

impl ImageHeader {
    /// Parses and checks the header of `image` (loaded at [`IMAGE_GPA`]).
    pub fn parse(image: &[u8]) -> Result<Self, AbiError> {
        let q = |i: usize| -> Option<u64> {
            image.get(i * 8..i * 8 + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        };
        if q(0) != Some(IMAGE_MAGIC) {
            return Err(AbiError::BadMagic);
        }
        let h = ImageHeader {
            entry: q(1).ok_or(AbiError::BadMagic)?,
            vector_table: q(2).ok_or(AbiError::BadMagic)?,
            user_main: q(3).ok_or(AbiError::BadMagic)?,
            bss_start: q(4).ok_or(AbiError::BadMagic)?,
            image_end: q(5).ok_or(AbiError::BadMagic)?,
        };
        for a in [h.entry, h.vector_table, h.user_main, h.bss_start, h.image_end] {
            if !(IMAGE_GPA..=IMAGE_GPA + IMAGE_MAX).contains(&a) {
                return Err(AbiError::BadAddress(a));
            }
        }
        Ok(h)
    }

    /// Handler address for each of the 256 vectors (0 = not present).
    pub fn vectors(&self, image: &[u8]) -> Vec<u64> {
        let off = (self.vector_table - IMAGE_GPA) as usize;
        (0..256)
            .map(|v| {
                image
                    .get(off + v * 8..off + v * 8 + 8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .unwrap_or(0)
            })
            .collect()
    }
}

/// A 64-bit FNV-1a digest of the image: the guest image id of the VM shape.
pub fn image_id(image: &[u8]) -> u64 {
    image.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_image_header_is_sane() {
        let h = ImageHeader::parse(GUEST_IMAGE).expect("header");
        assert!(h.image_end as usize - IMAGE_GPA as usize >= GUEST_IMAGE.len());
        let v = h.vectors(GUEST_IMAGE);
        assert!(v[3] != 0 && v[13] != 0 && v[14] != 0 && v[0x20] != 0 && v[0x40] != 0 && v[0xff] != 0);
        assert_eq!(v[0x21], 0);
        assert_eq!(v[VEC_NET as usize], v[VEC_WAKE as usize], "0x41 shares the EOI-only handler of 0x40");
    }

    #[test]
    fn net_image_header_is_sane_and_fits() {
        assert!(GUEST_NET_IMAGE.len() as u64 <= IMAGE_MAX);
        let h = ImageHeader::parse(GUEST_NET_IMAGE).expect("header");
        assert!(h.image_end as usize - IMAGE_GPA as usize >= GUEST_NET_IMAGE.len());
        assert!(h.bss_start <= h.image_end);
        let v = h.vectors(GUEST_NET_IMAGE);
        assert!(v[3] != 0 && v[13] != 0 && v[14] != 0 && v[0x20] != 0 && v[0x40] != 0 && v[0x41] != 0);
        assert_ne!(image_id(GUEST_NET_IMAGE), image_id(GUEST_IMAGE));
        assert!(std::ptr::eq(guest_image(WorkloadKind::Net), GUEST_NET_IMAGE));
        assert!(std::ptr::eq(guest_image(WorkloadKind::Kv), GUEST_IMAGE));
    }

    #[test]
    fn bad_images_are_refused() {
        assert_eq!(ImageHeader::parse(&[0u8; 8]), Err(AbiError::BadMagic));
        let mut img = GUEST_IMAGE.to_vec();
        img[8..16].copy_from_slice(&0x10u64.to_le_bytes());
        assert_eq!(ImageHeader::parse(&img), Err(AbiError::BadAddress(0x10)));
    }

    #[test]
    fn boot_info_bytes_match_layout() {
        // every field a distinct value, at its offset in user.c's struct
        let workload = WorkloadConfig {
            kind: WorkloadKind::Kv,
            ws_pages: 11,
            ws_stride: 12,
            pattern: Pattern::HotCold,
            hot_percent: 13,
            rate: 14,
            seed: 15,
            report_ms: 16,
            max_writes: 17,
            kv_slots: 18,
            kv_clients: 19,
            console_flood: true,
            net: NetAddr {
                ipv4: std::net::Ipv4Addr::new(10, 0, 0, 2),
                prefix: 24,
                gateway: Some(std::net::Ipv4Addr::new(10, 0, 0, 1)),
                port: 6379,
            },
        };
        let b = BootInfo {
            ncpus: 3,
            tsc_khz: 4,
            timer_count: 5,
            ram_size: 6,
            hole_start: 7,
            hole_size: 8,
            heap_offset: 9,
            workload,
        };
        let v = b.to_bytes();
        assert_eq!(v.len(), BOOT_INFO_SIZE);
        let u64_at = |o: usize| u64::from_le_bytes(v[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(v[o..o + 4].try_into().unwrap());
        assert_eq!(u64_at(0), BOOT_MAGIC);
        assert_eq!((u32_at(8), u32_at(12)), (3, WorkloadKind::Kv as u32));
        let u64s = [(16, 4), (24, 5), (32, 6), (40, 7), (48, 8), (56, 9), (64, 11), (72, 12)];
        for (o, x) in u64s {
            assert_eq!(u64_at(o), x, "offset {o}");
        }
        assert_eq!((u32_at(80), u32_at(84)), (Pattern::HotCold as u32, 13));
        for (o, x) in [(88, 14), (96, 15), (104, 16), (112, 17), (120, 18), (128, 19), (136, 1)] {
            assert_eq!(u64_at(o), x, "offset {o}");
        }
        assert_eq!(&v[144..148], &[10, 0, 0, 2]);
        assert_eq!((u32_at(148), u32_at(156)), (24, 6379));
        assert_eq!(&v[152..156], &[10, 0, 0, 1]);
    }
}
