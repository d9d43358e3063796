"""MovieLens-1M reader: ids, profile mapping, stable time order and malformed-line errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from grinfer.data import DataFormatError, load_dataset, read_movielens
from grinfer.data.movielens import ML1M_GENRES, PROFILE_CARDINALITIES, year_bucket

SUBSET = Path(__file__).resolve().parents[2].parent / "shared/data/ml-1m-subset"

MOVIES = [
    "10::Zeta (1995)::Comedy|Drama",
    "2::Alpha (1919)::Action",
    "5::Caf\xe9 Without Year::Film-Noir",
    "7::Old (1890)::Western",
    "8::New (2010)::Sci-Fi",
]
USERS = [
    "1::F::1::10::48067",
    "2::M::56::0::K1A0B",
    "3::M::25::20::9",
    "4::F::18::3::02139-1234",
]
RATINGS = [
    "2::10::5::100",
    "1::5::3::300",
    "1::2::4::200",
    "1::10::1::300",
    "1::7::2::300",
    "3::8::5::50",
]


def write_ml(
    root: Path,
    movies: list[str] = MOVIES,
    users: list[str] = USERS,
    ratings: list[str] = RATINGS,
    gz: bool = False,
    newline: str = "\n",
) -> Path:
    """Write a tiny MovieLens-1M directory (latin-1, trailing newline) and return it."""
    root.mkdir(parents=True, exist_ok=True)

    def encode(lines: list[str]) -> bytes:
        return "".join(line + newline for line in lines).encode("latin-1")

    (root / "movies.dat").write_bytes(encode(movies))
    (root / "users.dat").write_bytes(encode(users))
    if gz:
        (root / "ratings.dat.gz").write_bytes(gzip.compress(encode(ratings)))
    else:
        (root / "ratings.dat").write_bytes(encode(ratings))
    return root


def test_items_get_dense_ids_in_movie_id_order(tmp_path: Path) -> None:
    cat = read_movielens(write_ml(tmp_path / "ml-tiny")).catalog
    assert cat.num_items == 5
    assert cat.raw_ids.tolist() == [0, 2, 5, 7, 8, 10]
    assert cat.titles == ["", "Alpha (1919)", "Caf\xe9 Without Year", "Old (1890)", "New (2010)", "Zeta (1995)"]
    assert cat.genre_names == list(ML1M_GENRES) and len(ML1M_GENRES) == 18
    assert cat.genres.dtype == np.uint8 and cat.genres.shape == (6, 18)
    assert cat.genres[0].sum() == 0
    names = [[ML1M_GENRES[g] for g in np.flatnonzero(row)] for row in cat.genres[1:]]
    assert names == [["Action"], ["Film-Noir"], ["Western"], ["Sci-Fi"], ["Comedy", "Drama"]]
    # 1919 -> 1, no year -> 0, 1890 clamps to 1, 2010 clamps to 18, 1995 -> 1 + 16
    assert cat.year_bucket.tolist() == [0, 1, 0, 1, 18, 17]


def test_year_bucket() -> None:
    assert [year_bucket(y) for y in (None, 1900, 1915, 1919, 1920, 1999, 2000, 2030)] == [0, 1, 1, 1, 2, 17, 18, 18]


def test_profiles_and_users(tmp_path: Path) -> None:
    ds = read_movielens(write_ml(tmp_path / "ml-tiny"))
    assert ds.name == "ml-tiny"
    assert ds.profile_fields == ("gender", "age", "occupation", "zip")
    assert ds.profile_cardinalities == PROFILE_CARDINALITIES == (3, 8, 22, 101)
    assert [u.user_id for u in ds.users] == [1, 2, 3]  # user 4 has no ratings
    profiles = [u.profile.tolist() for u in ds.users]
    # zip: "48067" -> 1 + 48; "K1A0B" -> 0 (not digits); "9" -> 0 (one digit)
    assert profiles == [[1, 1, 11, 49], [2, 7, 1, 0], [2, 3, 21, 0]]
    assert ds.num_events == len(RATINGS)


def test_events_sorted_by_time_keeping_file_order_on_ties(tmp_path: Path) -> None:
    user1 = read_movielens(write_ml(tmp_path / "ml")).users[0]
    # file order for user 1: (5, 300), (2, 200), (10, 300), (7, 300); dense ids 2->1, 5->2, 7->3, 10->5
    assert user1.timestamps.tolist() == [200, 300, 300, 300]
    assert user1.items.tolist() == [1, 2, 5, 3]
    assert user1.ratings.tolist() == [4, 3, 1, 2]
    for arr in (user1.items, user1.timestamps, user1.ratings):
        assert arr.dtype == np.int64


def _as_lists(path: Path) -> list[tuple[int, list[int], list[int], list[int], list[int]]]:
    ds = read_movielens(path)
    return [
        (u.user_id, u.profile.tolist(), u.items.tolist(), u.timestamps.tolist(), u.ratings.tolist()) for u in ds.users
    ]


def test_gzip_and_crlf_give_the_same_dataset(tmp_path: Path) -> None:
    plain = _as_lists(write_ml(tmp_path / "plain"))
    assert _as_lists(write_ml(tmp_path / "gz", gz=True)) == plain
    assert _as_lists(write_ml(tmp_path / "crlf", newline="\r\n")) == plain


def test_plain_ratings_preferred_over_gz(tmp_path: Path) -> None:
    root = write_ml(tmp_path / "ml", ratings=["1::2::4::200"])
    (root / "ratings.dat.gz").write_bytes(gzip.compress(b"garbage\n"))
    assert read_movielens(root).num_events == 1


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    root = write_ml(tmp_path / "ml", ratings=["1::2::4::200", "", "1::5::3::100", "", "1::7::9::1"])
    with pytest.raises(DataFormatError) as info:
        read_movielens(root)
    assert info.value.line == 5
    root = write_ml(tmp_path / "ok", ratings=["1::2::4::200", "", "1::5::3::100", ""])
    assert read_movielens(root).num_events == 2


def test_missing_files(tmp_path: Path) -> None:
    root = write_ml(tmp_path / "ml")
    (root / "ratings.dat").unlink()
    with pytest.raises(FileNotFoundError, match=r"ratings\.dat or ratings\.dat\.gz"):
        read_movielens(root)
    root = write_ml(tmp_path / "ml2")
    (root / "users.dat").unlink()
    with pytest.raises(FileNotFoundError, match=r"users\.dat"):
        read_movielens(root)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_movielens(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("file", "index", "line", "message"),
    [
        ("ratings.dat", 2, "1::2::4", "expected 4 fields 'user::movie::rating::timestamp', got 3"),
        ("ratings.dat", 0, "2::10::5::100::7", "expected 4 fields 'user::movie::rating::timestamp', got 5"),
        ("ratings.dat", 3, "1::2::x::200", "field 'rating' is not an integer: 'x'"),
        ("ratings.dat", 3, "1::2::4::2.5", "field 'timestamp' is not an integer: '2.5'"),
        ("ratings.dat", 1, "u1::2::4::200", "field 'user' is not an integer: 'u1'"),
        ("ratings.dat", 4, "1::2::6::200", "rating 6 outside 1..5"),
        ("ratings.dat", 4, "1::2::0::200", "rating 0 outside 1..5"),
        ("ratings.dat", 5, "1::99::4::200", "movie 99 is not in movies.dat"),
        ("ratings.dat", 5, "9::2::4::200", "user 9 is not in users.dat"),
        ("users.dat", 1, "2::X::56::0::K1A0B", "gender must be 'F' or 'M', got 'X'"),
        ("users.dat", 2, "3::M::26::20::9", "unknown age code 26"),
        ("users.dat", 2, "3::M::25::21::9", "occupation 21 outside 0..20"),
        ("users.dat", 2, "3::M::25::pilot::9", "field 'occupation' is not an integer"),
        ("users.dat", 0, "1::F::1::10", "expected 5 fields 'user::gender::age::occupation::zip', got 4"),
        ("users.dat", 3, "1::F::18::3::02139", "duplicate user id 1"),
        ("movies.dat", 1, "2::Alpha (1919)", "expected 3 fields 'movie::title::genres', got 2"),
        ("movies.dat", 0, "ten::Zeta (1995)::Comedy", "field 'movie' is not an integer: 'ten'"),
        ("movies.dat", 4, "8::New (2010)::Cartoon", "unknown genre 'Cartoon'"),
        ("movies.dat", 4, "2::Again (2010)::Drama", "duplicate movie id 2"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, file: str, index: int, line: str, message: str) -> None:
    files = {"movies.dat": list(MOVIES), "users.dat": list(USERS), "ratings.dat": list(RATINGS)}
    files[file][index] = line
    root = write_ml(tmp_path / "ml", files["movies.dat"], files["users.dat"], files["ratings.dat"])
    with pytest.raises(DataFormatError) as info:
        read_movielens(root)
    err = info.value
    assert (err.file, err.line) == (file, index + 1)
    assert str(err).startswith(f"{file}:{index + 1}: {message}")
    assert isinstance(err, ValueError)


def test_malformed_gz_line_names_the_gz_file(tmp_path: Path) -> None:
    ratings = [*RATINGS[:2], "1::2::4"]
    root = write_ml(tmp_path / "ml", ratings=ratings, gz=True)
    with pytest.raises(DataFormatError, match=r"^ratings\.dat\.gz:3: expected 4 fields"):
        read_movielens(root)


def test_load_dataset_reads_a_movielens_directory(tmp_path: Path) -> None:
    root = write_ml(tmp_path / "ml-tiny")
    assert _as_lists(root) == [
        (u.user_id, u.profile.tolist(), u.items.tolist(), u.timestamps.tolist(), u.ratings.tolist())
        for u in load_dataset(str(root)).users
    ]


def test_shared_subset() -> None:
    if not SUBSET.is_dir():
        pytest.skip(f"MovieLens subset not found at {SUBSET}: it is internal data, absent outside the dev machines")
    ds = read_movielens(SUBSET)
    assert ds.name == "ml-1m-subset"
    assert ds.catalog.num_items == 3883
    assert np.all(np.diff(ds.catalog.raw_ids) > 0)
    assert [u.user_id for u in ds.users] == list(range(1, 3000))
    assert ds.num_events == 487_650
    assert ds.users[0].profile.tolist() == [1, 1, 11, 49]  # 1::F::1::10::48067
    for user in ds.users:
        assert np.all(np.diff(user.timestamps) >= 0)
        assert user.items.min() >= 1 and user.items.max() <= ds.catalog.num_items
        assert np.all((user.profile >= 0) & (user.profile < np.array(ds.profile_cardinalities)))
    assert ds.catalog.year_bucket[1:].min() >= 1 and ds.catalog.year_bucket.max() == 18
