"""The first text files of a corpus zip (in the order qkvlab reads them: sorted by name), as many
as fit a compressed size, into a new zip: a device call carries at most 64 MiB, the checkout
included, and the Gutenberg training zip is 41 MB. The calibration of a fitted conversion reads
the first documents, so it sees the same text in the subset as in the whole split.

    python scripts/zip_subset.py ../shared/data/gutenberg/gutenberg-train.zip \
        .data/gutenberg-train-head.zip --max-mb 24
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--max-mb", type=float, required=True, help="compressed size limit, in MB (10^6 bytes)")
    args = ap.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out} exists; remove it first")
    limit = int(args.max_mb * 1e6)
    with zipfile.ZipFile(args.src) as zf:
        members = sorted((i for i in zf.infolist() if not i.is_dir()), key=lambda i: i.filename)
        buf = io.BytesIO()
        kept = 0
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
            for info in members:
                data = zf.read(info)
                mark = buf.tell()
                out.writestr(info, data)
                if buf.tell() + 22 + 200 * (kept + 1) > limit:  # + the central directory's entries
                    buf.seek(mark)
                    buf.truncate()
                    out.filelist.pop()
                    del out.NameToInfo[info.filename]
                    break
                kept += 1
    tmp = args.out.with_suffix(".part")
    tmp.write_bytes(buf.getvalue())
    tmp.rename(args.out)
    print(f"{args.out}: the first {kept} of {len(members)} files, {args.out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
