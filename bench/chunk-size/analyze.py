#!/usr/bin/env python3
"""Chunk-size analysis of a boot read trace (see measure.sh).

Usage: analyze.py TRACE [IMAGE]

TRACE lines: "ms R|W offset length" ('#' lines are comments). Only R lines
count. For each chunk size it prints, as a Markdown table:
  - chunks touched by the reads, and the bytes a chunked fetch moves
    (touched chunks x chunk size),
  - over-fetch = fetched / working set (distinct bytes read),
  - requests (one per touched chunk; all-zero chunks are not stored in the
    repository, so with IMAGE given they are counted apart and cost nothing),
  - requests per MiB of working set,
  - an estimate of the demand-fetch time on a 20 Mbit/s link with a 10 ms
    round trip per request and no parallelism.
With IMAGE it also reports the image's non-zero bytes and, per chunk size,
how many non-zero chunks the whole image has (what a publish would store).
"""
import os
import sys

SIZES = [16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10,
         1 << 20, 2 << 20, 4 << 20]
LINK_BPS = 20e6 / 8          # 20 Mbit/s in bytes per second
RTT = 0.010                  # seconds per request
MIB = 1 << 20
BLK = 4096                   # granule for the zero scan


def human(n):
    return f"{n >> 20}M" if n >= MIB else f"{n >> 10}K"


def load(path):
    """Returns [(ms, offset, length)] of the reads."""
    reads = []
    with open(path) as f:
        for line in f:
            if not line.strip() or line.startswith('#'):
                continue
            ms, op, off, ln = line.split()
            if op == 'R' and int(ln) > 0:
                reads.append((int(ms), int(off), int(ln)))
    return reads


def touched(reads, c):
    t = set()
    for off, ln in reads:
        t.update(range(off // c, (off + ln - 1) // c + 1))
    return t


def phases(timed):
    """Split at the longest pause between two reads. In a boot that is the
    time the kernel spends in the initramfs: before it the firmware and the
    bootloader read the kernel and initrd, after it the OS reads the root fs."""
    gaps = [(timed[i + 1][0] - timed[i][0], i + 1) for i in range(len(timed) - 1)]
    gap, cut = max(gaps) if gaps else (0, len(timed))
    strip = lambda rs: [(o, l) for _, o, l in rs]
    return strip(timed[:cut]), strip(timed[cut:]), gap


def working_set(reads):
    total, end = 0, -1
    for off, ln in sorted(reads):
        lo, hi = max(off, end), off + ln
        if hi > lo:
            total += hi - lo
        end = max(end, hi)
    return total


def nonzero_blocks(image):
    """Indices of non-zero 4 KiB blocks, skipping holes with SEEK_DATA."""
    zero = bytes(BLK)
    blocks = set()
    with open(image, 'rb') as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
                hole = os.lseek(fd, data, os.SEEK_HOLE)
            except OSError:          # no SEEK_DATA, or no data after pos
                if pos == 0:
                    data, hole = 0, size
                else:
                    break
            data -= data % BLK
            f.seek(data)
            p = data
            while p < hole:
                buf = f.read(min(64 * MIB, hole - p))
                if not buf:
                    break
                for i in range(0, len(buf), BLK):
                    if buf[i:i + BLK] != zero[:len(buf) - i if len(buf) - i < BLK else BLK]:
                        blocks.add((p + i) // BLK)
                p += len(buf)
            pos = hole
    return blocks, size


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: analyze.py TRACE [IMAGE]")
    timed = load(sys.argv[1])
    if not timed:
        sys.exit("analyze.py: no reads in the trace")
    reads = [(o, l) for _, o, l in timed]
    ws = working_set(reads)
    total = sum(ln for _, ln in reads)
    nz = None
    if len(sys.argv) == 3:
        nz, img_size = nonzero_blocks(sys.argv[2])

    lens = sorted(ln for _, ln in reads)
    print(f"Reads: {len(reads)} requests, {total / MIB:.1f} MiB requested, "
          f"working set (distinct bytes) {ws / MIB:.1f} MiB; request size "
          f"median {lens[len(lens) // 2] >> 10} KiB, max {lens[-1] >> 10} KiB.")
    if nz is not None:
        print(f"Image: {img_size / MIB:.0f} MiB, non-zero {len(nz) * BLK / MIB:.1f} MiB "
              f"({len(nz) * BLK / img_size:.1%}); boot working set = "
              f"{ws / (len(nz) * BLK):.1%} of the non-zero data.")
    print()
    hdr = ["chunk", "chunks touched", "fetched MiB", "over-fetch",
           "requests", "req/MiB of WS", "est. fetch s @20Mbit+10ms"]
    if nz is not None:
        hdr[4] = "requests (non-zero)"
        hdr += ["image non-zero chunks"]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for c in SIZES:
        tch = touched(reads, c)
        fetched = len(tch) * c
        reqs = len(tch)
        if nz is not None:
            per = c // BLK
            nzc = {b // per for b in nz}
            real = tch & nzc
            reqs = len(real)
            fetched_real = reqs * c
        else:
            fetched_real = fetched
        t = fetched_real / LINK_BPS + reqs * RTT
        row = [human(c), str(len(tch)), f"{fetched / MIB:.1f}",
               f"{fetched / ws:.2f}x", str(reqs), f"{reqs / (ws / MIB):.1f}",
               f"{t:.0f}"]
        if nz is not None:
            row.append(str(len(nzc)))
        print("| " + " | ".join(row) + " |")

    early, late, gap = phases(timed)
    if early and late:
        we, wl = working_set(early), working_set(late)
        print()
        print(f"By phase (split at the longest pause, {gap / 1000:.1f} s): "
              f"bootloader phase {len(early)} reads, {we / MIB:.1f} MiB distinct; "
              f"OS phase {len(late)} reads, {wl / MIB:.1f} MiB distinct.")
        print()
        print("| chunk | over-fetch bootloader phase | over-fetch OS phase | requests OS phase |")
        print("|---|---|---|---|")
        for c in SIZES:
            te, tl = touched(early, c), touched(late, c)
            print(f"| {human(c)} | {len(te) * c / we:.2f}x | {len(tl) * c / wl:.2f}x | {len(tl)} |")


if __name__ == '__main__':
    main()
