#!/usr/bin/env python3
"""The data path over NBD: fio's nbd engine against the project's two NBD
servers -- nbdkit + the qcow2 plugin, and `qcow2 nbd` -- and against
qemu-nbd, on copies of one fully allocated image, in one run. Every server
is measured with O_DIRECT (plugin cache=none; qcow2 nbd and qemu-nbd
--cache=none, qemu-nbd --aio=io_uring) and in writeback; fio with io_uring
and O_DIRECT on a raw file of the same size is the ceiling.

    python3 scripts/fio_nbd.py                     # table + target/fio-nbd/results.json
    python3 scripts/fio_nbd.py --runtime 3 --size 1G --json out.json
    PLUGIN=/path/plugin.so QCOW2=/path/qcow2 python3 scripts/fio_nbd.py

Workloads (one connection, one fio job each): 4 KiB random read / write /
50-50 at depth 32, 1 MiB sequential read at depth 8, 4 KiB random read at
depth 1. A benchmark, not a test: it prints figures and writes JSON; the
targets (issue notes, README) are judged from its output.

nbdkit runs a thread per request (the plugin's calls are synchronous);
`qcow2 nbd` runs one io_uring event loop per connection that moves the data
of plain reads and writes itself, as qemu-nbd does.

The disk under a virtual machine drifts by tens of percent within minutes,
so the servers take turns: each round runs every workload on every server
(ours and qemu-nbd one after the other, the raw file last), and the table
gives each figure's median over the rounds (--rounds, default 3), with the
spread of the per-round ratios.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKLOADS = [
    # name, fio rw, block size, depth, extra fio args
    ("randread-4k-d32", "randread", "4k", 32, []),
    ("randwrite-4k-d32", "randwrite", "4k", 32, []),
    ("randrw-4k-d32", "randrw", "4k", 32, ["--rwmixread=50"]),
    ("seqread-1m-d8", "read", "1m", 8, []),
    ("randread-4k-d1", "randread", "4k", 1, []),
]


LABEL = {"ours": "plugin", "server": "qcow2 nbd", "qemu-nbd": "qemu-nbd"}


def need(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        sys.exit(
            "missing: %s (apt-get install -y fio nbdkit nbdkit-plugin-dev libnbd-bin qemu-utils gcc)"
            % " ".join(missing)
        )


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def build_server():
    if os.environ.get("QCOW2"):
        return os.environ["QCOW2"]
    run(["cargo", "build", "-q", "--release", "-p", "qcow2-cli"], cwd=ROOT)
    return os.path.join(ROOT, "target", "release", "qcow2")


def build_plugin(work):
    if os.environ.get("PLUGIN"):
        return os.environ["PLUGIN"]
    run(["cargo", "build", "-q", "--release", "-p", "qcow2-capi"], cwd=ROOT)
    rel = os.path.join(ROOT, "target", "release")
    link = os.path.join(rel, "libqcow2.so.0")  # the SONAME; cargo writes libqcow2.so
    if not os.path.lexists(link):
        os.symlink("libqcow2.so", link)
    out = os.path.join(work, "nbdkit-qcow2-plugin.so")
    run(
        ["cc", "-std=c11", "-O2", "-fPIC", "-shared", "-I", os.path.join(ROOT, "include"),
         os.path.join(ROOT, "plugins", "nbdkit", "nbdkit-qcow2-plugin.c"), "-o", out,
         "-L", rel, "-Wl,-rpath," + rel, "-lqcow2"]
    )
    return out


class Server:
    def __init__(self, kind, image, mode, tools, work, threads):
        plugin, qcow2 = tools
        self.sock = os.path.join(work, "nbd.sock")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.log = open(os.path.join(work, "server.log"), "w")
        if kind == "ours":
            cache = "none" if mode == "direct" else "writeback"
            # -t: nbdkit's worker threads per connection, each serving one
            # request at a time (16 is nbdkit's default).
            cmd = ["nbdkit", "-U", self.sock, "-t", str(threads), "-f", "--exit-with-parent", plugin,
                   "file=" + image, "cache=" + cache, "discard=unmap"]
        elif kind == "server":
            cmd = [qcow2, "nbd", "-k", self.sock, "-f", "qcow2", "-t", "-e", "0",
                   "--discard=unmap", "--cache=" + ("none" if mode == "direct" else "writeback"),
                   image]
        else:
            cmd = ["qemu-nbd", "-k", self.sock, "-f", "qcow2", "-t", "-e", "0",
                   "--discard=unmap"]
            if mode == "direct":
                cmd += ["--cache=none", "--aio=" + qemu_aio()]
            else:
                cmd += ["--cache=writeback"]
            cmd.append(image)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log)
        for _ in range(500):
            if os.path.exists(self.sock):
                break
            if self.proc.poll() is not None:
                sys.exit("%s exited early; see %s" % (cmd[0], self.log.name))
            time.sleep(0.02)
        time.sleep(0.2)
        self.uri = "nbd+unix:///?socket=" + self.sock

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def settle():
    """Starts every server on a quiet disk: the copy just made is written
    back first (else its writeback runs under whichever server comes next).
    The page cache is left as the copy left it, the same for every server."""
    os.sync()
    time.sleep(2)


_AIO = None


def qemu_aio():
    """io_uring when this qemu-nbd has it, else native."""
    global _AIO
    if _AIO is None:
        with tempfile.TemporaryDirectory() as d:
            img = os.path.join(d, "p.raw")
            with open(img, "wb") as f:
                f.truncate(1 << 20)
            sock = os.path.join(d, "s")
            p = subprocess.Popen(["qemu-nbd", "-k", sock, "-f", "raw", "--cache=none",
                                  "--aio=io_uring", img],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(100):
                if os.path.exists(sock) or p.poll() is not None:
                    break
                time.sleep(0.02)
            ok = p.poll() is None
            p.kill()
            p.wait()
            _AIO = "io_uring" if ok else "native"
    return _AIO


def fio(target_args, rw, bs, depth, extra, runtime, size):
    cmd = ["fio", "--name=job", "--rw=" + rw, "--bs=" + bs, "--iodepth=%d" % depth,
           "--runtime=%d" % runtime, "--time_based", "--size=" + size,
           "--numjobs=1", "--output-format=json", "--randrepeat=0"] + extra + target_args
    out = run(cmd).stdout
    j = json.loads(out[out.index("{"):])
    job = j["jobs"][0]
    iops = job["read"]["iops"] + job["write"]["iops"]
    mibs = (job["read"]["bw_bytes"] + job["write"]["bw_bytes"]) / (1 << 20)
    return {"iops": round(iops), "mib_s": round(mibs, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=int, default=6, help="seconds per workload (default 6)")
    ap.add_argument("--size", default="2G", help="image size (default 2G)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, servers taking turns (default 3)")
    ap.add_argument("--threads", type=int, default=16,
                    help="nbdkit worker threads per connection (default 16, nbdkit's own default)")
    ap.add_argument("--json", default=os.path.join(ROOT, "target", "fio-nbd", "results.json"))
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, on /var/tmp)")
    args = ap.parse_args()
    need("fio", "nbdkit", "qemu-nbd", "qemu-img", "cc")

    work = args.workdir or tempfile.mkdtemp(prefix="fio-nbd-", dir="/var/tmp")
    try:
        tools = (build_plugin(work), build_server())
        base = os.path.join(work, "base.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full", base, args.size])
        raw = os.path.join(work, "ceiling.raw")
        run(["qemu-img", "create", "-q", "-f", "raw", "-o", "preallocation=full", raw, args.size])

        # One image per server and mode, copied once: the workloads write
        # only into allocated clusters, so later rounds see the same layout.
        configs = [("ours", "direct"), ("server", "direct"), ("qemu-nbd", "direct"),
                   ("ours", "writeback"), ("server", "writeback"), ("qemu-nbd", "writeback")]
        images = {}
        for kind, mode in configs:
            images[(kind, mode)] = os.path.join(work, "%s-%s.qcow2" % (kind, mode))
            shutil.copyfile(base, images[(kind, mode)])
        settle()
        samples = {}  # workload -> config -> [per-round result]
        for rnd in range(1, args.rounds + 1):
            print("round %d of %d" % (rnd, args.rounds), flush=True)
            for kind, mode in configs:
                srv = Server(kind, images[(kind, mode)], mode, tools, work, args.threads)
                try:
                    for name, rw, bs, depth, extra in WORKLOADS:
                        r = fio(["--ioengine=nbd", "--uri=" + srv.uri], rw, bs, depth, extra,
                                args.runtime, args.size)
                        samples.setdefault(name, {}).setdefault("%s-%s" % (kind, mode), []).append(r)
                        print("  %-18s %-20s %9d IOPS %9.1f MiB/s" % (
                            name, LABEL[kind] + " " + mode, r["iops"], r["mib_s"]), flush=True)
                finally:
                    srv.stop()
            for name, rw, bs, depth, extra in WORKLOADS:
                r = fio(["--ioengine=io_uring", "--direct=1", "--filename=" + raw], rw, bs, depth,
                        extra, args.runtime, args.size)
                samples[name].setdefault("raw-io_uring-direct", []).append(r)
                print("  %-18s %-20s %9d IOPS %9.1f MiB/s" % (name, "raw file", r["iops"], r["mib_s"]),
                      flush=True)
        for kind, mode in configs:
            run(["qemu-img", "check", "-q", images[(kind, mode)]])

        def median(xs):
            xs = sorted(xs)
            n = len(xs)
            return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2

        results = {}
        ratios = {}  # plugin / qemu-nbd
        spread = {}
        server_ratios = {}  # qcow2 nbd / qemu-nbd
        server_spread = {}
        for name, per in samples.items():
            for cfg, rs in per.items():
                results.setdefault(name, {})[cfg] = {
                    "iops": round(median([r["iops"] for r in rs])),
                    "mib_s": round(median([r["mib_s"] for r in rs]), 1),
                }
            for ours, rat, spr in (("ours", ratios, spread), ("server", server_ratios, server_spread)):
                for mode in ("direct", "writeback"):
                    q = results[name]["qemu-nbd-" + mode]["iops"]
                    o = results[name][ours + "-" + mode]["iops"]
                    rat.setdefault(name, {})[mode] = round(o / q, 2) if q else None
                    per_round = [a["iops"] / b["iops"] for a, b in
                                 zip(per[ours + "-" + mode], per["qemu-nbd-" + mode]) if b["iops"]]
                    spr.setdefault(name, {})[mode] = [round(min(per_round), 2), round(max(per_round), 2)]

        for ours, rat, spr in (("server", server_ratios, server_spread), ("ours", ratios, spread)):
            print()
            print("%s against qemu-nbd" % LABEL[ours])
            print("%-18s %12s %12s %7s %12s %12s %7s %12s" % (
                "workload", "ours direct", "qemu direct", "ratio", "ours wb", "qemu wb", "ratio",
                "raw ceiling"))
            for name, *_ in WORKLOADS:
                r = results[name]
                unit = "mib_s" if name.startswith("seq") else "iops"
                print("%-18s %12s %12s %6.2fx %12s %12s %6.2fx %12s" % (
                    name, r[ours + "-direct"][unit], r["qemu-nbd-direct"][unit],
                    rat[name]["direct"] or 0, r[ours + "-writeback"][unit],
                    r["qemu-nbd-writeback"][unit], rat[name]["writeback"] or 0,
                    r["raw-io_uring-direct"][unit]))
            print("per-round ratio spread (min-max): " + "; ".join(
                "%s %s-%s / %s-%s" % (name, spr[name]["direct"][0], spr[name]["direct"][1],
                                       spr[name]["writeback"][0], spr[name]["writeback"][1])
                for name, *_ in WORKLOADS))
        print("(medians of %d rounds; IOPS; seqread in MiB/s; %s image, %d s per workload, %d CPUs, fio %s, "
              "qemu-nbd --aio=%s, nbdkit -t %d)" % (args.rounds, args.size, args.runtime, os.cpu_count(),
                                      run(["fio", "--version"]).stdout.strip(), qemu_aio(), args.threads))

        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "size": args.size, "runtime": args.runtime, "rounds": args.rounds, "nbdkit_threads": args.threads,
                       "qemu_aio": qemu_aio(), "results": results, "ratios": ratios,
                       "ratio_spread": spread, "server_ratios": server_ratios,
                       "server_ratio_spread": server_spread, "samples": samples}, f, indent=1)
        print("wrote", args.json)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
