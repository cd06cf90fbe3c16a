#!/usr/bin/env python3
"""What a durable commit costs on this disk, by the pages it dirties: N random 4 KiB page
writes into a preallocated 64 MiB file, then fdatasync, 200 times each; and a 16 KiB append
then fdatasync (what a commit of an append-only journal would cost).

Usage: python3 scripts/fsync-pages.py [DIR]   (default: target/tmp; put it on the disk the data
directory uses, not a tmpfs)."""
import os
import random
import sys
import time

directory = sys.argv[1] if len(sys.argv) > 1 else "target/tmp"
os.makedirs(directory, exist_ok=True)
pages_file = os.path.join(directory, "fsync-pages.test")
append_file = os.path.join(directory, "fsync-append.test")
size = 64 << 20
page = os.urandom(4096)
fd = os.open(pages_file, os.O_RDWR | os.O_CREAT, 0o644)
try:
    os.ftruncate(fd, size)
    os.fsync(fd)
    for pages in (1, 4, 16, 24, 40):
        rounds = 200
        start = time.perf_counter()
        for _ in range(rounds):
            for _ in range(pages):
                os.pwrite(fd, page, random.randrange(size // 4096) * 4096)
            os.fdatasync(fd)
        ms = (time.perf_counter() - start) / rounds * 1e3
        print(f"{pages:>3} random pages + fdatasync: {ms:.2f} ms")
finally:
    os.close(fd)
    os.unlink(pages_file)
fd = os.open(append_file, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
try:
    rounds = 200
    start = time.perf_counter()
    for _ in range(rounds):
        os.write(fd, page * 4)
        os.fdatasync(fd)
    ms = (time.perf_counter() - start) / rounds * 1e3
    print(f"16 KiB append + fdatasync: {ms:.2f} ms")
finally:
    os.close(fd)
    os.unlink(append_file)
