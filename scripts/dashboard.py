#!/usr/bin/env python3
"""Dashboard: `qcow2 io` against `qemu-io` on this machine, in one run.

Every workload is a qemu-io command script run by both tools on copies of
one prepared image, whole process, writeback mode (`-t writeback -d unmap`),
several rounds alternating ours and QEMU (the order flips every round);
medians are reported. Per run:

* wall time and peak RSS of the whole process (`/usr/bin/time -f %M`), in a
  run without tracing;
* bytes written to the image file (pwrite64/pwritev) and syncs
  (fdatasync/fsync) from `strace -f -y` on a second copy;
* table writebacks: QEMU's from `--trace qcow2_cache_entry_flush` (its
  `is_l2_cache` field tells L2 from refcount-block flushes), ours from
  `--stats=json` (`l2_writebacks`, `refblock_writebacks`).

Writes target/dashboard/results.json and target/dashboard/index.html (self-
contained: inline CSS and SVG). Includes target/criterion/churn.json (the
criterion micro-benchmarks) when present.

Usage: scripts/dashboard.py [--rounds 3] [--bin target/release/qcow2]
                            [--out target/dashboard] [--size-gib 1024]
                            [--only NAME,...] [--strict]
"""
import argparse
import datetime
import html
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from churn_compare import count_image_io  # noqa: E402  (shared strace counting)

GIB = 1 << 30
MIB = 1 << 20
L2_SPAN = 512 * MIB  # guest bytes per L2 table at 64 KiB clusters


# ----------------------------------------------------------------- workloads

def zero_passes(size_gib, flags=""):
    return [f"write -q -z {flags}{i}G 1G".replace("  ", " ") for i in range(size_gib)]


def random_mix(seed, n, span, unit, data_end):
    """n seeded requests of `unit` bytes in [0, span): write-zeroes (with or
    without -u) and discards, half of them over the data area."""
    rng = random.Random(seed)
    cmds = []
    for _ in range(n):
        area = data_end if rng.random() < 0.5 else span
        off = rng.randrange(0, area // unit) * unit
        kind = rng.choice(["write -q -z", "write -q -z -u", "discard -q"])
        cmds.append(f"{kind} {off} {unit}")
    return cmds


def workloads(size_gib):
    """name -> dict(title, size, prep commands, measured commands, big)."""
    big = f"{size_gib}G"
    alloc = zero_passes(size_gib)
    data_1g = ["write -q -P 0xab 0 1G"]
    sparse_tables = 512
    sparse_prep = [f"write -q -P 0x5 {i * L2_SPAN} 64k" for i in range(sparse_tables)]
    sparse = [f"write -q -z {i * L2_SPAN} 64k" for i in range(sparse_tables)]
    return [
        dict(name="alloc", title=f"write-zeroes {size_gib} GiB in 1 GiB requests (allocation pass)",
             size=big, base="empty_big", cmds=alloc, big=True),
        dict(name="rescan", title="the same again (nothing changes)",
             size=big, base="zeroed_big", cmds=alloc, big=True),
        dict(name="rescan_unmap", title="the same with MAY_UNMAP (-u)",
             size=big, base="zeroed_big", cmds=zero_passes(size_gib, "-u "), big=True),
        dict(name="data_keep", title="1 GiB of data zeroed, no unmap",
             size="8G", base="data_8g", cmds=["write -q -z 0 1G"]),
        dict(name="data_unmap", title="1 GiB of data zeroed with unmap (-u)",
             size="8G", base="data_8g", cmds=["write -q -z -u 0 1G"]),
        dict(name="sparse", title=f"sparse: one entry in each of {sparse_tables} L2 tables zeroed",
             size=f"{sparse_tables // 2}G", base="sparse", prep=sparse_prep, cmds=sparse),
        dict(name="mix4k", title="2000 random 4 KiB zero / zero -u / discard (seed 1), half over 256 MiB of data",
             size="8G", base="data_mix", cmds=random_mix(1, 2000, 2 * GIB, 4096, 256 * MIB)),
        dict(name="mix64k", title="2000 random 64 KiB zero / zero -u / discard (seed 2), half over 256 MiB of data",
             size="8G", base="data_mix", cmds=random_mix(2, 2000, 2 * GIB, 65536, 256 * MIB)),
    ]


def bases(size_gib):
    """Prepared images shared by workloads: name -> (size, qemu-io prep commands)."""
    return {
        "empty_big": (f"{size_gib}G", []),
        "zeroed_big": (f"{size_gib}G", zero_passes(size_gib)),
        "data_8g": ("8G", ["write -q -P 0xab 0 1G"]),
        "data_mix": ("8G", ["write -q -P 0xab 0 256M"]),
    }


# ----------------------------------------------------------------- running



def cflags(cmds):
    out = []
    for c in cmds:
        out += ["-c", c]
    return out


def tool_cmd(tool, binary, cmds, image, extra=()):
    if tool == "ours":
        return [binary, "io", "-t", "writeback", "-d", "unmap", "--stats=json", *extra] + cflags(cmds) + [image]
    return ["qemu-io", "-f", "qcow2", "-t", "writeback", "-d", "unmap", *extra] + cflags(cmds) + [image]


def copy_image(src, dst):
    """Sparse copy, made durable: the measured run's first sync must not
    write back the copy's dirty page cache."""
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed_run(tool, binary, cmds, image, tmp):
    tfile = os.path.join(tmp, "time.out")
    cmd = ["/usr/bin/time", "-f", "%M", "-o", tfile] + tool_cmd(tool, binary, cmds, image)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{tool} failed ({p.returncode}): {p.stderr[-2000:]}")
    with open(tfile) as f:
        rss_kib = int(f.read().strip().splitlines()[-1])
    res = {"wall_s": wall, "rss_kib": rss_kib}
    if tool == "ours":
        res["stats"] = json.loads(p.stdout.strip().splitlines()[-1])
    return res


def traced_run(tool, binary, cmds, image, tmp):
    trace = os.path.join(tmp, "strace.out")
    qtrace = os.path.join(tmp, "qemu-trace.out")
    extra = () if tool == "ours" else (f"--trace=enable=qcow2_cache_entry_flush,file={qtrace}",)
    cmd = ["strace", "-f", "-y", "-qq", "-o", trace, "-e",
           "trace=pwrite64,pwritev,pwritev2,fdatasync,fsync,fallocate"] + tool_cmd(tool, binary, cmds, image, extra)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{tool} under strace failed: {p.stderr[-2000:]}")
    counted = count_image_io(trace, image)
    res = {"writes": counted["writes"], "bytes_written": counted["bytes"],
           "syncs": counted["syncs"], "fallocates": counted["fallocates"]}
    os.unlink(trace)
    if tool == "qemu":
        l2 = rb = 0
        if os.path.exists(qtrace):
            with open(qtrace) as f:
                for line in f:
                    if "qcow2_cache_entry_flush" not in line:
                        continue
                    if "is_l2_cache 1" in line:
                        l2 += 1
                    else:
                        rb += 1
            os.unlink(qtrace)
        res["l2_writebacks"] = l2
        res["refblock_writebacks"] = rb
    else:
        st = json.loads(p.stdout.strip().splitlines()[-1])
        res["l2_writebacks"] = st["l2_writebacks"]
        res["refblock_writebacks"] = st["refblock_writebacks"]
    return res


def median(xs):
    return statistics.median(xs) if xs else None


def run_all(args):
    wls = workloads(args.size_gib)
    if args.only:
        keep = set(args.only.split(","))
        wls = [w for w in wls if w["name"] in keep]
    tmp = tempfile.mkdtemp(prefix="qcow2-dash-", dir=args.tmpdir)
    try:
        prepared = {}
        base_defs = bases(args.size_gib)
        for w in wls:
            key = w["base"]
            if key in prepared:
                continue
            size, prep = base_defs[key] if key in base_defs else (w["size"], w.get("prep", []))
            path = os.path.join(tmp, f"base-{key}.qcow2")
            t0 = time.perf_counter()
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, size], check=True)
            if prep:
                subprocess.run(["qemu-io", "-f", "qcow2", "-t", "unsafe"] + cflags(prep) + [path],
                               check=True, stdout=subprocess.DEVNULL)
            print(f"prepared {key} ({size}) in {time.perf_counter() - t0:.1f}s", flush=True)
            prepared[key] = path
        os.sync()
        results = []
        for w in wls:
            t_w = time.perf_counter()
            runs = {"ours": [], "qemu": []}
            traces = {"ours": [], "qemu": []}
            verdict = {}
            for r in range(args.rounds):
                order = ["ours", "qemu"] if r % 2 == 0 else ["qemu", "ours"]
                for tool in order:
                    img = os.path.join(tmp, f"{tool}.qcow2")
                    copy_image(prepared[w["base"]], img)
                    os.sync()  # no writeback of earlier runs during this one
                    runs[tool].append(timed_run(tool, args.bin, w["cmds"], img, tmp))
                    if r == 0:
                        keep = os.path.join(tmp, f"{tool}-result.qcow2")
                        os.replace(img, keep)
                    if r < args.trace_rounds:
                        copy_image(prepared[w["base"]], img)
                        traces[tool].append(traced_run(tool, args.bin, w["cmds"], img, tmp))
                        os.unlink(img)
            o, q = os.path.join(tmp, "ours-result.qcow2"), os.path.join(tmp, "qemu-result.qcow2")
            verdict["identical"] = subprocess.run(["qemu-img", "compare", "-q", q, o]).returncode == 0
            verdict["check_clean"] = subprocess.run(["qemu-img", "check", "-q", o],
                                                    stdout=subprocess.DEVNULL).returncode == 0
            os.unlink(o)
            os.unlink(q)
            row = {"name": w["name"], "title": w["title"], "image_size": w["size"],
                   "requests": len(w["cmds"]), "big": w.get("big", False), **verdict}
            for tool in ("ours", "qemu"):
                m = {
                    "wall_s": median([x["wall_s"] for x in runs[tool]]),
                    "wall_s_all": [round(x["wall_s"], 4) for x in runs[tool]],
                    "rss_kib": median([x["rss_kib"] for x in runs[tool]]),
                }
                for k in ("writes", "bytes_written", "syncs", "fallocates", "l2_writebacks", "refblock_writebacks"):
                    m[k] = median([x[k] for x in traces[tool]])
                if tool == "ours":
                    m["stats"] = runs[tool][0]["stats"]
                row[tool] = m
            row["speedup"] = row["qemu"]["wall_s"] / max(row["ours"]["wall_s"], 1e-9)
            results.append(row)
            o, q = row["ours"], row["qemu"]
            print(f"{w['name']:13s} ours {o['wall_s']:7.3f}s {o['rss_kib'] / 1024:5.1f}MiB "
                  f"{o['bytes_written']:>11}B {o['syncs']:>4}sy {o['l2_writebacks']:>5}l2 | "
                  f"qemu {q['wall_s']:7.3f}s {q['rss_kib'] / 1024:5.1f}MiB {q['bytes_written']:>11}B "
                  f"{q['syncs']:>4}sy {q['l2_writebacks']:>5}l2 | x{row['speedup']:.1f}"
                  f"{'' if row['identical'] else ' DIFFERENT'}{'' if row['check_clean'] else ' CHECK-FAILED'}"
                  f" ({time.perf_counter() - t_w:.0f}s)",
                  flush=True)
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------- context

def sh(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, shell=isinstance(cmd, str)).stdout.strip()
    except OSError:
        return ""


def machine_info():
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kib = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
    except OSError:
        pass
    rev = sh(["git", "rev-parse", "--short", "HEAD"])
    dirty = sh(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "cpu": cpu,
        "qemu": (sh(["qemu-img", "--version"]).splitlines() or [""])[0],
        "rustc": sh(["rustc", "--version"]),
        "git": rev + (" (modified tree)" if dirty else ""),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def loadavg():
    """1-minute load average: other work on the machine makes the times noisy."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def load_criterion(path):
    try:
        with open(path) as f:
            return json.load(f).get("benches", [])
    except (OSError, ValueError):
        return []


def targets(results, micro):
    by = {r["name"]: r for r in results}
    out = []

    def add(name, goal, value, ok):
        out.append({"target": name, "goal": goal, "measured": value, "met": ok})

    if "alloc" in by:
        s = by["alloc"]["speedup"]
        add("allocation pass, whole process", "≥ 10× faster than qemu-io", f"{s:.1f}×", s >= 10)
    for n in ("rescan", "rescan_unmap"):
        if n in by:
            s = by[n]["speedup"]
            add(f"{n.replace('_', ' ')}, whole process", "≥ 20× faster than qemu-io", f"{s:.1f}×", s >= 20)
    for m in micro:
        if m.get("area") == "skip" and m.get("name") in ("already_zero", "already_zero_unmap") \
                and m.get("ns_per_entry") is not None:
            v = m["ns_per_entry"]
            add(f"skip path {m['name']} ({m['backend']})", "≤ 1 ns per cached L2 entry", f"{v:.3f} ns", v <= 1.0)
    big = [r for r in results if r.get("big")]
    if big:
        peak = max(r["ours"]["rss_kib"] for r in big) / 1024
        add("peak RSS on the big-image runs", "≤ 12 MiB", f"{peak:.1f} MiB", peak <= 12)
    return out


# ----------------------------------------------------------------- conversion

def run_convert(args):
    """`qcow2 convert -O qcow2` vs `qemu-img convert -O qcow2` of a sparse 8 GiB raw image
    (256 MiB of data in 64 KiB..4 MiB runs, the rest holes): wall time (median of the rounds,
    alternating), bytes written and syncs on the target (strace), peak RSS; the targets
    must compare equal."""
    tmp = tempfile.mkdtemp(prefix="qcow2-dash-conv-", dir=args.tmpdir)
    try:
        src = os.path.join(tmp, "sparse.raw")
        rng = random.Random(8)
        with open(src, "wb") as f:
            f.truncate(8 * GIB)
            written = 0
            while written < 256 * MIB:
                n = rng.choice((64 * 1024, 256 * 1024, 1 * MIB, 4 * MIB))
                off = rng.randrange(0, 8 * GIB - n) & ~0xffff
                f.seek(off)
                f.write(bytes([rng.randrange(1, 256)]) * n)
                written += n
        tools = {"ours": [args.bin, "convert"], "qemu": ["qemu-img", "convert"]}
        res = {"ours": {"wall": []}, "qemu": {"wall": []}}
        for r in range(max(1, args.rounds)):
            order = ("ours", "qemu") if r % 2 == 0 else ("qemu", "ours")
            for t in order:
                dst = os.path.join(tmp, f"{t}.qcow2")
                if os.path.exists(dst):
                    os.unlink(dst)
                tfile = os.path.join(tmp, "time.out")
                t0 = time.perf_counter()
                subprocess.run(["/usr/bin/time", "-f", "%M", "-o", tfile] + tools[t] +
                               ["-O", "qcow2", "-f", "raw", src, dst], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                res[t]["wall"].append(time.perf_counter() - t0)
                with open(tfile) as f:
                    res[t]["rss_kib"] = int(f.read().strip().splitlines()[-1])
        for t in ("ours", "qemu"):
            dst = os.path.join(tmp, f"{t}.qcow2")
            os.unlink(dst)
            trace = os.path.join(tmp, "strace.out")
            subprocess.run(["strace", "-f", "-y", "-qq", "-o", trace, "-e",
                            "trace=pwrite64,pwritev,pwritev2,fdatasync,fsync,fallocate"] + tools[t] +
                           ["-O", "qcow2", "-f", "raw", src, dst], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            c = count_image_io(trace, dst)
            res[t].update(wall_s=median(res[t].pop("wall")), bytes_written=c["bytes"],
                          writes=c["writes"], syncs=c["syncs"], file_size=os.path.getsize(dst))
        same = subprocess.run(["qemu-img", "compare", "-q", os.path.join(tmp, "ours.qcow2"),
                               os.path.join(tmp, "qemu.qcow2")]).returncode == 0
        clean = subprocess.run(["qemu-img", "check", "-q", os.path.join(tmp, "ours.qcow2")]).returncode == 0
        return {"source": "8 GiB raw, 256 MiB data", "identical": same, "check_clean": clean,
                "speedup": res["qemu"]["wall_s"] / res["ours"]["wall_s"], **res}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def render_convert(c):
    e = html.escape
    out = [f"<h2>Conversion (<code>convert -O qcow2</code> of a sparse raw image: {e(c['source'])})</h2>",
           "<div class=wrap><table><tr><th class=l>tool</th><th>wall (median)</th><th>speed-up</th>"
           "<th>bytes written</th><th>writes</th><th>syncs</th><th>target size</th><th>peak RSS</th>"
           "<th class=l>result</th></tr>"]
    ok = c["identical"] and c["check_clean"]
    for i, (t, label) in enumerate((("ours", "qcow2 convert"), ("qemu", "qemu-img convert"))):
        x = c[t]
        sp = f"<td rowspan=2><b>{c['speedup']:.1f}×</b></td>" if i == 0 else ""
        verdict = (f"<td rowspan=2 class='l {'ok' if ok else 'bad'}'>"
                   f"{'same data, check clean' if ok else 'DIFFERS or check failed'}</td>") if i == 0 else ""
        out.append(f"<tr><td class=t>{label}</td><td>{fmt_s(x['wall_s'])}</td>{sp}"
                   f"<td>{fmt_b(x['bytes_written'])}</td><td>{fmt_n(x['writes'])}</td><td>{fmt_n(x['syncs'])}</td>"
                   f"<td>{fmt_b(x['file_size'])}</td><td>{fmt_b(x['rss_kib'] * 1024)}</td>{verdict}</tr>")
    out.append("</table></div>")
    return out


# ----------------------------------------------------------------- data path, history

def run_fio(args):
    """scripts/fio_nbd.py: fio's nbd engine against the plugin and qemu-nbd (O_DIRECT and
    writeback) plus fio on a raw file; None when its tools are missing."""
    for tool in ("fio", "nbdkit", "qemu-nbd", "cc"):
        if not shutil.which(tool):
            print(f"note: {tool} not found: data path section skipped", file=sys.stderr)
            return None
    out = os.path.join(args.out, "fio.json")
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fio_nbd.py"),
           "--runtime", str(args.fio_runtime), "--rounds", str(args.fio_rounds), "--json", out]
    if args.tmpdir:
        cmd += ["--workdir", tempfile.mkdtemp(dir=args.tmpdir)]
    r = subprocess.run(cmd, text=True, capture_output=True)
    if r.returncode != 0:
        print(f"note: fio_nbd.py failed: {r.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    with open(out) as f:
        return json.load(f)


FIO_GOALS = {  # workload: (mode, minimum ratio ours / qemu-nbd)
    "randread-4k-d32": ("direct", 1.2), "randwrite-4k-d32": ("direct", 1.2),
    "randrw-4k-d32": ("direct", 1.2), "seqread-1m-d8": ("direct", 1.0),
}


def fio_targets(fio):
    out = []
    if not fio:
        return out
    servers = [("ratios", "nbdkit plugin")]
    if fio.get("server_ratios"):
        servers.insert(0, ("server_ratios", "qcow2 nbd"))
    for key, label in servers:
        ratios = fio[key]
        for name, (mode, goal) in FIO_GOALS.items():
            v = ratios.get(name, {}).get(mode)
            if v is not None:
                out.append({"target": f"{name} over NBD, O_DIRECT ({label})",
                            "goal": f"≥ {goal}× qemu-nbd", "measured": f"{v:.2f}×", "met": v >= goal})
        for name, r in ratios.items():
            v = r.get("writeback")
            if v is not None and name.endswith("d32"):
                out.append({"target": f"{name} over NBD, writeback ({label})", "goal": "≥ 1.5× qemu-nbd",
                            "measured": f"{v:.2f}×", "met": v >= 1.5})
    return out


def headline(data):
    """The ratios whose trend the page plots (ours / QEMU: higher is better)."""
    h = {}
    for r in data.get("workloads", []):
        if r["name"] in ("alloc", "rescan", "rescan_unmap"):
            h[f"{r['name']} speed-up"] = round(r["speedup"], 2)
        ob, qb = r["ours"].get("bytes_written"), r["qemu"].get("bytes_written")
        if r["name"] == "alloc" and ob:
            h["alloc bytes (qemu / ours)"] = round(qb / ob, 2)
    if data.get("convert"):
        h["convert speed-up"] = round(data["convert"]["speedup"], 2)
    for name, rr in ((data.get("fio") or {}).get("ratios") or {}).items():
        for mode, v in rr.items():
            if v is not None:
                h[f"{name} {mode} (× qemu-nbd)"] = v
    for name, rr in ((data.get("fio") or {}).get("server_ratios") or {}).items():
        for mode, v in rr.items():
            if v is not None:
                h[f"qcow2 nbd {name} {mode} (× qemu-nbd)"] = v
    return h


def append_history(out_dir, data):
    path = os.path.join(out_dir, "results-history.json")
    hist = load_history(out_dir)
    hist.append({"date": data["machine"]["date"], "git": data["machine"]["git"],
                 "load": data["machine"].get("load_before"), "ratios": headline(data)})
    with open(path, "w") as f:
        json.dump(hist, f, indent=1)


def load_history(out_dir):
    try:
        with open(os.path.join(out_dir, "results-history.json")) as f:
            h = json.load(f)
        return h if isinstance(h, list) else []
    except (OSError, ValueError):
        return []


def trend_chart(title, points):
    """A small line chart of one ratio over the dashboard runs (oldest left)."""
    w, h, pad = 360, 120, 28
    vals = [v for _, v in points]
    top = max(vals + [1.0]) * 1.1
    n = len(points)
    xs = [pad + (w - 2 * pad) * (i / (n - 1) if n > 1 else 0.5) for i in range(n)]
    ys = [h - pad - (h - 2 * pad) * v / top for v in vals]
    one = h - pad - (h - 2 * pad) * 1.0 / top
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="100%" viewBox="0 0 {w} {h}" role="img" '
             f'aria-label="{html.escape(title)}">',
             f'<text x="0" y="14" class="ct">{html.escape(title)}</text>',
             f'<line x1="{pad}" y1="{one:.1f}" x2="{w - pad}" y2="{one:.1f}" stroke="#c77d1a" '
             f'stroke-dasharray="4 3"/><text x="{w - pad + 2}" y="{one + 4:.1f}" class="val">1×</text>']
    if n > 1:
        parts.append('<polyline fill="none" stroke="#2b6cb0" stroke-width="2" points="' +
                     " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys)) + '"/>')
    for (label, v), x, y in zip(points, xs, ys):
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" class="ours"><title>{html.escape(label)}: '
                     f'{v}</title></circle>')
    parts.append(f'<text x="{xs[-1]:.1f}" y="{ys[-1] - 6:.1f}" class="val" text-anchor="middle">'
                 f'{vals[-1]}×</text></svg>')
    return f'<figure>{"".join(parts)}</figure>'


def render_fio(fio):
    e = html.escape
    out = ["<h2>Data path over NBD (fio, <code>scripts/fio_nbd.py</code>)</h2>",
           f'<p class="small">fio {e(str(fio.get("runtime")))} s per workload, nbd engine, one connection, '
           f'{e(str(fio.get("size")))} image made with <code>preallocation=full</code>; O_DIRECT: '
           "<code>qcow2 nbd --cache=none</code> and the nbdkit plugin <code>cache=none</code> vs "
           f'<code>qemu-nbd --cache=none --aio={e(str(fio.get("qemu_aio")))}</code>; '
           "writeback: page cache on all; ceiling: fio io_uring O_DIRECT on a raw file. "
           f'Medians of {e(str(fio.get("rounds")))} rounds. IOPS (sequential read: MiB/s).</p>']
    servers = [("ours", "ratios", "nbdkit plugin")]
    if fio.get("server_ratios"):
        servers.insert(0, ("server", "server_ratios", "qcow2 nbd"))
    for cfg, key, label in servers:
        out.append(f"<h3>{e(label)}</h3><div class=wrap><table><tr><th class=l>workload</th>"
                   f"<th>{e(label)} O_DIRECT</th><th>qemu-nbd O_DIRECT</th><th>ratio</th>"
                   f"<th>{e(label)} writeback</th><th>qemu-nbd writeback</th><th>ratio</th>"
                   "<th>raw file ceiling</th></tr>")
        for name, r in fio["results"].items():
            if cfg + "-direct" not in r:
                continue
            unit = "mib_s" if name.startswith("seq") else "iops"
            rd = fio[key][name]
            out.append(f"<tr><td class=l>{e(name)}</td><td>{fmt_n(r[cfg + '-direct'][unit])}</td>"
                       f"<td>{fmt_n(r['qemu-nbd-direct'][unit])}</td><td><b>{rd['direct']}×</b></td>"
                       f"<td>{fmt_n(r[cfg + '-writeback'][unit])}</td><td>{fmt_n(r['qemu-nbd-writeback'][unit])}</td>"
                       f"<td><b>{rd['writeback']}×</b></td><td>{fmt_n(r['raw-io_uring-direct'][unit])}</td></tr>")
        out.append("</table></div>")
    return out


def render_history(hist):
    if not hist:
        return []
    keys = []
    for h in hist:
        for k in h["ratios"]:
            if k not in keys:
                keys.append(k)
    out = [f"<h2>Trend of the headline ratios ({len(hist)} dashboard runs, "
           "<code>results-history.json</code>)</h2><div class=charts>"]
    for k in keys:
        pts = [(f'{h["date"]} {h["git"]}', h["ratios"][k]) for h in hist if k in h["ratios"]]
        if pts:
            out.append(trend_chart(k, pts))
    out.append("</div>")
    return out


# ----------------------------------------------------------------- HTML

def fmt_s(v):
    return "–" if v is None else (f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s")


def fmt_b(v):
    if v is None:
        return "–"
    for unit, div in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if v >= div:
            return f"{v / div:.1f} {unit}"
    return f"{int(v)} B"


def fmt_ns(v):
    if v is None:
        return "–"
    if v >= 1e6:
        return fmt_s(v / 1e9)
    return f"{v / 1000:.2f} µs" if v >= 1000 else f"{v:.1f} ns"


def fmt_n(v):
    return "–" if v is None else f"{v:,.0f}"


def bar_chart(title, rows, key, fmt, note=""):
    """Horizontal bars, ours vs QEMU per workload, each pair scaled to its larger value."""
    label_w, bar_w, val_w, row_h = 110, 360, 80, 34
    width = label_w + bar_w + val_w
    height = 28 + row_h * len(rows) + 8
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="100%" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="0" y="16" class="ct">{html.escape(title)}</text>']
    for i, r in enumerate(rows):
        y = 28 + i * row_h
        o, q = r["ours"].get(key), r["qemu"].get(key)
        top = max(o or 0, q or 0) or 1
        parts.append(f'<text x="{label_w - 8}" y="{y + 20}" class="lbl" text-anchor="end">'
                     f'{html.escape(r["name"])}</text>')
        for j, (v, cls) in enumerate(((o, "ours"), (q, "qemu"))):
            w = 0 if v is None else max(1.5, bar_w * v / top) if v else 0
            by = y + 3 + j * 14
            parts.append(f'<rect x="{label_w}" y="{by}" width="{w:.1f}" height="12" class="{cls}"/>')
            parts.append(f'<text x="{label_w + w + 4:.1f}" y="{by + 10}" class="val">{html.escape(fmt(v))}</text>')
    parts.append("</svg>")
    cap = f'<p class="note">{html.escape(note)}</p>' if note else ""
    return f'<figure>{"".join(parts)}{cap}</figure>'


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1200px;padding:0 16px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde2ea;padding-bottom:4px}
.meta{color:#556;font-size:13px} .meta span{margin-right:12px;white-space:nowrap;display:inline-block}
table{border-collapse:collapse;width:100%;font-size:13px;margin:6px 0}
th,td{padding:4px 8px;border-bottom:1px solid #e6e9ef;text-align:right;white-space:nowrap}
th{background:#f3f5f9;font-weight:600;white-space:normal;vertical-align:bottom} td.l,th.l{text-align:left;white-space:normal}
td.v{min-width:120px} .wrap{overflow-x:auto}
tr.grp td{background:#fafbfd}
.ok{color:#137333;font-weight:600} .bad{color:#b3261e;font-weight:600}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:8px 32px}
td.t{text-align:left}
figure{margin:8px 0} .note{font-size:12px;color:#667;margin:2px 0 0}
svg .ct{font-size:13px;font-weight:600;fill:#1d2330} svg .lbl{font-size:12px;fill:#334}
svg .val{font-size:11px;fill:#445} svg .ours{fill:#2b6cb0} svg .qemu{fill:#c77d1a}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px -1px 12px}
.small{font-size:12px;color:#556}
"""


def render(data):
    res, micro, m, tg = data["workloads"], data["criterion"], data["machine"], data["targets"]
    e = html.escape
    out = ["<!doctype html><html lang=en><head><meta charset=utf-8>",
           "<meta name=viewport content='width=device-width,initial-scale=1'>",
           "<title>qcow2 vs qemu-io dashboard</title>", f"<style>{CSS}</style></head><body>",
           "<h1>qcow2 engine vs qemu-io</h1>",
           '<div class="meta">' + " ".join(
               f"<span><b>{e(k)}</b> {e(str(v))}</span>" for k, v in (
                   ("date", m["date"]), ("CPU", m["cpu"]), ("cores", m["nproc"]),
                   ("memory", f'{m["memory_gib"]} GiB'), ("kernel", m["kernel"])))
           + "</div>",
           '<div class="meta">' + " ".join(
               f"<span><b>{e(k)}</b> {e(str(v))}</span>" for k, v in (
                   ("QEMU", m["qemu"]), ("rustc", m["rustc"]), ("git", m["git"]),
                ("load avg before/after", f'{m.get("load_before", "?")} / {m.get("load_after", "?")}'),
                   ("rounds", data["rounds"]))) + "</div>",
           f'<p class="small">Whole process, writeback mode (<code>qemu-io -t writeback -d unmap</code> vs '
           f'<code>qcow2 io -t writeback -d unmap</code>), {data["rounds"]} rounds alternating the order, '
           "medians. Bytes and syncs: <code>strace -f -y</code> on the image file (pwrite64/pwritev bytes, "
           "fdatasync/fsync calls). L2/refblock writebacks: QEMU's <code>--trace qcow2_cache_entry_flush</code> "
           "(split by its <code>is_l2_cache</code> field), ours from <code>--stats=json</code>. "
           "Peak RSS: <code>/usr/bin/time -f %M</code>.</p>"]
    if tg:
        out.append("<h2>Targets</h2><table><tr><th class=l>target</th><th class=l>goal</th>"
                   "<th>measured</th><th>met</th></tr>")
        for t in tg:
            out.append(f"<tr><td class=l>{e(t['target'])}</td><td class=l>{e(t['goal'])}</td>"
                       f"<td>{e(t['measured'])}</td><td class={'ok' if t['met'] else 'bad'}>"
                       f"{'yes' if t['met'] else 'NO'}</td></tr>")
        out.append("</table>")
    out.append("<h2>Workloads</h2><div class=wrap><table><tr><th class=l>workload</th><th class=l>tool</th><th>wall</th>"
               "<th>speed-up</th><th>bytes written</th><th>writes</th><th>syncs</th><th>L2 writebacks</th>"
               "<th>refblock writebacks</th><th>peak RSS</th><th class=l>result</th></tr>")
    for r in res:
        for i, tool in enumerate(("ours", "qemu")):
            x = r[tool]
            first = i == 0
            lead = (f"<td class=l rowspan=2><b>{e(r['name'])}</b><br><span class=small>{e(r['title'])}; "
                    f"{e(r['image_size'])} image, {r['requests']} requests</span></td>") if first else ""
            sp = f"<td rowspan=2><b>{r['speedup']:.1f}×</b></td>" if first else ""
            verdict = ""
            if first:
                ok = r["identical"] and r["check_clean"]
                txt = ("same data, check clean" if ok else
                       ("guest data DIFFERS; " if not r["identical"] else "") +
                       ("check FAILED" if not r["check_clean"] else ""))
                verdict = f"<td rowspan=2 class='l v {'ok' if ok else 'bad'}'>{e(txt)}</td>"
            out.append(f"<tr class={'grp' if first else ''}>{lead}<td class=t>{'ours' if first else 'qemu-io'}</td>"
                       f"<td>{fmt_s(x['wall_s'])}</td>{sp}<td>{fmt_b(x['bytes_written'])}</td>"
                       f"<td>{fmt_n(x['writes'])}</td><td>{fmt_n(x['syncs'])}</td>"
                       f"<td>{fmt_n(x['l2_writebacks'])}</td><td>{fmt_n(x['refblock_writebacks'])}</td>"
                       f"<td>{fmt_b(x['rss_kib'] * 1024)}</td>{verdict}</tr>")
    out.append("</table></div>")
    out.append('<h2>Ours vs QEMU per workload</h2><div class="legend small">'
               '<span style="background:#2b6cb0"></span>ours (qcow2 io)'
               '<span style="background:#c77d1a"></span>qemu-io &nbsp; (each pair scaled to its larger value)</div>'
               '<div class="charts">')
    out.append(bar_chart("Wall time (whole process, median)", res, "wall_s", fmt_s))
    out.append(bar_chart("Bytes written to the image file", res, "bytes_written", fmt_b))
    out.append(bar_chart("Syncs (fdatasync/fsync)", res, "syncs", fmt_n))
    out.append(bar_chart("L2 table writebacks", res, "l2_writebacks", fmt_n))
    out.append(bar_chart("Refcount block writebacks", res, "refblock_writebacks", fmt_n))
    rss = [dict(r, ours=dict(r["ours"], rss=r["ours"]["rss_kib"] * 1024),
                qemu=dict(r["qemu"], rss=r["qemu"]["rss_kib"] * 1024)) for r in res]
    out.append(bar_chart("Peak RSS", rss, "rss", fmt_b))
    out.append("</div>")
    if res:
        out.append("<h2>Our counters per workload (<code>--stats=json</code>, round 1)</h2>")
        keys = list(res[0]["ours"]["stats"].keys())
        out.append("<div class=wrap><table><tr><th class=l>workload</th>" + "".join(
            f"<th>{e(k.replace('_', ' '))}</th>" for k in keys) + "</tr>")
        for r in res:
            out.append(f"<tr><td class=l>{e(r['name'])}</td>" + "".join(
                f"<td>{fmt_n(r['ours']['stats'].get(k))}</td>" for k in keys) + "</tr>")
        out.append("</table></div>")
    if data.get("convert"):
        out.extend(render_convert(data["convert"]))
    if data.get("fio"):
        out.extend(render_fio(data["fio"]))
    out.extend(render_history(data.get("history", [])))
    if micro:
        out.append("<h2>Criterion micro-benchmarks (<code>cargo bench -p qcow2-bench</code>)</h2>"
                   "<div class=wrap><table><tr><th class=l>bench</th><th>time / op (mean)</th><th>entries / op</th>"
                   "<th>ns / entry</th><th>L2 dirty marks</th><th>L2 writebacks</th><th>L2 bytes</th>"
                   "<th>refblock writebacks</th><th>syncs</th><th>L2 misses</th></tr>")
        for b in micro:
            c = b.get("churn_per_op", {})
            t = b.get("time_ns_mean")
            npe = b.get("ns_per_entry")
            out.append(
                f"<tr><td class=l>{e(b['id'])}</td><td>{fmt_ns(t)}</td>"
                f"<td>{fmt_n(b.get('entries_per_op'))}</td><td>{'–' if npe is None else f'{npe:.3f}'}</td>"
                + "".join(f"<td>{c.get(k, 0):,.2f}</td>" for k in (
                    "l2_dirty_marks", "l2_writebacks", "l2_bytes_written", "refblock_writebacks",
                    "file_syncs", "l2_misses")) + "</tr>")
        out.append("</table></div><p class=note>Counters are per operation; a scenario that changes the image "
                   "runs each operation on a fresh copy and includes its flush.</p>")
    out.append("</body></html>")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("DASHBOARD_ROUNDS", 3)))
    ap.add_argument("--trace-rounds", type=int, default=1,
                    help="rounds that also run under strace/--trace (the counts are deterministic; default 1)")
    ap.add_argument("--bin", default="target/release/qcow2")
    ap.add_argument("--out", default="target/dashboard")
    ap.add_argument("--size-gib", type=int, default=1024, help="size of the big image (default 1024 = 1 TiB)")
    ap.add_argument("--only", help="comma-separated workload names")
    ap.add_argument("--criterion", default="target/criterion/churn.json")
    ap.add_argument("--tmpdir", help="where the scratch images go (default: system temp dir)")
    ap.add_argument("--render-only", action="store_true", help="re-render index.html from results.json")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--no-fio", action="store_true",
                    help="skip the data path over NBD (scripts/fio_nbd.py, about 3 minutes a round)")
    ap.add_argument("--fio-runtime", type=int, default=6, help="seconds per fio workload (default 6)")
    ap.add_argument("--fio-rounds", type=int, default=3,
                    help="fio rounds, servers taking turns; medians are shown (default 3)")
    ap.add_argument("--no-convert", action="store_true", help="skip the conversion workload")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rpath = os.path.join(args.out, "results.json")
    if args.render_only:
        with open(rpath) as f:
            data = json.load(f)
    else:
        for tool in ("qemu-io", "qemu-img", "strace", "/usr/bin/time"):
            if not shutil.which(tool):
                sys.exit(f"{tool} is needed (apt-get install qemu-utils strace time)")
        if not os.access(args.bin, os.X_OK):
            sys.exit(f"{args.bin} missing: cargo build --release -p qcow2-cli")
        t0 = time.perf_counter()
        load_before = loadavg()
        results = run_all(args)
        micro = load_criterion(args.criterion)
        machine = dict(machine_info(), load_before=load_before, load_after=loadavg())
        fio = None if args.no_fio else run_fio(args)
        conv = None if args.no_convert else run_convert(args)
        data = {"machine": machine, "rounds": args.rounds, "size_gib": args.size_gib,
                "workloads": results, "criterion": micro, "fio": fio, "convert": conv,
                "targets": targets(results, micro) + fio_targets(fio),
                "duration_s": round(time.perf_counter() - t0, 1)}
        with open(rpath, "w") as f:
            json.dump(data, f, indent=1)
        append_history(args.out, data)
    data["history"] = load_history(args.out)
    with open(os.path.join(args.out, "index.html"), "w") as f:
        f.write(render(data))
    for t in data["targets"]:
        print(f"{'ok  ' if t['met'] else 'MISS'} {t['target']}: {t['measured']} (goal {t['goal']})")
    print(f"wrote {rpath} and {os.path.join(args.out, 'index.html')}")
    if args.strict and not all(t["met"] for t in data["targets"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
