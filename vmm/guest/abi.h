/* castor guest ABI: shared by the guest kernel (boot.S), the CPL3 workloads
 * (user.c) and the VMM (vmm/src/abi.rs mirrors every value here; a unit test
 * there checks the layout against the image header). */
#ifndef CASTOR_ABI_H
#define CASTOR_ABI_H

#define PAGE_SIZE        0x1000
#define BOOT_INFO_GPA    0x1000
#define GDT_GPA          0x2000
#define TSS_GPA          0x3000
#define IDT_GPA          0x4000
#define PML4_GPA         0x20000
#define IMAGE_GPA        0x100000
#define KSTACK_GPA       0x200000
#define KSTACK_SIZE      0x4000
#define USTACK_GPA       0x220000
#define USTACK_SIZE      0x8000
#define PERCPU_GPA       0x300000
#define MAILBOX_GPA      0x310000
#define KV_HEADER_GPA    0x320000
#define KERNEL_END       0x400000
#define MAX_CPUS         8

#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA 0x1b
#define SEL_UCODE 0x23
#define SEL_TSS0  0x28

/* ports (reached from CPL3 through the int3 hypercall) */
#define PORT_CONSOLE   0x500 /* OUT: gpa of {u32 len; char bytes[len]} */
#define PORT_DONE      0x501 /* OUT: workload finished, value = exit code */
#define PORT_FAULT     0x502 /* OUT: unexpected exception, value = vector */
#define PORT_KV_POLL   0x510 /* IN:  number of requests placed in this cpu's mailbox */
#define PORT_KV_RESP   0x511 /* OUT: number of responses written to this cpu's mailbox */
#define PORT_MARK      0x520 /* OUT: workload phase marker (tests) */

/* hypercalls: rax = number, rdi/rsi = arguments, result in rax */
#define HC_OUT        1
#define HC_IN         2
#define HC_WAIT       3  /* sti; hlt: sleep until the next interrupt */
#define HC_KWRITE     4  /* CPL0 writes qword rdx to each of rsi pages from gpa rdi (emulated) */

#define VEC_TIMER 0x20
#define VEC_WAKE  0x40
#define VEC_NET   0x41  /* MSI of the virtio-net card (vCPU 0) */
#define VEC_SPURIOUS 0xff

/* workloads */
#define WL_IDLE   0
#define WL_DIRTY  1
#define WL_KV     2
#define WL_KWRITE 3
#define WL_NET    4  /* the networked guest (guest-net.bin, vmm/guest/net) */

/* virtio-net over virtio-mmio (virtio 1.x, version register 2), device id 1 */
#define NET_MMIO_GPA       0xC0000000  /* start of the 3 GiB hole */
#define NET_MMIO_SIZE      0x1000
#define NET_WORKLOAD_BYTES (32 << 20)  /* RAM above heap_offset for WL_NET */
#define NET_DEFAULT_PORT   6379

#define PAT_SEQ     0
#define PAT_RANDOM  1
#define PAT_HOTCOLD 2

/* per-cpu page (GS base for the kernel, plain memory for CPL3) */
#define PC_TICKS   0x00
#define PC_WRITES  0x08  /* dirty: page writes done */
#define PC_STAMP   0x10  /* dirty: last stamp written */
#define PC_LOOPS   0x18
#define PC_KV_OPS  0x20  /* kv: requests handled by this cpu */

#define KV_MAX_BATCH 32
#define KV_RESP_OFF  0x800

#define KV_OP_GET 1
#define KV_OP_PUT 2
#define KV_OP_ADD 3
#define KV_OP_DEL 4

#define KV_OK        0
#define KV_NOT_FOUND 1
#define KV_FULL      2
#define KV_STALE     3
#define KV_BAD_OP    4

#define BOOT_MAGIC  0x31544f4f42525453ULL /* "STRBOOT1" */
#define IMAGE_MAGIC 0x31474d4952545343ULL /* "CSTRIMG1" */

#endif
