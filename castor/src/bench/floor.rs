//! Part 3, the floor's copies: a memcpy of the same pages, contiguous and
//! scattered over an ordinary mapping.

use std::time::Instant;

use vmm::abi::{KERNEL_END, PAGE_SIZE};

use super::{med, us};

/// Copy of `pages` pages spread over an ordinary anonymous mapping of `mem`
/// bytes (faulted in, 4 KiB pages, the writer's stride) into a warm buffer,
/// other pages each pass: what scattered copying costs here without guest
/// memory.
pub(super) fn scattered_anon_us(pages: u64, mem: u64) -> f64 {
    let ps = PAGE_SIZE as usize;
    let src = vec![7u8; mem as usize];
    let stride = ((mem - KERNEL_END) / PAGE_SIZE / pages).max(1) as usize;
    let mut dst = vec![0u8; pages as usize * ps];
    let mut t = Vec::new();
    // each pass copies other pages (shifted by one): cold in the caches,
    // as pages just written by the guest on another CPU are for the copy
    for pass in 0..15 {
        let s = Instant::now();
        for i in 0..pages as usize {
            let off = (KERNEL_END as usize + (i * stride + pass % stride.max(1)) * ps) % (mem as usize - ps);
            dst[i * ps..(i + 1) * ps].copy_from_slice(std::hint::black_box(&src[off..off + ps]));
        }
        std::hint::black_box(&dst);
        t.push(us(s.elapsed()));
    }
    med(&t)
}

pub(super) fn memcpy_us(pages: u64) -> f64 {
    let n = (pages * PAGE_SIZE) as usize;
    let src = vec![7u8; n];
    let mut dst = vec![0u8; n];
    let mut t = Vec::new();
    for _ in 0..15 {
        let s = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        t.push(us(s.elapsed()));
    }
    med(&t)
}
