//! Fuzz target `codecs`: the pure on-disk codecs of qcow2-format.
//!
//! * `Header::parse` on arbitrary bytes (with the input length and a
//!   fuzzed file length); a parsed header serialises and parses back to the
//!   same fields; its accessors never panic.
//! * L1/L2 entries: every accessor for standard and extended entries and
//!   every subcluster; compressed descriptors decode/encode round trip for
//!   every cluster size.
//! * Refcount entries: set/get round trip for every order, neighbours untouched.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_format::entry::{CompressedDescriptor, L1Entry, L2Entry, FLAG_COMPRESSED, FLAG_COPIED};
use qcow2_format::header::Header;
use qcow2_format::refcount;
use qcow2_format::Geometry;

fn u64_at(d: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    for (k, x) in b.iter_mut().enumerate() {
        *x = d.get(i + k).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fn header(data: &[u8]) {
    let lens = [data.len() as u64, u64_at(data, 0) >> 20, u64::MAX];
    for file_len in lens {
        let Ok(mut h) = Header::parse(data, file_len) else {
            continue;
        };
        let _ = h.cluster_size();
        let _ = h.refcount_bits();
        let _ = h.extended_l2();
        let _ = h.lazy_refcounts();
        let _ = h.is_dirty();
        let _ = h.is_corrupt();
        let _ = h.has_data_file();
        let _ = h.compression().name();
        let geo = h.geometry();
        let _ = geo.l1_entries_for(h.size);
        let _ = h.backing_format();
        let _ = h.data_file();
        let _ = h.feature_table();
        let _ = h.feature_names_for(0, u64::MAX);
        let _ = h.feature_names_for(1, u64::MAX);
        let _ = h.feature_names_for(2, u64::MAX);
        let orig = h.clone();
        let lossless_name = match (&h.backing_file, h.backing_file_offset) {
            (Some(n), off) => {
                let off = off as usize;
                data.get(off..off + h.backing_file_size as usize) == Some(n.as_slice())
            }
            (None, _) => true,
        };
        if let Ok(buf) = h.serialize() {
            let back = Header::parse(&buf, file_len);
            if lossless_name {
                let back = back.unwrap_or_else(|e| {
                    panic!("serialised header does not parse again: {e}\n{orig:?}")
                });
                assert_eq!(back.version, orig.version);
                assert_eq!(back.cluster_bits, orig.cluster_bits);
                assert_eq!(back.size, orig.size);
                assert_eq!(back.l1_size, orig.l1_size);
                assert_eq!(back.l1_table_offset, orig.l1_table_offset);
                assert_eq!(back.refcount_table_offset, orig.refcount_table_offset);
                assert_eq!(back.refcount_table_clusters, orig.refcount_table_clusters);
                assert_eq!(back.incompatible_features, orig.incompatible_features);
                assert_eq!(back.refcount_order, orig.refcount_order);
                assert_eq!(back.compression_type, orig.compression_type);
                assert_eq!(back.backing_file, orig.backing_file);
                assert_eq!(back.extensions, orig.extensions);
            }
        }
    }
}

fn entries(data: &[u8]) {
    for k in 0..(data.len() / 16).min(64) {
        let raw = u64_at(data, k * 16);
        let bitmap = u64_at(data, k * 16 + 8);
        let l1 = L1Entry(raw);
        let _ = (l1.l2_offset(), l1.copied(), l1.reserved());
        let n = L1Entry::new(l1.l2_offset());
        assert_eq!(n.l2_offset(), l1.l2_offset());
        for extended in [false, true] {
            let e = if extended {
                L2Entry { raw, bitmap }
            } else {
                L2Entry::standard(raw)
            };
            let _ = (
                e.is_compressed(),
                e.host_offset(),
                e.copied(),
                e.zero_flag(),
                e.reserved(extended),
                e.cluster_type(extended),
            );
            for sc in 0..32 {
                let t = e.subcluster_type(extended, sc);
                let _ = (t.is_allocated(), t.is_zero());
            }
        }
        for bits in 9..=21u32 {
            let d = CompressedDescriptor::decode(raw, bits);
            let enc = d.encode(bits).unwrap_or_else(|e| {
                panic!("decoded descriptor does not encode: {e} ({raw:#x}, bits {bits})")
            });
            assert_eq!(enc, (raw & !FLAG_COPIED) | FLAG_COMPRESSED, "bits {bits}");
            assert_eq!(CompressedDescriptor::decode(enc, bits), d);
            assert!(d.byte_len() >= 1 && d.byte_len() <= d.sectors * 512);
            assert!(d.first_cluster(bits) <= d.last_cluster(bits));
            let _ = L2Entry::standard(raw | FLAG_COMPRESSED).compressed(bits);
            // Encoding arbitrary descriptors: Ok only when in range.
            let any = CompressedDescriptor {
                offset: bitmap >> (bitmap & 63),
                sectors: raw >> 48,
            };
            if let Ok(v) = any.encode(bits) {
                assert_eq!(CompressedDescriptor::decode(v, bits), any);
            }
            for ext in [false, true] {
                if ext && bits < 14 {
                    continue;
                }
                let g = Geometry::new(bits, ext);
                let _ = (
                    g.l2_entries(),
                    g.l2_coverage(),
                    g.subcluster_size(),
                    g.l1_index(raw),
                    g.l2_index(raw),
                    g.in_cluster(raw),
                    g.l1_entries_for(raw >> 2),
                );
            }
        }
    }
}

fn refcounts(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let len = 1 + (data[0] as usize % 64);
    for order in 0..=6u32 {
        let mut buf: Vec<u8> = (0..len)
            .map(|i| data.get(i + 1).copied().unwrap_or(i as u8))
            .collect();
        let n = (len * 8) >> order;
        if n == 0 {
            continue;
        }
        let max = refcount::max_refcount(order);
        for k in 0..(data.len() / 8).min(32) {
            let v = u64_at(data, k * 8);
            let idx = (v as usize >> 7) % n;
            let val = v & max;
            let before: Vec<u64> = (0..n).map(|i| refcount::get(&buf, i, order)).collect();
            refcount::set(&mut buf, idx, order, val);
            assert_eq!(
                refcount::get(&buf, idx, order),
                val,
                "order {order} idx {idx}"
            );
            for (i, &b) in before.iter().enumerate() {
                if i != idx {
                    assert_eq!(
                        refcount::get(&buf, i, order),
                        b,
                        "order {order}: neighbour {i} of {idx} changed"
                    );
                }
            }
            assert!(refcount::byte_of(idx as u64, order) < len as u64);
        }
        let _ = refcount::entries_per_block(9 + (data[0] as u32 % 13), order);
    }
}

fuzz_target!(|data: &[u8]| {
    header(data);
    entries(data);
    refcounts(data);
});
