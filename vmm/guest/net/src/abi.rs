//! The part of vmm/guest/abi.h (mirrored in vmm/src/abi.rs) this workload uses.

pub const BOOT_MAGIC: u64 = 0x3154_4f4f_4252_5453;
pub const PORT_CONSOLE: u16 = 0x500;
pub const HC_OUT: u64 = 1;
pub const HC_WAIT: u64 = 3;
pub const WL_NET: u32 = 4;
/// The virtio-mmio window of the network card (start of the 3 GiB hole).
pub const NET_MMIO_GPA: u64 = 0xC000_0000;
pub const NET_MMIO_SIZE: usize = 0x1000;
/// RAM the workload asks for above `heap_offset` (the VMM reserves it for WL_NET).
pub const NET_WORKLOAD_BYTES: u64 = 32 << 20;
/// The default TCP port.
pub const NET_DEFAULT_PORT: u16 = 6379;

/// `struct boot_info` (abi.h), written by the VMM at BOOT_INFO_GPA.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    pub magic: u64,
    pub ncpus: u32,
    pub workload: u32,
    pub tsc_khz: u64,
    pub timer_count: u64,
    pub ram_size: u64,
    pub hole_start: u64,
    pub hole_size: u64,
    pub heap_offset: u64,
    pub ws_pages: u64,
    pub ws_stride: u64,
    pub pattern: u32,
    pub hot_percent: u32,
    pub rate: u64,
    pub seed: u64,
    pub report_ms: u64,
    pub max_writes: u64,
    pub kv_slots: u64,
    pub kv_clients: u64,
    pub console_flood: u64,
    /// IPv4 address, octets in memory order a.b.c.d.
    pub net_ipv4: [u8; 4],
    pub net_prefix: u32,
    /// Default gateway, same encoding; 0.0.0.0 = none.
    pub net_gateway: [u8; 4],
    pub net_port: u32,
}
const _: () = assert!(core::mem::size_of::<BootInfo>() == 160);

impl BootInfo {
    /// Guest-physical address of linear RAM offset `lin` (RAM above the hole
    /// start lives above the hole).
    pub fn lin_to_gpa(&self, lin: u64) -> u64 {
        if lin < self.hole_start {
            lin
        } else {
            lin + self.hole_size
        }
    }
}
