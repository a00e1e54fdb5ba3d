//! Boot-time setup the VMM does for the guest kernel: identity page tables with
//! A/D bits preset (so the guest never has KVM write them), GDT, per-cpu TSS,
//! IDT from the image's vector table, the boot info page, and each vCPU's
//! initial long-mode registers.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::abi::*;
use crate::memory::{GuestMem, MemoryError};

/// Errors of boot setup.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("guest image: {0}")]
    Image(#[from] AbiError),
    #[error("guest image of {0} bytes does not fit its 1 MiB window")]
    ImageTooLarge(usize),
    #[error("writing boot structures: {0}")]
    Memory(#[from] MemoryError),
}

const PTE_P: u64 = 1;
const PTE_RW: u64 = 2;
const PTE_US: u64 = 4;
const PTE_A: u64 = 0x20;
const PTE_D: u64 = 0x40;
const PTE_PS: u64 = 0x80;

fn put(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

/// Writes page tables, descriptor tables, image and boot info into `mem`.
/// Returns the parsed image header.
pub fn setup(mem: &GuestMem, image: &[u8], ncpus: u32, info: &BootInfo) -> Result<ImageHeader, BootError> {
    let header = ImageHeader::parse(image)?;
    if image.len() as u64 > IMAGE_MAX {
        return Err(BootError::ImageTooLarge(image.len()));
    }
    mem.write(IMAGE_GPA, image)?;

    // Identity map of [0, max(4 GiB, top of RAM)) with 2 MiB pages, user-accessible
    // (CPL3 workloads address RAM directly), A and D preset.
    let top = mem.regions().iter().map(|r| r.0 + r.1).max().unwrap_or(0).max(4 << 30);
    let gibs = top.div_ceil(1 << 30).min(MAX_PD_PAGES);
    let mut pml4 = Vec::new();
    put(&mut pml4, PDPT_GPA | PTE_P | PTE_RW | PTE_US | PTE_A);
    mem.write(PML4_GPA, &pml4)?;
    let mut pdpt = Vec::new();
    for g in 0..gibs {
        put(&mut pdpt, (PD_GPA + g * PAGE_SIZE) | PTE_P | PTE_RW | PTE_US | PTE_A);
    }
    mem.write(PDPT_GPA, &pdpt)?;
    for g in 0..gibs {
        let mut pd = Vec::with_capacity(4096);
        for j in 0..512u64 {
            put(&mut pd, ((g << 30) + (j << 21)) | PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D | PTE_PS);
        }
        mem.write(PD_GPA + g * PAGE_SIZE, &pd)?;
    }

    // GDT: null, kernel code/data, user data/code, then one 16-byte TSS descriptor per cpu.
    let mut gdt = Vec::new();
    for d in [0u64, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x00cf_f300_0000_ffff, 0x00af_fb00_0000_ffff] {
        put(&mut gdt, d);
    }
    for cpu in 0..u64::from(ncpus) {
        let base = TSS_GPA + cpu * 128;
        let limit = 103u64;
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x8b << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        put(&mut gdt, low);
        put(&mut gdt, base >> 32);
        // 64-bit TSS: rsp0 at offset 4, I/O map base past the limit (no bitmap).
        let mut tss = vec![0u8; 104];
        tss[4..12].copy_from_slice(&(KSTACK_GPA + (cpu + 1) * KSTACK_SIZE).to_le_bytes());
        tss[102..104].copy_from_slice(&104u16.to_le_bytes());
        mem.write(base, &tss)?;
    }
    mem.write(GDT_GPA, &gdt)?;

    // IDT from the image's vector table; vector 3 (the hypercall) is reachable from CPL3.
    let mut idt = Vec::with_capacity(4096);
    for (vec, &handler) in header.vectors(image).iter().enumerate() {
        if handler == 0 {
            put(&mut idt, 0);
            put(&mut idt, 0);
            continue;
        }
        let attr: u64 = if vec == 3 { 0xee } else { 0x8e };
        let low = (handler & 0xffff) | (u64::from(SEL_KCODE) << 16) | (attr << 40) | (((handler >> 16) & 0xffff) << 48);
        put(&mut idt, low);
        put(&mut idt, handler >> 32);
    }
    mem.write(IDT_GPA, &idt)?;
    mem.write(BOOT_INFO_GPA, &info.to_bytes())?;
    Ok(header)
}

#[allow(clippy::too_many_arguments)]
fn seg(selector: u16, type_: u8, s: u8, l: u8, db: u8, dpl: u8, base: u64, limit: u32, g: u8) -> kvm_segment {
    kvm_segment { base, limit, selector, type_, present: 1, dpl, db, s, l, g, avl: 0, unusable: 0, padding: 0 }
}

/// Initial special registers of `cpu`: long mode, paging, our GDT/IDT/TSS, GS = per-cpu page.
pub fn initial_sregs(mut sregs: kvm_sregs, cpu: u32) -> kvm_sregs {
    let cpu64 = u64::from(cpu);
    let code = seg(SEL_KCODE, 11, 1, 1, 0, 0, 0, 0xffff_ffff, 1);
    let data = seg(SEL_KDATA, 3, 1, 0, 1, 0, 0, 0xffff_ffff, 1);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.ss = data;
    sregs.fs = data;
    sregs.gs = kvm_segment { base: PERCPU_GPA + cpu64 * PAGE_SIZE, ..data };
    sregs.tr = seg(SEL_TSS0 + 16 * cpu as u16, 11, 0, 0, 0, 0, TSS_GPA + cpu64 * 128, 103, 0);
    sregs.ldt = kvm_segment { unusable: 1, present: 0, type_: 2, ..Default::default() };
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = (0x28 + 16 * MAX_CPUS - 1) as u16;
    sregs.idt.base = IDT_GPA;
    sregs.idt.limit = 0xfff;
    sregs.cr0 = 0x8005_0033; // PG | AM | WP | NE | ET | MP | PE
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = 0x620; // OSXMMEXCPT | OSFXSR | PAE
    sregs.efer = 0x500; // LMA | LME
    sregs
}

/// Initial general registers of `cpu`.
pub fn initial_regs(header: &ImageHeader, cpu: u32) -> kvm_regs {
    kvm_regs {
        rip: header.entry,
        rsp: KSTACK_GPA + (u64::from(cpu) + 1) * KSTACK_SIZE,
        rdi: u64::from(cpu),
        rsi: BOOT_INFO_GPA,
        rflags: 2,
        ..Default::default()
    }
}
