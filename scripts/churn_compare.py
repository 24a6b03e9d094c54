#!/usr/bin/env python3
"""Churn comparison: the same qemu-io script through qemu-io and `qcow2 io`
(writeback mode) on copies of one image, counting with strace what reaches
the image file: pwrite64 calls and bytes, fdatasync calls, fallocate calls.

Usage: scripts/churn_compare.py [--json OUT] [--bin target/release/qcow2]
Exits 1 if ours exceeds QEMU's bytes or syncs in any scenario.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

GIB = 1 << 30


def scenarios():
    """(name, image size, preparation commands, measured commands)."""
    data_1g = ["write -P 0xab 0 1G"]
    sparse = [f"write -P 0x5 {i * 512}M 64k" for i in range(16)]
    return [
        ("zero 1 GiB of data (no unmap)", "8G", data_1g, ["write -z 0 1G"]),
        ("zero 1 GiB of data (unmap)", "8G", data_1g, ["write -z -u 0 1G"]),
        ("zero it again (no unmap)", "8G", data_1g + ["write -z 0 1G"], ["write -z 0 1G"]),
        ("zero it again (unmap)", "8G", data_1g + ["write -z -u 0 1G"], ["write -z -u 0 1G"]),
        ("zero unallocated 1 GiB", "8G", [], ["write -z 0 1G"]),
        ("zero one cluster in 1 GiB of data", "8G", data_1g, ["write -z 512M 64k"]),
        ("sparse: one entry per L2 table", "8G", sparse, [f"write -z {i * 512}M 64k" for i in range(16)]),
        ("discard 256 MiB of data", "8G", data_1g, ["discard 0 256M"]),
    ]


STRACE_RE = re.compile(r'^\d+\s+(\w+)\((\d+)<([^>]*)>(.*)$')


def count_image_io(trace, image):
    """Counts pwrite calls/bytes, syncs and fallocates on `image` in an
    `strace -f -y` log (shared with scripts/dashboard.py)."""
    real = os.path.realpath(image)
    res = {"writes": 0, "bytes": 0, "syncs": 0, "fallocates": 0}
    with open(trace) as f:
        for line in f:
            m = STRACE_RE.match(line)
            if not m or m.group(3) != real:
                continue
            call, rest = m.group(1), m.group(4)
            if call.startswith("pwrite"):
                r = re.search(r"= (\d+)$", rest.strip())
                res["writes"] += 1
                res["bytes"] += int(r.group(1)) if r else 0
            elif call in ("fdatasync", "fsync"):
                res["syncs"] += 1
            elif call == "fallocate":
                res["fallocates"] += 1
    return res


def measure(cmd, image):
    """Runs cmd under strace; returns counters for the image file."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace", delete=False) as t:
        trace = t.name
    subprocess.run(
        ["strace", "-f", "-y", "-qq", "-o", trace, "-e",
         "trace=pwrite64,pwritev,pwritev2,fdatasync,fsync,fallocate"] + cmd,
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res = count_image_io(trace, image)
    os.unlink(trace)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/qcow2")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    worse = False
    with tempfile.TemporaryDirectory() as d:
        for name, size, prep, cmds in scenarios():
            base = os.path.join(d, "base.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, size], check=True)
            if prep:
                subprocess.run(["qemu-io", "-t", "writeback"] + sum([["-c", c] for c in prep], []) + [base],
                               check=True, stdout=subprocess.DEVNULL)
            q, o = os.path.join(d, "q.qcow2"), os.path.join(d, "o.qcow2")
            shutil.copy(base, q)
            shutil.copy(base, o)
            c = sum([["-c", x] for x in cmds], [])
            qm = measure(["qemu-io", "-t", "writeback", "-d", "unmap"] + c + [q], q)
            om = measure([args.bin, "io", "-t", "writeback", "-d", "unmap"] + c + [o], o)
            same = subprocess.run(["qemu-img", "compare", "-q", q, o]).returncode == 0
            clean = subprocess.run(["qemu-img", "check", "-q", o]).returncode == 0
            bad = om["bytes"] > qm["bytes"] or om["syncs"] > qm["syncs"] or not same or not clean
            worse |= bad
            rows.append({"scenario": name, "qemu": qm, "ours": om, "identical": same, "check_clean": clean})
            print(f"{name:38s} qemu {qm['bytes']:>10} B {qm['syncs']:>4} syncs | ours {om['bytes']:>10} B "
                  f"{om['syncs']:>4} syncs {'OK' if not bad else 'WORSE'}", flush=True)
    tq = sum(r["qemu"]["bytes"] for r in rows)
    to = sum(r["ours"]["bytes"] for r in rows)
    print(f"{'total':38s} qemu {tq:>10} B | ours {to:>10} B ({100.0 * to / max(tq, 1):.1f}% of QEMU)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "total_qemu_bytes": tq, "total_ours_bytes": to}, f, indent=1)
    sys.exit(1 if worse or to * 4 > tq * 3 else 0)


if __name__ == "__main__":
    main()
