//! qcow2-crypto against QEMU: headers and data that qemu-img / qemu-io
//! made are read by this crate, and what this crate makes is read by QEMU.
//! Images use `encrypt.iter-time=10` to stay fast.

use qcow2_crypto::luks::{self, CreateParams, Header};
use qcow2_crypto::{legacy_aes, CryptoError, SectorCipher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PW: &str = "astrochicken";
const CLUSTER: usize = 65536;

fn tools(test: &str) -> bool {
    qcow2_testutil::require(test, &["qemu-img", "qemu-io"]).is_some()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

/// `qemu-img create` with `opts` (after the secret) into `dir/name`.
fn qemu_create(dir: &Path, name: &str, opts: &str) -> PathBuf {
    let p = dir.join(name);
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "--object"])
        .arg(format!("secret,id=sec0,data={PW}"))
        .arg("-o")
        .arg(format!("encrypt.key-secret=sec0,{opts}"))
        .arg(&p)
        .arg("16M"));
    p
}

fn image_opts(p: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        p.display()
    )
}

/// Runs one qemu-io command on the encrypted image `p`.
fn qemu_io(p: &Path, cmd: &str) -> String {
    run(Command::new("qemu-io")
        .arg("--object")
        .arg(format!("secret,id=sec0,data={PW}"))
        .args(["--image-opts", &image_opts(p), "-c", cmd]))
}

fn qemu_info(p: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "--object"])
        .arg(format!("secret,id=sec0,data={PW}"))
        .args(["--image-opts", &image_opts(p)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// The (offset, length) of the LUKS header area from the qcow2 header
/// extension 0x0537be77.
fn luks_ext(file: &[u8]) -> (usize, usize) {
    let mut at = be32(file, 100) as usize; // header_length (v3)
    loop {
        let (ty, len) = (be32(file, at), be32(file, at + 4) as usize);
        if ty == 0 {
            panic!("no LUKS header extension");
        }
        if ty == 0x0537_be77 {
            assert_eq!(len, 16);
            return (be64(file, at + 8) as usize, be64(file, at + 16) as usize);
        }
        at += 8 + len.next_multiple_of(8);
    }
}

/// Host offset of the cluster holding guest offset 0 (L1[0] -> L2[0]).
fn host_of_first_cluster(file: &[u8]) -> usize {
    let mask = 0x00ff_ffff_ffff_fe00u64;
    let l1 = be64(file, 40) as usize;
    let l2 = (be64(file, l1) & mask) as usize;
    let host = (be64(file, l2) & mask) as usize;
    assert_ne!(host, 0, "cluster not allocated");
    host
}

fn luks_area(file: &[u8]) -> &[u8] {
    let (off, len) = luks_ext(file);
    &file[off..off + len]
}

#[test]
fn unlocks_a_qemu_header_and_matches_qemu_img_info() {
    if !tools("unlocks_a_qemu_header_and_matches_qemu_img_info") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = qemu_create(
        dir.path(),
        "e.qcow2",
        "encrypt.format=luks,encrypt.iter-time=10",
    );
    let file = std::fs::read(&p).unwrap();
    let (off, len) = luks_ext(&file);
    let area = &file[off..off + len];
    assert_eq!(len, 2_068_480);
    let h = Header::parse(area).unwrap();
    assert!(h.area_len() <= len as u64);
    let info = h.info();
    let q = qemu_info(&p);
    let e = &q["format-specific"]["data"]["encrypt"];
    assert_eq!(e["cipher-alg"], info.cipher_alg.as_str());
    assert_eq!(e["cipher-mode"], info.cipher_mode.as_str());
    assert_eq!(e["ivgen-alg"], info.ivgen_alg.as_str());
    assert_eq!(e["hash-alg"], info.hash_alg.as_str());
    assert_eq!(e["uuid"], info.uuid.as_str());
    assert_eq!(e["payload-offset"], info.payload_offset);
    assert_eq!(e["master-key-iters"], info.master_key_iters);
    assert!(e.get("ivgen-hash-alg").is_none() && info.ivgen_hash_alg.is_none());
    let slots = e["slots"].as_array().unwrap();
    assert_eq!(slots.len(), info.slots.len());
    for (qs, s) in slots.iter().zip(&info.slots) {
        assert_eq!(qs["active"], s.active);
        assert_eq!(qs["key-offset"], s.key_offset);
        assert_eq!(
            qs.get("iters").and_then(|v| v.as_u64()),
            s.iters.map(u64::from)
        );
        assert_eq!(
            qs.get("stripes").and_then(|v| v.as_u64()),
            s.stripes.map(u64::from)
        );
    }

    let t = Instant::now();
    luks::unlock(area, PW.as_bytes()).unwrap();
    eprintln!("unlock of an iter-time=10 header: {:?}", t.elapsed());
    assert!(matches!(
        luks::unlock(area, b"astrochickeN"),
        Err(CryptoError::InvalidPassword)
    ));
    assert_eq!(
        CryptoError::InvalidPassword.to_string(),
        "Invalid password, cannot unlock any keyslot"
    );
    // A truncated area is an error, not a panic.
    assert!(matches!(
        luks::unlock(&area[..100_000], PW.as_bytes()),
        Err(CryptoError::Invalid(_))
    ));
}

/// Data qemu-io wrote decrypts to its pattern; data this crate encrypts is
/// what qemu-io reads back.
fn data_both_ways(p: &Path, cipher: &SectorCipher, guest_sector_iv: bool) {
    qemu_io(p, "write -P 0xab 0 64k");
    let mut file = std::fs::read(p).unwrap();
    let host = host_of_first_cluster(&file);
    let iv0 = if guest_sector_iv {
        0
    } else {
        host as u64 / 512
    };
    let mut buf = file[host..host + CLUSTER].to_vec();
    assert!(buf.iter().any(|&b| b != 0xab), "stored in clear?");
    cipher.decrypt(iv0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xab), "decryption gives garbage");

    let mut mine = vec![0x5cu8; CLUSTER];
    cipher.encrypt(iv0, &mut mine).unwrap();
    file[host..host + CLUSTER].copy_from_slice(&mine);
    std::fs::write(p, &file).unwrap();
    let out = qemu_io(p, "read -P 0x5c 0 64k");
    assert!(
        out.contains("read 65536/65536") && !out.contains("Pattern verification failed"),
        "{out}"
    );
}

#[test]
fn luks_data_round_trips_with_qemu_io() {
    if !tools("luks_data_round_trips_with_qemu_io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = qemu_create(
        dir.path(),
        "e.qcow2",
        "encrypt.format=luks,encrypt.iter-time=10",
    );
    let file = std::fs::read(&p).unwrap();
    let cipher = luks::unlock(luks_area(&file), PW.as_bytes()).unwrap();
    data_both_ways(&p, &cipher, false);
}

#[test]
fn legacy_aes_data_round_trips_with_qemu_io() {
    if !tools("legacy_aes_data_round_trips_with_qemu_io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = qemu_create(dir.path(), "l.qcow2", "encryption=on");
    let cipher = legacy_aes(PW.as_bytes()).unwrap();
    data_both_ways(&p, &cipher, true);
    // A wrong password does not decrypt.
    let file = std::fs::read(&p).unwrap();
    let host = host_of_first_cluster(&file);
    let mut buf = file[host..host + CLUSTER].to_vec();
    legacy_aes(b"astrochickeN")
        .unwrap()
        .decrypt(0, &mut buf)
        .unwrap();
    assert!(buf.iter().any(|&b| b != 0x5c));
}

struct Variant {
    qemu_opts: &'static str,
    params: CreateParams,
    area_len: usize,
}

fn variants() -> Vec<Variant> {
    let p = |alg: &str, mode: &str, ivgen: &str, ivhash: Option<&str>, hash: &str| CreateParams {
        cipher_alg: alg.into(),
        cipher_mode: mode.into(),
        ivgen_alg: ivgen.into(),
        ivgen_hash_alg: ivhash.map(Into::into),
        hash_alg: hash.into(),
        iter_time_ms: 10,
    };
    vec![
        Variant {
            qemu_opts: "",
            params: CreateParams {
                iter_time_ms: 10,
                ..CreateParams::default()
            },
            area_len: 2_068_480,
        },
        Variant {
            qemu_opts: "encrypt.cipher-alg=aes-128",
            params: p("aes-128", "xts", "plain64", None, "sha256"),
            area_len: 1_052_672,
        },
        Variant {
            qemu_opts: "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
            params: p("aes-256", "cbc", "essiv", Some("sha256"), "sha256"),
            area_len: 1_052_672,
        },
        Variant {
            qemu_opts: "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1",
            params: p("aes-128", "cbc", "essiv", Some("sha256"), "sha1"),
            area_len: 528_384,
        },
        Variant {
            qemu_opts: "encrypt.hash-alg=sha512,encrypt.ivgen-alg=plain",
            params: p("aes-256", "xts", "plain", None, "sha512"),
            area_len: 2_068_480,
        },
        Variant {
            qemu_opts: "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=ctr,encrypt.hash-alg=sha384",
            params: p("aes-128", "ctr", "plain64", None, "sha384"),
            area_len: 528_384,
        },
        Variant {
            qemu_opts: "encrypt.cipher-alg=aes-192,encrypt.hash-alg=sha224",
            params: p("aes-192", "xts", "plain64", None, "sha224"),
            area_len: 1_544_192,
        },
        Variant {
            qemu_opts: "encrypt.cipher-mode=ecb",
            params: p("aes-256", "ecb", "plain64", None, "sha256"),
            area_len: 1_052_672,
        },
    ]
}

#[test]
fn key_material_qemu_cannot_split_into_sectors_is_refused() {
    // aes-192-cbc: 24 * 4000 bytes of key material is not a whole number of
    // sectors; qemu-img aborts on it (an assertion), so we refuse it.
    let params = CreateParams {
        cipher_alg: "aes-192".into(),
        cipher_mode: "cbc".into(),
        iter_time_ms: 1,
        ..CreateParams::default()
    };
    assert!(matches!(
        luks::create(&params, b"x"),
        Err(CryptoError::Unsupported(_))
    ));
}

#[test]
fn created_headers_open_in_qemu_for_every_variant() {
    if !tools("created_headers_open_in_qemu_for_every_variant") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, v) in variants().into_iter().enumerate() {
        let opts = format!(
            "encrypt.format=luks,encrypt.iter-time=10{}{}",
            if v.qemu_opts.is_empty() { "" } else { "," },
            v.qemu_opts
        );
        let p = qemu_create(dir.path(), &format!("v{i}.qcow2"), &opts);
        let mut file = std::fs::read(&p).unwrap();
        let (off, len) = luks_ext(&file);
        assert_eq!(len, v.area_len, "qemu's area length for {opts}");

        // QEMU's header for this variant: we read it and its data.
        let theirs = luks::unlock(&file[off..off + len], PW.as_bytes())
            .unwrap_or_else(|e| panic!("{opts}: {e}"));
        let q = qemu_info(&p);
        let e = &q["format-specific"]["data"]["encrypt"];
        let info = Header::parse(&file[off..off + len]).unwrap().info();
        assert_eq!(e["cipher-alg"], info.cipher_alg.as_str(), "{opts}");
        assert_eq!(e["cipher-mode"], info.cipher_mode.as_str(), "{opts}");
        assert_eq!(e["ivgen-alg"], info.ivgen_alg.as_str(), "{opts}");
        assert_eq!(e["hash-alg"], info.hash_alg.as_str(), "{opts}");
        assert_eq!(
            e.get("ivgen-hash-alg").and_then(|x| x.as_str()),
            info.ivgen_hash_alg.as_deref(),
            "{opts}"
        );
        data_both_ways(&p, &theirs, false);

        // Our header for the same parameters, spliced in its place.
        let t = Instant::now();
        let (area, ours) = luks::create(&v.params, PW.as_bytes()).unwrap();
        if i == 0 {
            eprintln!("create(iter_time_ms=10): {:?}", t.elapsed());
        }
        assert_eq!(
            area.len(),
            len,
            "{opts}: area length differs from qemu-img's"
        );
        let mine = Header::parse(&area).unwrap().info();
        eprintln!(
            "{opts}: slot 0 iters qemu {} ours {}; master key iters qemu {} ours {}",
            info.slots[0].iters.unwrap(),
            mine.slots[0].iters.unwrap(),
            info.master_key_iters,
            mine.master_key_iters
        );
        // Same calibration rule as QEMU (slot: iter_time worth, master key
        // digest: an eighth, both >= 1000): counts agree within a factor
        // that leaves room for a loaded machine.
        let near = |q: u32, o: u32| o >= q / 5 && o <= q.saturating_mul(5);
        assert!(
            near(info.slots[0].iters.unwrap(), mine.slots[0].iters.unwrap()),
            "{opts}"
        );
        assert!(near(info.master_key_iters, mine.master_key_iters), "{opts}");
        file = std::fs::read(&p).unwrap();
        file[off..off + len].copy_from_slice(&area);
        std::fs::write(&p, &file).unwrap();
        let q = qemu_info(&p);
        let e = &q["format-specific"]["data"]["encrypt"];
        assert_eq!(e["uuid"], mine.uuid.as_str(), "{opts}");
        assert_eq!(e["cipher-alg"], v.params.cipher_alg.as_str(), "{opts}");
        assert_eq!(e["cipher-mode"], v.params.cipher_mode.as_str(), "{opts}");
        assert_eq!(e["ivgen-alg"], v.params.ivgen_alg.as_str(), "{opts}");
        assert_eq!(e["hash-alg"], v.params.hash_alg.as_str(), "{opts}");
        assert_eq!(e["payload-offset"], len as u64, "{opts}");
        assert_eq!(e["master-key-iters"], mine.master_key_iters, "{opts}");
        assert_eq!(
            e["slots"][0]["iters"],
            mine.slots[0].iters.unwrap(),
            "{opts}"
        );
        assert_eq!(e["slots"][1]["active"], false, "{opts}");
        data_both_ways(&p, &ours, false);
    }
}
