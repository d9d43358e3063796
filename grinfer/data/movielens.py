"""Reader for a MovieLens-1M directory (movies.dat, users.dat, ratings.dat or ratings.dat.gz).

The files are latin-1 text with ``::``-separated fields. Blank lines are ignored; any other
malformed line raises :class:`DataFormatError` naming the file and its 1-based line number.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np

from grinfer.data.errors import DataFormatError
from grinfer.data.types import PROFILE_FIELDS, Dataset, ItemCatalog, UserTimeline

ML1M_GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
    "Western",
)  # fmt: skip
AGE_CODES = (1, 18, 25, 35, 45, 50, 56)
GENDER_CODES = {"F": 1, "M": 2}
NUM_OCCUPATIONS = 21
# Vocabulary sizes (incl. 0 = unknown) of gender, age, occupation, zip prefix, in PROFILE_FIELDS order.
PROFILE_CARDINALITIES = (len(GENDER_CODES) + 1, len(AGE_CODES) + 1, NUM_OCCUPATIONS + 1, 101)
NUM_YEAR_BUCKETS = 18  # buckets 1..18; 0 = unknown year

_YEAR_RE = re.compile(r"\((\d{4})\)\s*$")
_GENRE_INDEX = {name: i for i, name in enumerate(ML1M_GENRES)}
_AGE_INDEX = {code: i + 1 for i, code in enumerate(AGE_CODES)}
_MOVIE_FIELDS = ("movie", "title", "genres")
_USER_FIELDS = ("user", "gender", "age", "occupation", "zip")
_RATING_FIELDS = ("user", "movie", "rating", "timestamp")


def year_bucket(year: int | None) -> int:
    """Map a release year to 1 + clamp((year - 1915) // 5, 0, 17); 0 when the year is unknown."""
    if year is None:
        return 0
    return 1 + min(max((year - 1915) // 5, 0), NUM_YEAR_BUCKETS - 1)


def zip_bucket(zip_code: str) -> int:
    """Map a zip code to 1 + its first two digits (1..100), or 0 when they are not two digits."""
    prefix = zip_code[:2]
    if len(prefix) == 2 and prefix.isascii() and prefix.isdigit():
        return 1 + int(prefix)
    return 0


def read_movielens(path: str | Path) -> Dataset:
    """Read a MovieLens-1M directory into a :class:`Dataset`.

    Ratings come from ``ratings.dat`` if present, else ``ratings.dat.gz``. Every movie in
    movies.dat gets a dense id 1..N in ascending movie-id order; only users with ratings are kept,
    sorted by user id, each with events sorted by timestamp (stable: ties keep file order).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"MovieLens directory not found: {root}")
    ratings_path = _ratings_file(root)
    catalog, movie_to_dense = _read_movies(_require(root / "movies.dat"))
    profiles = _read_users(_require(root / "users.dat"))
    users, items, ratings, times = _read_ratings(ratings_path, movie_to_dense, profiles)

    order = np.lexsort((times, users))  # by user, then time; lexsort is stable
    users, items, ratings, times = users[order], items[order], ratings[order], times[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    timelines = [
        UserTimeline(
            user_id=int(users[s]),
            profile=profiles[int(users[s])].copy(),
            items=items[s:e],
            timestamps=times[s:e],
            ratings=ratings[s:e],
        )
        for s, e in zip(starts.tolist(), ends.tolist())
    ]
    return Dataset(
        name=root.resolve().name,
        catalog=catalog,
        users=timelines,
        profile_fields=PROFILE_FIELDS,
        profile_cardinalities=PROFILE_CARDINALITIES,
    )


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"missing MovieLens file: {path}")
    return path


def _ratings_file(root: Path) -> Path:
    for name in ("ratings.dat", "ratings.dat.gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"no ratings.dat or ratings.dat.gz in MovieLens directory {root}")


def _read_lines(path: Path) -> list[str]:
    """The file's lines (latin-1, gunzipped when it ends in .gz), line i at index i - 1."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = data.decode("latin-1")
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    return text.split("\n")


def _field_count_error(path: Path, lineno: int, fields: tuple[str, ...], got: int) -> DataFormatError:
    return DataFormatError(path, lineno, f"expected {len(fields)} fields '{'::'.join(fields)}', got {got}")


def _split(path: Path, lineno: int, line: str, fields: tuple[str, ...]) -> list[str]:
    parts = line.split("::")
    if len(parts) != len(fields):
        raise _field_count_error(path, lineno, fields, len(parts))
    return parts


def _int(path: Path, lineno: int, field: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataFormatError(path, lineno, f"field '{field}' is not an integer: {text!r}") from None


def _read_movies(path: Path) -> tuple[ItemCatalog, dict[int, int]]:
    movies: dict[int, tuple[str, list[str]]] = {}
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        raw_id, title, genres = _split(path, lineno, line, _MOVIE_FIELDS)
        movie = _int(path, lineno, "movie", raw_id)
        if movie in movies:
            raise DataFormatError(path, lineno, f"duplicate movie id {movie}")
        names = genres.split("|") if genres else []
        for name in names:
            if name not in _GENRE_INDEX:
                raise DataFormatError(path, lineno, f"unknown genre {name!r}")
        movies[movie] = (title, names)

    raw_ids = sorted(movies)
    n = len(raw_ids)
    genre_matrix = np.zeros((n + 1, len(ML1M_GENRES)), dtype=np.uint8)
    years = np.zeros(n + 1, dtype=np.int64)
    titles = [""]
    for dense, movie in enumerate(raw_ids, 1):
        title, names = movies[movie]
        genre_matrix[dense, [_GENRE_INDEX[g] for g in names]] = 1
        match = _YEAR_RE.search(title)
        years[dense] = year_bucket(int(match.group(1)) if match else None)
        titles.append(title)
    catalog = ItemCatalog(
        genres=genre_matrix,
        year_bucket=years,
        titles=titles,
        genre_names=list(ML1M_GENRES),
        raw_ids=np.array([0, *raw_ids], dtype=np.int64),
    )
    return catalog, {movie: dense for dense, movie in enumerate(raw_ids, 1)}


def _read_users(path: Path) -> dict[int, np.ndarray]:
    profiles: dict[int, np.ndarray] = {}
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        raw_id, gender, age, occupation, zip_code = _split(path, lineno, line, _USER_FIELDS)
        user = _int(path, lineno, "user", raw_id)
        if user in profiles:
            raise DataFormatError(path, lineno, f"duplicate user id {user}")
        if gender not in GENDER_CODES:
            raise DataFormatError(path, lineno, f"gender must be 'F' or 'M', got {gender!r}")
        age_code = _int(path, lineno, "age", age)
        if age_code not in _AGE_INDEX:
            raise DataFormatError(path, lineno, f"unknown age code {age_code} (expected one of {AGE_CODES})")
        occ = _int(path, lineno, "occupation", occupation)
        if not 0 <= occ < NUM_OCCUPATIONS:
            raise DataFormatError(path, lineno, f"occupation {occ} outside 0..{NUM_OCCUPATIONS - 1}")
        profiles[user] = np.array(
            [GENDER_CODES[gender], _AGE_INDEX[age_code], occ + 1, zip_bucket(zip_code)], dtype=np.int64
        )
    return profiles


def _read_ratings(
    path: Path, movie_to_dense: dict[int, int], profiles: dict[int, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parse ratings into (user id, dense item, rating, timestamp) int64 arrays in file order."""
    users: list[int] = []
    items: list[int] = []
    ratings: list[int] = []
    times: list[int] = []
    # The hot loop is kept inline (no per-line helper calls): it runs once per rating.
    for lineno, line in enumerate(_read_lines(path), 1):
        parts = line.split("::")
        if len(parts) != 4:
            if not line.strip():
                continue
            raise _field_count_error(path, lineno, _RATING_FIELDS, len(parts))
        try:
            user, movie, rating, ts = int(parts[0]), int(parts[1]), int(parts[2]), int(parts[3])
        except ValueError:
            user, movie, rating, ts = (_int(path, lineno, f, t) for f, t in zip(_RATING_FIELDS, parts))
        if not 1 <= rating <= 5:
            raise DataFormatError(path, lineno, f"rating {rating} outside 1..5")
        item = movie_to_dense.get(movie)
        if item is None:
            raise DataFormatError(path, lineno, f"movie {movie} is not in movies.dat")
        if user not in profiles:
            raise DataFormatError(path, lineno, f"user {user} is not in users.dat")
        users.append(user)
        items.append(item)
        ratings.append(rating)
        times.append(ts)
    return (
        np.array(users, dtype=np.int64),
        np.array(items, dtype=np.int64),
        np.array(ratings, dtype=np.int64),
        np.array(times, dtype=np.int64),
    )
