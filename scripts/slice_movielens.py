#!/usr/bin/env python3
"""Write a MovieLens-1M directory holding only some users' ratings (movies.dat and users.dat copied whole).

    python3 scripts/slice_movielens.py SRC OUT --users 2000-2999

Builds a second MovieLens-format dataset from the one at hand (e.g. to check that a training recipe tuned on
one split holds on another). Reads ratings.dat or ratings.dat.gz; needs nothing beyond the standard library."""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from pathlib import Path


def user_range(text: str) -> tuple[int, int]:
    """'A-B' -> (A, B), inclusive."""
    first, sep, last = text.partition("-")
    if not sep or not first.isdigit() or not last.isdigit() or int(first) > int(last):
        raise argparse.ArgumentTypeError(f"--users expects FIRST-LAST (e.g. 2000-2999), got {text!r}")
    return int(first), int(last)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--users", type=user_range, required=True, help="FIRST-LAST user ids to keep")
    args = parser.parse_args(argv)
    src = args.src
    ratings = src / "ratings.dat" if (src / "ratings.dat").is_file() else src / "ratings.dat.gz"
    missing = [p.name for p in (src / "movies.dat", src / "users.dat", ratings) if not p.is_file()]
    if missing:
        print(f"error: {src} lacks {', '.join(missing)} (not a MovieLens-1M directory)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("movies.dat", "users.dat"):
        shutil.copyfile(src / name, args.out / name)
    first, last = args.users
    opener = gzip.open if ratings.suffix == ".gz" else open
    kept = 0
    with opener(ratings, "rb") as fin, open(args.out / "ratings.dat", "wb") as fout:
        for line in fin:
            user = line.split(b"::", 1)[0]
            if user.strip().isdigit() and first <= int(user) <= last:
                fout.write(line)
                kept += 1
    if not kept:
        print(f"error: no ratings of users {first}-{last} in {ratings}", file=sys.stderr)
        return 2
    print(f"{args.out}: {kept} ratings of users {first}-{last}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
