//! Zeroes a whole image in 1 GiB requests and prints the counters:
//! `cargo run --release -p qcow2-ops --example zero_pass -- IMAGE [unmap]`.
use qcow2_ops::*;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("usage: zero_pass IMAGE [unmap]");
    let flags = if args.iter().any(|a| a == "unmap") {
        REQ_MAY_UNMAP
    } else {
        0
    };
    let img = Image::open(path, &OpenOptions::read_write())?;
    let size = img.virtual_size();
    let t = std::time::Instant::now();
    let mut off = 0;
    while off < size {
        let n = (1u64 << 30).min(size - off);
        img.write_zeroes(off, n, flags)?;
        off += n;
    }
    img.flush()?;
    eprintln!("{:.3}s", t.elapsed().as_secs_f64());
    println!("{}", serde_json_like(&img.stats()));
    img.close()
}

fn serde_json_like(s: &Stats) -> String {
    format!("{s:?}")
}
