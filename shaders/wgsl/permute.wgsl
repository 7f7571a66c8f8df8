// Permute: group the [T, K] slots by local expert, deterministically.
//   count   (one workgroup per local expert): counts[e] = slots routed to e; workgroup 0 also
//           writes slot_rows = -1 for the slots with no local expert.
//   offsets (one workgroup, a scan): expert_offsets[e] = sum of the previous blocks, each padded
//           to a multiple of row_align; expert_offsets[E_local] = total rows.
//   scatter (one workgroup per local expert): a workgroup prefix sum over the slots in ascending
//           order gives each slot its row, so rows within a block are in ascending slot order;
//           sorted_slots[row] = slot, slot_rows[slot] = row, padding rows get slot -1.
// The layout is the one of moe_core::plan: expert_offsets [E_local + 1], sorted_slots [rows],
// slot_rows [T * K]; counts live in the plan's expert_cursor region [E_local].

struct Params {
    n: u32,
    e_local: u32,
    e_global: u32,
    has_map: u32,
    row_align: u32,
    oid: u32,
    omap: u32,
    ooff: u32,
    ocnt: u32,
    osort: u32,
    osr: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> ids: array<i32>;
@group(0) @binding(2) var<storage, read_write> emap: array<i32>;
@group(0) @binding(3) var<storage, read_write> offsets: array<i32>;
@group(0) @binding(4) var<storage, read_write> counts: array<i32>;
@group(0) @binding(5) var<storage, read_write> sorted_slots: array<i32>;
@group(0) @binding(6) var<storage, read_write> slot_rows: array<i32>;

const WG: u32 = 256u;
var<workgroup> sc: array<u32, 256>;

// The local expert of a slot, or -1 (empty slot, expert not held here, out-of-range entry).
fn local_of(s: u32) -> i32 {
    let id = ids[p.oid + s];
    if (id < 0 || u32(id) >= p.e_global) {
        return -1;
    }
    var l = id;
    if (p.has_map != 0u) {
        l = emap[p.omap + u32(id)];
    }
    if (l < 0 || u32(l) >= p.e_local) {
        return -1;
    }
    return l;
}

// The slots a workgroup handles per loop iteration: 4 per invocation. Loops are kept short
// because llvmpipe (lavapipe) caps the loop iterations of one invocation at 65535 in total.
const CHUNK: u32 = 1024u;

fn is_local(s: u32, e: i32) -> u32 {
    if (s < p.n && local_of(s) == e) {
        return 1u;
    }
    return 0u;
}

// slot_rows = -1 for a slot with no local expert.
fn mark_empty(s: u32) {
    if (s < p.n && local_of(s) < 0) {
        slot_rows[p.osr + s] = -1;
    }
}

@compute @workgroup_size(256, 1, 1)
fn count(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = i32(wg.x);
    var c = 0u;
    for (var c0 = 0u; c0 < p.n; c0 += CHUNK) {
        let s = c0 + lid.x * 4u;
        c += is_local(s, e) + is_local(s + 1u, e) + is_local(s + 2u, e) + is_local(s + 3u, e);
        if (wg.x == 0u) {
            mark_empty(s);
            mark_empty(s + 1u);
            mark_empty(s + 2u);
            mark_empty(s + 3u);
        }
    }
    sc[lid.x] = c;
    workgroupBarrier();
    for (var d = WG / 2u; d > 0u; d >>= 1u) {
        if (lid.x < d) {
            sc[lid.x] += sc[lid.x + d];
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        counts[p.ocnt + wg.x] = i32(sc[0]);
    }
}

@compute @workgroup_size(256, 1, 1)
fn offsets_main(@builtin(local_invocation_id) lid: vec3<u32>) {
    // Chunks of 256 experts: a workgroup scan of the padded counts, carried across chunks.
    var run = 0u;
    for (var c0 = 0u; c0 < p.e_local; c0 += WG) {
        let e = c0 + lid.x;
        var v = 0u;
        if (e < p.e_local) {
            let c = u32(counts[p.ocnt + e]);
            v = (c + p.row_align - 1u) / p.row_align * p.row_align;
        }
        sc[lid.x] = v;
        workgroupBarrier();
        scan_step(lid.x, 1u);
        scan_step(lid.x, 2u);
        scan_step(lid.x, 4u);
        scan_step(lid.x, 8u);
        scan_step(lid.x, 16u);
        scan_step(lid.x, 32u);
        scan_step(lid.x, 64u);
        scan_step(lid.x, 128u);
        if (e < p.e_local) {
            offsets[p.ooff + e] = i32(run + sc[lid.x] - v);
        }
        run += sc[WG - 1u];
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        offsets[p.ooff + p.e_local] = i32(run);
    }
}

// One Hillis-Steele step of the inclusive scan over `sc` (unrolled by the caller).
fn scan_step(lid: u32, d: u32) {
    var v = 0u;
    if (lid >= d) {
        v = sc[lid - d];
    }
    workgroupBarrier();
    sc[lid] += v;
    workgroupBarrier();
}

fn put(s: u32, row: u32) {
    sorted_slots[p.osort + row] = i32(s);
    slot_rows[p.osr + s] = i32(row);
}

@compute @workgroup_size(256, 1, 1)
fn scatter(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = i32(wg.x);
    let base = u32(offsets[p.ooff + wg.x]);
    var run = 0u;
    for (var c0 = 0u; c0 < p.n; c0 += CHUNK) {
        // Invocation i holds slots c0 + 4i .. c0 + 4i + 3, so ascending invocation order is
        // ascending slot order.
        let s = c0 + lid.x * 4u;
        let f0 = is_local(s, e);
        let f1 = is_local(s + 1u, e);
        let f2 = is_local(s + 2u, e);
        let f3 = is_local(s + 3u, e);
        let mine = f0 + f1 + f2 + f3;
        sc[lid.x] = mine;
        workgroupBarrier();
        scan_step(lid.x, 1u);
        scan_step(lid.x, 2u);
        scan_step(lid.x, 4u);
        scan_step(lid.x, 8u);
        scan_step(lid.x, 16u);
        scan_step(lid.x, 32u);
        scan_step(lid.x, 64u);
        scan_step(lid.x, 128u);
        var row = base + run + sc[lid.x] - mine;
        if (f0 == 1u) {
            put(s, row);
            row++;
        }
        if (f1 == 1u) {
            put(s + 1u, row);
            row++;
        }
        if (f2 == 1u) {
            put(s + 2u, row);
            row++;
        }
        if (f3 == 1u) {
            put(s + 3u, row);
        }
        run += sc[WG - 1u];
        workgroupBarrier();
    }
    let cnt = u32(counts[p.ocnt + wg.x]);
    let padded = (cnt + p.row_align - 1u) / p.row_align * p.row_align;
    for (var r = cnt + lid.x; r < padded; r += WG) {
        sorted_slots[p.osort + base + r] = -1;
    }
}
