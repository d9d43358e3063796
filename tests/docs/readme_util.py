"""Reading the docs' shell examples and writing a tiny MovieLens-1M directory for them to run on."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np

from grinfer.data.movielens import AGE_CODES, ML1M_GENRES

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def bash_commands(markdown: str) -> list[list[str]]:
    """Every command line of the ```bash blocks, as shell words (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", markdown, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def markdown_links(markdown: str) -> list[str]:
    """The targets of [text](target) links."""
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", markdown)


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown page."""
    anchors = set()
    for title in re.findall(r"^#+ (.+)$", markdown, re.M):
        anchor = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        anchors.add(anchor)
    return anchors


def write_movielens(root: Path, users: int = 60, movies: int = 300, per_user: int = 25, seed: int = 0) -> Path:
    """A small random directory in MovieLens-1M's format (movie ids 1..movies, user ids 1..users)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    movie_lines = []
    for movie in range(1, movies + 1):
        genres = rng.choice(len(ML1M_GENRES), size=rng.integers(1, 3), replace=False)
        movie_lines.append(f"{movie}::Movie {movie} ({rng.integers(1930, 2001)})::"
                           + "|".join(ML1M_GENRES[g] for g in genres))
    user_lines = [f"{u}::{'FM'[u % 2]}::{AGE_CODES[u % len(AGE_CODES)]}::{u % 21}::{10000 + 97 * u}"
                  for u in range(1, users + 1)]
    rating_lines = []
    for u in range(1, users + 1):
        items = rng.choice(movies, size=per_user, replace=False) + 1
        times = 978_300_000 + np.cumsum(rng.integers(1, 5000, per_user))
        rating_lines += [f"{u}::{i}::{r}::{t}" for i, r, t in zip(items, rng.integers(1, 6, per_user), times)]
    for name, lines in (("movies.dat", movie_lines), ("users.dat", user_lines), ("ratings.dat", rating_lines)):
        (root / name).write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return root
