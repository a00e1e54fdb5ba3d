/* castor guest kernel: runs at CPL0 (instruction-emulated on KVM-PVM, so every
 * path here is kept short). The VMM enters every vCPU directly in long mode with
 * paging, GDT, TSS and IDT already built (vmm/src/boot.rs), rdi = cpu index,
 * rsi = boot info. The kernel programs its LAPIC timer and drops to CPL3. */
#include "abi.h"

    .section .header, "a"
    .globl image_header
image_header:
    .quad IMAGE_MAGIC
    .quad kernel_entry
    .quad vector_table
    .quad user_main
    .quad __bss_start
    .quad __image_end

    .section .rodata
    .balign 8
/* handler address per vector, 0 = not present; vector 3 gets a DPL3 gate */
vector_table:
    .quad isr_de, isr_db, isr_nmi, isr_hcall, isr_of, isr_br, isr_ud, isr_nm
    .quad isr_df, isr_cso, isr_ts, isr_np, isr_ss, isr_gp, isr_pf, isr_r15
    .quad isr_mf, isr_ac, isr_mc, isr_xm, isr_ve, isr_cp, isr_r22, isr_r23
    .quad isr_r24, isr_r25, isr_r26, isr_r27, isr_r28, isr_r29, isr_r30, isr_r31
    .quad isr_timer                 /* 0x20 */
    .fill 31, 8, 0
    .quad isr_eoi                   /* 0x40: wake-up (MSI from the VMM) */
    .quad isr_eoi                   /* 0x41: virtio-net (MSI from the VMM) */
    .fill 189, 8, 0
    .quad isr_spurious              /* 0xff */

    .text
    .code64
    .globl kernel_entry
kernel_entry:
    mov %rdi, %r12
    mov %rsi, %r13
    mov $0xfee00000, %rbx
    movl $0x1ff, 0xf0(%rbx)          /* SVR: enable, spurious 0xff */
    movl $0, 0x80(%rbx)              /* TPR */
    movl $0xb, 0x3e0(%rbx)           /* divide by 1 */
    movl $0x20020, 0x320(%rbx)       /* LVT timer: periodic, vector 0x20 */
    mov 24(%r13), %eax               /* boot_info.timer_count */
    mov %eax, 0x380(%rbx)            /* initial count: timer starts */
    /* user stack top for this cpu, minus 8 so user_main sees a call-aligned stack */
    mov %r12, %rax
    inc %rax
    shl $15, %rax                    /* * USTACK_SIZE */
    add $(USTACK_GPA - 8), %rax
    pushq $SEL_UDATA
    push %rax
    pushq $0x202
    pushq $SEL_UCODE
    pushq $user_main
    mov %r12, %rdi
    mov %r13, %rsi
    iretq

isr_timer:
    incq %gs:PC_TICKS
isr_eoi:
    push %rax
    mov $0xfee000b0, %rax
    movl $0, (%rax)
    pop %rax
isr_spurious:
    iretq

/* int3 from CPL3: rax = hypercall number, rdi/rsi arguments, rax = result */
isr_hcall:
    cmp $HC_OUT, %rax
    je 1f
    cmp $HC_IN, %rax
    je 2f
    cmp $HC_WAIT, %rax
    je 3f
    cmp $HC_KWRITE, %rax
    je 4f
    mov $-1, %rax
    iretq
1:  push %rdx
    mov %edi, %edx
    mov %esi, %eax
    out %eax, %dx
    pop %rdx
    xor %eax, %eax
    iretq
2:  push %rdx
    mov %edi, %edx
    in %dx, %eax
    pop %rdx
    iretq
3:  sti
    hlt
    cli
    xor %eax, %eax
    iretq
4:  push %rdi
    push %rsi
5:  test %rsi, %rsi
    jz 6f
    mov %rdx, (%rdi)
    add $PAGE_SIZE, %rdi
    dec %rsi
    jmp 5b
6:  pop %rsi
    pop %rdi
    xor %eax, %eax
    iretq

.macro FAULT name, vec, has_err
\name:
    .if \has_err == 0
    pushq $0
    .endif
    pushq $\vec
    jmp fault_common
.endm
    FAULT isr_de, 0, 0
    FAULT isr_db, 1, 0
    FAULT isr_nmi, 2, 0
    FAULT isr_of, 4, 0
    FAULT isr_br, 5, 0
    FAULT isr_ud, 6, 0
    FAULT isr_nm, 7, 0
    FAULT isr_df, 8, 1
    FAULT isr_cso, 9, 0
    FAULT isr_ts, 10, 1
    FAULT isr_np, 11, 1
    FAULT isr_ss, 12, 1
    FAULT isr_gp, 13, 1
    FAULT isr_pf, 14, 1
    FAULT isr_r15, 15, 0
    FAULT isr_mf, 16, 0
    FAULT isr_ac, 17, 1
    FAULT isr_mc, 18, 0
    FAULT isr_xm, 19, 0
    FAULT isr_ve, 20, 0
    FAULT isr_cp, 21, 1
    FAULT isr_r22, 22, 0
    FAULT isr_r23, 23, 0
    FAULT isr_r24, 24, 0
    FAULT isr_r25, 25, 0
    FAULT isr_r26, 26, 0
    FAULT isr_r27, 27, 0
    FAULT isr_r28, 28, 0
    FAULT isr_r29, 29, 1
    FAULT isr_r30, 30, 1
    FAULT isr_r31, 31, 0

/* report to the VMM: it reads vector, error code and the interrupted frame from
 * the stack (rsp at the OUT exit points at {vector, error, rip, cs, rflags, rsp, ss}) */
fault_common:
    mov (%rsp), %eax
    mov $PORT_FAULT, %dx
    out %eax, %dx
7:  cli
    hlt
    jmp 7b
    .section .note.GNU-stack,"",@progbits
