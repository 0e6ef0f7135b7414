"""A reader process for crash tests: follow a stream from a position with small batches and
print, per batch, one line "<end position> <seq>,<seq>,..." (a consumer's commit unit: the
position and the effects together). Exits 0 once it has seen seq LAST. A line that is not a whole record (or a torn tail) makes it exit 3.

usage: python tests/helpers/spool_follower.py SPOOL STREAM POSITION BATCH LAST
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from connectd.spool import BadRecord, Position, Spool, decode


def main(argv: list[str]) -> int:
    root, stream, position, batch_size, last = argv[:5]
    spool = Spool(Path(root))
    reader = spool.reader(stream, Position.parse(position))
    last_seq = int(last)
    while True:
        batch = reader.read(int(batch_size))
        if batch is None:
            time.sleep(0.002)
            continue
        if batch.torn is not None:
            os.write(2, f"torn tail at {batch.start}: {batch.torn[:80]!r}\n".encode())
            return 3
        seqs = []
        for line in batch.lines:
            try:
                seqs.append(decode(line)["seq"])
            except (BadRecord, KeyError):
                os.write(2, f"not a record at {batch.start}: {line[:80]!r}\n".encode())
                return 3
        os.write(1, f"{batch.end} {','.join(map(str, seqs))}\n".encode())
        if last_seq in seqs:
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
