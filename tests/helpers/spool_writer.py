"""A writer process for crash tests: append records {"round", "seq"} to a stream as fast as it
can, acknowledging each seq on stdout (one line, written with os.write AFTER append returned).

usage: python tests/helpers/spool_writer.py SPOOL STREAM ROUND COUNT MAX_BYTES DURABILITY [BATCH]
COUNT 0 = forever. BATCH > 1 appends with append_many (acks each seq of the batch after it).
Prints "ready <pid>" once it holds the writer lock.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

from connectd.settings import SpoolSettings
from connectd.spool import Spool


def main(argv: list[str]) -> int:
    root, stream, rnd, count, max_bytes, durability = argv[:6]
    batch = int(argv[6]) if len(argv) > 6 else 1
    spool = Spool(Path(root), SpoolSettings(durability=durability, group_commit_ms=1))
    w = spool.writer(stream, wait=True, segment_max_bytes=int(max_bytes))
    os.write(1, f"ready {os.getpid()}\n".encode())
    seqs = itertools.count() if int(count) == 0 else iter(range(int(count)))
    r = int(rnd)
    pad = "p" * 40
    while True:
        chunk = list(itertools.islice(seqs, batch))
        if not chunk:
            break
        if batch == 1:
            w.append("test.appended", {"round": r, "seq": chunk[0], "pad": pad})
        else:
            w.append_many([("test.appended", {"round": r, "seq": s, "pad": pad}) for s in chunk])
        # the ack goes out only after append returned: what the test may rely on
        os.write(1, "".join(f"{s}\n" for s in chunk).encode())
    w.close()
    os.write(1, b"done\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
