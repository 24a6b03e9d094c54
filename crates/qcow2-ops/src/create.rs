//! Image creation with qemu-img's options.

use crate::error::{Error, Result};
use crate::types::{CreateOptions, Encryption};
use qcow2_format::header::{self, Extension, Header};
use qcow2_format::refcount as rc;
use qcow2_format::{put_be64, Geometry};
use qcow2_io::{FileStorage, OpenMode, Storage};
use std::path::Path;

/// The feature name table QEMU writes into v3 images.
pub(crate) fn feature_table() -> Vec<u8> {
    let names: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut v = Vec::new();
    for (kind, bit, name) in names {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        v.extend_from_slice(&e);
    }
    v
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

pub(crate) fn create(path: &Path, size: u64, o: &CreateOptions) -> Result<()> {
    let name = path.display().to_string();
    if o.version != 2 && o.version != 3 {
        return Err(invalid(format!(
            "{name}: version must be 2 (compat=0.10) or 3 (compat=1.1)"
        )));
    }
    let cs = o.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(invalid(format!(
            "{name}: cluster size must be a power of two between 512 and 2048k"
        )));
    }
    let cluster_bits = cs.trailing_zeros();
    if !o.refcount_bits.is_power_of_two() || o.refcount_bits > 64 {
        return Err(invalid(format!(
            "{name}: refcount width must be a power of two and may not exceed 64 bits"
        )));
    }
    let order = o.refcount_bits.trailing_zeros();
    if o.version == 2 {
        if o.refcount_bits != 16 {
            return Err(invalid(format!("{name}: different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")));
        }
        if o.lazy_refcounts {
            return Err(invalid(format!("{name}: lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")));
        }
        if o.extended_l2 {
            return Err(invalid(format!("{name}: extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")));
        }
        if o.zstd {
            return Err(invalid(format!(
                "{name}: compression_type requires compatibility level 1.1 or above"
            )));
        }
    }
    if o.extended_l2 && cs < 16384 {
        return Err(invalid(format!("{name}: extended L2 entries are only supported with cluster sizes of at least 16384 bytes")));
    }
    if o.backing_format.is_some() && o.backing_file.is_none() {
        return Err(invalid(format!(
            "{name}: backing format given without a backing file"
        )));
    }
    if o.data_file_raw && o.data_file.is_none() {
        return Err(invalid(format!("{name}: data-file-raw requires data-file")));
    }
    if o.data_file.is_some() && o.version < 3 {
        return Err(invalid(format!("{name}: External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)")));
    }
    if o.data_file_raw && o.backing_file.is_some() {
        return Err(invalid(format!(
            "{name}: Backing file and data-file-raw cannot be used at the same time"
        )));
    }
    if size % 512 != 0 {
        return Err(invalid(format!(
            "{name}: image size must be a multiple of 512 bytes"
        )));
    }
    let geo = Geometry::new(cluster_bits, o.extended_l2);
    let l1_entries = geo.l1_entries_for(size);
    if l1_entries * 8 > header::MAX_L1_BYTES {
        return Err(invalid(format!(
            "{name}: image size {size} is too large for cluster size {cs}"
        )));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    // The LUKS header and key material, in clusters after the L1 table
    // (where qemu-img puts them).
    let (crypt_method, luks) = match &o.encryption {
        None => (0, None),
        Some(Encryption::Aes { .. }) => (crate::crypt::METHOD_AES, None),
        Some(Encryption::Luks { secret, params }) => {
            let (area, _) = qcow2_crypto::luks::create(params, &secret.0)
                .map_err(|e| crate::crypt::key_err(&name, e))?;
            (crate::crypt::METHOD_LUKS, Some(area))
        }
    };
    let luks_clusters = luks.as_ref().map_or(0, |a| (a.len() as u64).div_ceil(cs));
    let epb = rc::entries_per_block(cluster_bits, order);
    let (mut rt, mut rb) = (1u64, 1u64);
    loop {
        let total = 1 + rt + rb + l1_clusters + luks_clusters;
        let need_rb = total.div_ceil(epb);
        let need_rt = (need_rb * 8).div_ceil(cs);
        if need_rb == rb && need_rt == rt {
            break;
        }
        rb = need_rb.max(1);
        rt = need_rt.max(1);
    }
    if rt * cs > header::MAX_REFTABLE_BYTES {
        return Err(invalid(format!("{name}: refcount table too large")));
    }
    let rt_off = cs;
    let rb_off = (1 + rt) * cs;
    // An empty L1 table owns no cluster (as qemu-img writes it).
    let l1_off = if l1_clusters == 0 {
        0
    } else {
        (1 + rt + rb) * cs
    };
    let luks_off = (1 + rt + rb + l1_clusters) * cs;
    let total = 1 + rt + rb + l1_clusters + luks_clusters;

    let mut incompat = 0;
    if o.extended_l2 {
        incompat |= header::INCOMPAT_EXTL2;
    }
    if o.zstd {
        incompat |= header::INCOMPAT_COMPRESSION;
    }
    if o.data_file.is_some() {
        incompat |= header::INCOMPAT_DATA_FILE;
    }
    let mut extensions = Vec::new();
    if let Some(f) = &o.backing_format {
        extensions.push(Extension {
            kind: header::EXT_BACKING_FORMAT,
            data: f.as_bytes().to_vec(),
        });
    }
    if let Some(a) = &luks {
        extensions.push(Extension {
            kind: header::EXT_FULL_DISK_ENCRYPTION,
            data: crate::crypt::header_extension(luks_off, a.len() as u64),
        });
    }
    if let Some(d) = &o.data_file {
        extensions.push(Extension {
            kind: header::EXT_DATA_FILE,
            data: d.as_bytes().to_vec(),
        });
    }
    if o.version == 3 {
        extensions.push(Extension {
            kind: header::EXT_FEATURE_TABLE,
            data: feature_table(),
        });
    }
    let mut h = Header {
        version: o.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method,
        l1_size: l1_entries as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: rt_off,
        refcount_table_clusters: rt as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: if o.version == 3 { incompat } else { 0 },
        compatible_features: if o.lazy_refcounts {
            header::COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: if o.data_file_raw {
            header::AUTOCLEAR_DATA_FILE_RAW
        } else {
            0
        },
        refcount_order: order,
        header_length: if o.version == 3 {
            header::V3_HEADER_LEN
        } else {
            header::V2_HEADER_LEN
        },
        compression_type: if o.zstd { 1 } else { 0 },
        extra: vec![0; 7],
        extensions,
        backing_file: o.backing_file.clone(),
    };
    let first = match h.serialize() {
        Ok(b) => b,
        Err(_) if o.version == 3 => {
            // 512-byte clusters: QEMU leaves out the feature table when it does not fit.
            h.extensions.retain(|e| e.kind != header::EXT_FEATURE_TABLE);
            h.serialize()?
        }
        Err(e) => return Err(e.into()),
    };
    let mut table = vec![0u8; (rt * cs) as usize];
    for b in 0..rb {
        put_be64(&mut table, (b * 8) as usize, rb_off + b * cs);
    }
    let mut blocks = vec![0u8; (rb * cs) as usize];
    for c in 0..total {
        let blk = (c / epb) as usize;
        let idx = (c % epb) as usize;
        let s = blk * cs as usize;
        rc::set(&mut blocks[s..s + cs as usize], idx, order, 1);
    }
    if let Some(d) = &o.data_file {
        // As qemu-img: a new (or emptied) raw file of the virtual size.
        let dp = crate::backing::resolve(path, d.as_bytes());
        let df = FileStorage::open(
            &dp,
            OpenMode {
                writable: true,
                direct: false,
                create: true,
            },
        )
        .map_err(|e| Error::io(format!("could not create '{}'", dp.display()), e))?;
        let io = |e| Error::io(format!("{}: truncate", dp.display()), e);
        df.set_len(0).map_err(io)?;
        df.set_len(size).map_err(io)?;
        df.sync()
            .map_err(|e| Error::io(format!("{}: sync", dp.display()), e))?;
    }
    let f = FileStorage::open(
        path,
        OpenMode {
            writable: true,
            direct: false,
            create: true,
        },
    )
    .map_err(|e| Error::io(format!("could not create '{name}'"), e))?;
    let w = |buf: &[u8], off: u64| {
        f.write_at(buf, off)
            .map_err(|e| Error::io(format!("{name}: write"), e))
    };
    w(&first, 0)?;
    w(&table, rt_off)?;
    w(&blocks, rb_off)?;
    if let Some(a) = &luks {
        w(a, luks_off)?;
    }
    f.set_len(total * cs)
        .map_err(|e| Error::io(format!("{name}: truncate"), e))?;
    f.sync()
        .map_err(|e| Error::io(format!("{name}: sync"), e))?;
    Ok(())
}
