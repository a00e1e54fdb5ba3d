/* castor guest workloads. They run at CPL3, where KVM-PVM executes them
 * natively; they reach devices only through the int3 hypercall (boot.S). */
#include "abi.h"

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned char u8;

struct boot_info {
    u64 magic;
    u32 ncpus;
    u32 workload;
    u64 tsc_khz;
    u64 timer_count;      /* offset 24: read by boot.S */
    u64 ram_size;
    u64 hole_start;       /* linear RAM offsets >= hole_start live at +hole_size */
    u64 hole_size;
    u64 heap_offset;      /* first linear RAM offset usable by workloads */
    /* dirty */
    u64 ws_pages;         /* per cpu */
    u64 ws_stride;        /* in pages */
    u32 pattern;
    u32 hot_percent;      /* hot/cold: share of writes that go to the hot tenth */
    u64 rate;             /* page writes per second per cpu, 0 = unlimited */
    u64 seed;
    u64 report_ms;        /* progress line period, 0 = never */
    u64 max_writes;       /* stop (and report DONE) after this many writes, 0 = never */
    /* kv */
    u64 kv_slots;         /* power of two */
    u64 kv_clients;       /* power of two */
    /* dirty: 1 = write a console line after every page write (a guest that
     * floods its console, for tests) */
    u64 console_flood;
    /* net (WL_NET, the Rust workload in net/ reads these) */
    u32 net_ipv4;         /* octets a.b.c.d in memory order */
    u32 net_prefix;
    u32 net_gateway;      /* same encoding, 0 = none */
    u32 net_port;         /* TCP port to serve */
};
_Static_assert(sizeof(struct boot_info) == 160, "boot_info layout");

struct kv_req { u32 client; u32 seq; u32 op; u32 pad; u64 key; u64 value; };
struct kv_resp { u32 client; u32 seq; u32 status; u32 pad; u64 value; u64 ops; };
_Static_assert(sizeof(struct kv_req) == 32, "kv_req layout");
_Static_assert(sizeof(struct kv_resp) == 32, "kv_resp layout");

struct kv_slot { u64 key; u64 value; u64 used; u64 version; };
struct kv_client { u64 id_plus1; u64 last_seq; struct kv_resp last; };
struct kv_header { volatile u32 lock; u32 pad; u64 ops_applied; u64 keys; u64 dup_answers; u64 magic; };

static inline u64 hcall(u64 nr, u64 a0, u64 a1) {
    u64 ret;
    __asm__ volatile("int3" : "=a"(ret) : "a"(nr), "D"(a0), "S"(a1) : "memory");
    return ret;
}
static inline u64 hcall3(u64 nr, u64 a0, u64 a1, u64 a2) {
    u64 ret;
    __asm__ volatile("int3" : "=a"(ret) : "a"(nr), "D"(a0), "S"(a1), "d"(a2) : "memory");
    return ret;
}
static inline void out32(u32 port, u32 v) { hcall(HC_OUT, port, v); }
static inline u32 in32(u32 port) { return (u32)hcall(HC_IN, port, 0); }
static inline void wait_irq(void) { hcall(HC_WAIT, 0, 0); }
static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause"); }

void *memset(void *d, int c, unsigned long n) {
    u8 *p = d;
    while (n--) *p++ = (u8)c;
    return d;
}
void *memcpy(void *d, const void *s, unsigned long n) {
    u8 *p = d; const u8 *q = s;
    while (n--) *p++ = *q++;
    return d;
}

static volatile u64 *percpu(u32 cpu) { return (volatile u64 *)(u64)(PERCPU_GPA + cpu * PAGE_SIZE); }

static u64 lin_to_gpa(const struct boot_info *bi, u64 lin) {
    return lin < bi->hole_start ? lin : lin + bi->hole_size;
}

/* ---- console ---- */
struct con_buf { u32 len; char text[252]; };

static void put_str(struct con_buf *b, const char *s) {
    while (*s && b->len < sizeof(b->text)) b->text[b->len++] = *s++;
}
static void put_u64(struct con_buf *b, u64 v) {
    char tmp[24]; int n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n && b->len < sizeof(b->text)) b->text[b->len++] = tmp[--n];
}
static void con_flush(struct con_buf *b) {
    out32(PORT_CONSOLE, (u32)(u64)b);
    b->len = 0;
}

static u64 xorshift(u64 *s) {
    u64 x = *s;
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    return *s = x;
}

/* ---- dirty: a memory writer with a configurable working set ----
 * Every write stores a fresh stamp (cpu << 56 | count) in the first qword of
 * the page, so a test can tell exactly which pages changed between two pauses. */
static void dirty_main(u32 cpu, const struct boot_info *bi) {
    volatile u64 *pc = percpu(cpu);
    u64 n = bi->ws_pages, stride = bi->ws_stride ? bi->ws_stride : 1;
    u64 seed = bi->seed * 0x9e3779b97f4a7c15ULL + cpu + 1, j = 0, writes = 0;
    u64 tsc_per_ms = bi->tsc_khz ? bi->tsc_khz : 1000000;
    u64 start = rdtsc(), last_report = start, last_writes = 0;
    u64 hot = n / 10 ? n / 10 : 1;
    struct con_buf con; con.len = 0;

    if (n == 0) for (;;) wait_irq();
    put_str(&con, "dirty cpu"); put_u64(&con, cpu);
    put_str(&con, ": start pages="); put_u64(&con, n);
    put_str(&con, " pattern="); put_u64(&con, bi->pattern);
    put_str(&con, " rate="); put_u64(&con, bi->rate);
    con_flush(&con);
    for (;;) {
        if (bi->max_writes && writes >= bi->max_writes) {
            out32(PORT_DONE, 0);
            for (;;) wait_irq();
        }
        if (bi->rate) {
            u64 elapsed_ms = (rdtsc() - start) / tsc_per_ms;
            if (writes >= bi->rate * elapsed_ms / 1000 + 1) { wait_irq(); continue; }
        }
        switch (bi->pattern) {
        case PAT_RANDOM: j = xorshift(&seed) % n; break;
        case PAT_HOTCOLD:
            j = (xorshift(&seed) % 100 < bi->hot_percent) ? xorshift(&seed) % hot
                                                           : hot + xorshift(&seed) % (n - hot ? n - hot : 1);
            if (j >= n) j = n - 1;
            break;
        default: j = (writes % n); break;
        }
        u64 lin = bi->heap_offset + (j * bi->ncpus + cpu) * stride * PAGE_SIZE;
        volatile u64 *page = (volatile u64 *)lin_to_gpa(bi, lin);
        u64 stamp = ((u64)cpu << 56) | (writes + 1);
        *page = stamp;
        writes++;
        pc[PC_STAMP / 8] = stamp;
        pc[PC_WRITES / 8] = writes;
        if (bi->console_flood) {
            put_str(&con, "flood cpu"); put_u64(&con, cpu);
            put_str(&con, " write "); put_u64(&con, writes);
            con_flush(&con);
        }
        if (bi->report_ms) {
            u64 now = rdtsc();
            if (now - last_report >= bi->report_ms * tsc_per_ms) {
                u64 ms = (now - last_report) / tsc_per_ms;
                put_str(&con, "dirty cpu"); put_u64(&con, cpu);
                put_str(&con, ": writes="); put_u64(&con, writes);
                put_str(&con, " pages/s="); put_u64(&con, ms ? (writes - last_writes) * 1000 / ms : 0);
                put_str(&con, " ticks="); put_u64(&con, pc[PC_TICKS / 8]);
                con_flush(&con);
                last_report = now; last_writes = writes;
            }
        }
    }
}

/* ---- kv: a key-value table in guest memory, served through the mailbox ---- */
static struct kv_header *kvh(void) { return (struct kv_header *)(u64)KV_HEADER_GPA; }

static void kv_lock(struct kv_header *h) {
    while (__atomic_exchange_n(&h->lock, 1, __ATOMIC_ACQUIRE)) while (h->lock) cpu_relax();
}
static void kv_unlock(struct kv_header *h) { __atomic_store_n(&h->lock, 0, __ATOMIC_RELEASE); }

static u64 hash64(u64 x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
    return x;
}

static struct kv_slot *kv_table(const struct boot_info *bi) {
    return (struct kv_slot *)lin_to_gpa(bi, bi->heap_offset);
}
static struct kv_client *kv_clients(const struct boot_info *bi) {
    return (struct kv_client *)lin_to_gpa(bi, bi->heap_offset + bi->kv_slots * sizeof(struct kv_slot));
}

/* find the slot of key (or the empty slot where it would go); NULL if full */
static struct kv_slot *kv_find(const struct boot_info *bi, u64 key) {
    struct kv_slot *t = kv_table(bi);
    u64 mask = bi->kv_slots - 1, i = hash64(key) & mask;
    for (u64 probes = 0; probes < bi->kv_slots; probes++, i = (i + 1) & mask) {
        if (!t[i].used || t[i].key == key) return &t[i];
    }
    return 0;
}

static struct kv_client *kv_client(const struct boot_info *bi, u32 id) {
    struct kv_client *c = kv_clients(bi);
    u64 mask = bi->kv_clients - 1, i = hash64(id) & mask;
    for (u64 probes = 0; probes < bi->kv_clients; probes++, i = (i + 1) & mask) {
        if (c[i].id_plus1 == (u64)id + 1 || c[i].id_plus1 == 0) return &c[i];
    }
    return 0;
}

static void kv_apply(const struct boot_info *bi, struct kv_header *h, const struct kv_req *rq, struct kv_resp *rs) {
    rs->client = rq->client; rs->seq = rq->seq; rs->pad = 0; rs->value = 0;
    kv_lock(h);
    struct kv_client *c = kv_client(bi, rq->client);
    if (!c) { rs->status = KV_FULL; rs->ops = h->ops_applied; kv_unlock(h); return; }
    if (c->id_plus1 && rq->seq <= c->last_seq) {
        if (rq->seq == c->last_seq) { *rs = c->last; h->dup_answers++; }
        else { rs->status = KV_STALE; rs->ops = h->ops_applied; }
        kv_unlock(h);
        return;
    }
    struct kv_slot *s = kv_find(bi, rq->key);
    switch (rq->op) {
    case KV_OP_GET:
        if (s && s->used) { rs->status = KV_OK; rs->value = s->value; } else rs->status = KV_NOT_FOUND;
        break;
    case KV_OP_PUT:
    case KV_OP_ADD:
        if (!s) { rs->status = KV_FULL; break; }
        if (!s->used) {
            if (rq->op == KV_OP_ADD) s->value = 0;
            s->key = rq->key; s->used = 1; h->keys++;
        }
        s->value = rq->op == KV_OP_PUT ? rq->value : s->value + rq->value;
        s->version++;
        rs->status = KV_OK; rs->value = s->value;
        break;
    case KV_OP_DEL:
        /* tombstone-free delete is not supported by linear probing; DEL stores 0 */
        if (s && s->used) { s->value = 0; s->version++; rs->status = KV_OK; } else rs->status = KV_NOT_FOUND;
        break;
    default:
        rs->status = KV_BAD_OP;
    }
    if (rs->status != KV_BAD_OP) h->ops_applied++;
    rs->ops = h->ops_applied;
    c->id_plus1 = (u64)rq->client + 1; c->last_seq = rq->seq; c->last = *rs;
    kv_unlock(h);
}

static void kv_main(u32 cpu, const struct boot_info *bi) {
    volatile u64 *pc = percpu(cpu);
    struct kv_header *h = kvh();
    const struct kv_req *req = (const struct kv_req *)(u64)(MAILBOX_GPA + cpu * PAGE_SIZE);
    struct kv_resp *resp = (struct kv_resp *)(u64)(MAILBOX_GPA + cpu * PAGE_SIZE + KV_RESP_OFF);
    u64 tsc_per_ms = bi->tsc_khz ? bi->tsc_khz : 1000000, last_report = rdtsc();
    struct con_buf con; con.len = 0;

    put_str(&con, "kv cpu"); put_u64(&con, cpu); put_str(&con, ": serving, ops=");
    put_u64(&con, h->ops_applied);
    con_flush(&con);
    for (;;) {
        u32 n = in32(PORT_KV_POLL);
        if (n > KV_MAX_BATCH) n = KV_MAX_BATCH;
        if (n == 0) {
            if (bi->report_ms && rdtsc() - last_report >= bi->report_ms * tsc_per_ms) {
                put_str(&con, "kv cpu"); put_u64(&con, cpu);
                put_str(&con, ": ops="); put_u64(&con, h->ops_applied);
                put_str(&con, " keys="); put_u64(&con, h->keys);
                con_flush(&con);
                last_report = rdtsc();
            }
            wait_irq();
            continue;
        }
        for (u32 i = 0; i < n; i++) kv_apply(bi, h, &req[i], &resp[i]);
        pc[PC_KV_OPS / 8] += n;
        out32(PORT_KV_RESP, n);
    }
}

/* ---- kwrite: CPL0 (emulated) writes, to exercise ring overflow ---- */
static void kwrite_main(u32 cpu, const struct boot_info *bi) {
    u64 base = lin_to_gpa(bi, bi->heap_offset + cpu * bi->ws_pages * PAGE_SIZE);
    for (u64 round = 0; !bi->max_writes || round < bi->max_writes; round++) {
        hcall3(HC_KWRITE, base, bi->ws_pages, round + 1);
        percpu(cpu)[PC_WRITES / 8] = round + 1;
    }
    out32(PORT_DONE, 0);
    for (;;) wait_irq();
}

void user_main(u64 cpu, const struct boot_info *bi) {
    if (bi->magic != BOOT_MAGIC) out32(PORT_DONE, 0xbad);
    if (cpu == 0 && bi->workload == WL_KV && kvh()->magic != BOOT_MAGIC) {
        kvh()->magic = BOOT_MAGIC;
    }
    switch (bi->workload) {
    case WL_DIRTY: dirty_main((u32)cpu, bi); break;
    case WL_KV: kv_main((u32)cpu, bi); break;
    case WL_KWRITE: kwrite_main((u32)cpu, bi); break;
    default: break;
    }
    for (;;) wait_irq();
}
