"""Merchant data format: validation (every problem, located), loading, examples, splits, writing."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from client.data import (
    DataValidationError,
    MerchantData,
    Problem,
    build_examples,
    check_output_dir,
    load_merchant,
    product_text,
    split_examples,
    validate_merchant_dir,
    write_merchant,
)
from shared.tasks import Example

Rows = list[dict[str, Any]]

CATALOG: Rows = [
    {"product_id": "p1", "title": "Red wool scarf", "description": "Warm.", "category": "apparel",
     "brand": "Acme", "price": 20.0},
    {"product_id": "p2", "title": "Steel kettle", "description": "", "category": "kitchen", "brand": "",
     "price": 35.5},
    {"product_id": "p3", "title": "Blue tent", "description": "Sleeps two.", "category": "outdoor",
     "brand": "Camp", "price": None},
    {"product_id": "p4", "title": "Oak lamp", "description": "", "category": "", "brand": "", "price": 0.0},
    {"product_id": "p5", "title": "Spare mug", "description": "", "category": "", "brand": "", "price": 3.0},
]
# u1's rows are out of time order in the file, on purpose: history follows timestamps.
INTERACTIONS: Rows = [
    {"user_id": "u1", "product_id": "p2", "label": "click", "query": "", "rating": None,
     "timestamp": "2024-01-01T10:00:00Z"},
    {"user_id": "u1", "product_id": "p1", "label": "impression", "query": "", "rating": None,
     "timestamp": "2024-01-01T09:00:00Z"},
    {"user_id": "u2", "product_id": "p3", "label": "purchase", "query": "tent", "rating": 5,
     "timestamp": 1704100000},
    {"user_id": "u1", "product_id": "p3", "label": "purchase", "query": "", "rating": 4,
     "timestamp": "2024-01-02T09:00:00+00:00"},
    {"user_id": "u1", "product_id": "p4", "label": "impression", "query": "", "rating": None,
     "timestamp": "2024-01-03"},
]
JUDGMENTS: Rows = [
    {"query": "warm scarf", "product_id": "p1", "label": 3},
    {"query": "warm scarf", "product_id": "p2", "label": 0},
    {"query": "kettle", "product_id": "p2", "label": 2},
]


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def write_table(directory: Path, table: str, rows: Rows, fmt: str = "csv") -> Path:
    """Write rows exactly as given (CSV by hand, so tests control every byte that matters)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{table}.{fmt}"
    if fmt == "csv":
        columns = list(rows[0]) if rows else ["product_id", "title"]
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows([[_cell(row.get(c)) for c in columns] for row in rows])
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        frame = pd.DataFrame(rows)
        for column in frame.columns:  # Parquet columns have one type: mixed ones become text
            if len({type(v) for v in frame[column] if v is not None}) > 1:
                frame[column] = [None if v is None else str(v) for v in frame[column]]
        frame.to_parquet(path, index=False)
    return path


def make_merchant(root: Path, fmt: str = "csv", name: str = "shop") -> Path:
    directory = root / name
    write_table(directory, "catalog", CATALOG, fmt)
    write_table(directory, "interactions", INTERACTIONS, fmt)
    write_table(directory, "judgments", JUDGMENTS, fmt)
    return directory


def replace_csv(directory: Path, table: str, old: str, new: str) -> None:
    path = directory / f"{table}.csv"
    text = path.read_text(encoding="utf-8")
    assert old in text, f"fixture text {old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def located(problems: list[Problem]) -> set[tuple[str, int | None, str | None]]:
    return {(p.file, p.row, p.field) for p in problems}


# --------------------------------------------------------------------------- loading
@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_good_merchant_loads_in_every_format(tmp_path: Path, fmt: str) -> None:
    directory = make_merchant(tmp_path, fmt)
    assert validate_merchant_dir(directory) == []
    data = load_merchant(directory)
    assert data.merchant_id == "shop"
    assert list(data.catalog.columns) == ["product_id", "title", "description", "category", "brand", "price"]
    assert data.catalog["product_id"].tolist() == ["p1", "p2", "p3", "p4", "p5"]
    assert data.catalog["brand"].tolist() == ["Acme", "", "Camp", "", ""]
    assert data.catalog["price"].tolist()[:2] == [20.0, 35.5] and math.isnan(data.catalog["price"][2])
    assert data.interactions is not None and data.judgments is not None
    assert list(data.interactions.columns) == [
        "user_id", "product_id", "label", "query", "rating", "timestamp"
    ]
    assert data.interactions["label"].tolist() == [
        "click", "impression", "purchase", "purchase", "impression"
    ]
    assert data.interactions["timestamp"][0] == pytest.approx(1704103200.0)  # 2024-01-01T10:00Z
    assert data.interactions["timestamp"][2] == 1704100000.0
    assert data.interactions["timestamp"][4] == pytest.approx(1704240000.0)  # a date reads as UTC midnight
    assert data.judgments["label"].tolist() == [3, 0, 2]
    assert data.judgments["label"].dtype == "int64"


def test_unknown_columns_are_ignored_and_event_tables_are_optional(tmp_path: Path) -> None:
    directory = tmp_path / "shop"
    write_table(directory, "catalog", [{**row, "colour_code": 7} for row in CATALOG])
    write_table(directory, "judgments", JUDGMENTS)
    data = load_merchant(directory)
    assert "colour_code" not in data.catalog.columns
    assert data.interactions is None and data.judgments is not None


def test_integer_ids_match_their_text_form(tmp_path: Path) -> None:
    directory = tmp_path / "shop"
    write_table(directory, "catalog", [{"product_id": 42, "title": "Mug"}], "jsonl")
    write_table(directory, "judgments", [{"query": "mug", "product_id": "42", "label": 3}], "jsonl")
    assert load_merchant(directory).catalog["product_id"].tolist() == ["42"]


def test_problem_reads_as_file_row_field_message() -> None:
    problem = Problem("interactions.csv", 17, "label", "'clik' is not one of impression, click, purchase")
    assert str(problem) == (
        "interactions.csv row 17, field 'label': 'clik' is not one of impression, click, purchase"
    )
    assert str(Problem("catalog.csv", None, "title", "required column is missing")) == (
        "catalog.csv, field 'title': required column is missing"
    )


# --------------------------------------------------------------------------- one problem each
def _drop_catalog(d: Path) -> None:
    (d / "catalog.csv").unlink()


def _drop_events(d: Path) -> None:
    (d / "interactions.csv").unlink()
    (d / "judgments.csv").unlink()


def _drop_title_column(d: Path) -> None:
    write_table(d, "catalog", [{k: v for k, v in row.items() if k != "title"} for row in CATALOG])


def _non_utf8_description(d: Path) -> None:
    path = d / "catalog.csv"
    path.write_bytes(path.read_bytes().replace(b"Sleeps two.", b"Sleeps \xff two."))


def _nan_price_parquet(d: Path) -> None:
    (d / "catalog.csv").unlink()
    table = pa.table({
        "product_id": [r["product_id"] for r in CATALOG],
        "title": [r["title"] for r in CATALOG],
        # from_pandas=False keeps NaN a real NaN; pandas' own writer would turn it into null
        "price": pa.array([1.0, math.nan, 2.0, 3.0, 4.0], from_pandas=False),
    })
    pq.write_table(table, d / "catalog.parquet")


def _csv_named_parquet(d: Path) -> None:
    (d / "judgments.csv").rename(d / "judgments.parquet")


def _broken_jsonl_line(d: Path) -> None:
    (d / "judgments.csv").unlink()
    lines = [json.dumps(row) for row in JUDGMENTS]
    lines[2] = lines[2][:-3]  # line 3 loses its closing characters
    (d / "judgments.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _two_formats(d: Path) -> None:
    write_table(d, "judgments", JUDGMENTS, "jsonl")


def _unsupported_extension(d: Path) -> None:
    (d / "judgments.csv").rename(d / "judgments.json")


def _empty_table(d: Path) -> None:
    (d / "judgments.csv").write_text("query,product_id,label\n", encoding="utf-8")


def _ragged_row(d: Path) -> None:
    replace_csv(d, "judgments", "kettle,p2,2", "kettle,p2,2,extra")


BROKEN: dict[str, tuple[Callable[[Path], None], tuple[str, int | None, str | None], str]] = {
    "missing catalog": (_drop_catalog, ("catalog.{csv,jsonl,parquet}", None, None), "is missing"),
    "no event table": (_drop_events, ("shop", None, None), "no event table"),
    "missing column": (_drop_title_column, ("catalog.csv", None, "title"), "required column is missing"),
    "unknown product": (
        lambda d: replace_csv(d, "interactions", "u1,p4", "u1,p9"),
        ("interactions.csv", 5, "product_id"), "'p9' is not in catalog.csv",
    ),
    "event label": (
        lambda d: replace_csv(d, "interactions", "click", "clik"),
        ("interactions.csv", 1, "label"), "'clik' is not one of impression, click, purchase",
    ),
    "grade out of range": (
        lambda d: replace_csv(d, "judgments", "p1,3", "p1,4"),
        ("judgments.csv", 1, "label"), "is not an integer grade 0..3",
    ),
    "fractional grade": (
        lambda d: replace_csv(d, "judgments", "kettle,p2,2", "kettle,p2,2.5"),
        ("judgments.csv", 3, "label"), "'2.5' is not an integer grade",
    ),
    "rating out of range": (
        lambda d: replace_csv(d, "interactions", "tent,5", "tent,6"),
        ("interactions.csv", 3, "rating"), "outside the rating range 1..5",
    ),
    "infinite rating": (
        lambda d: replace_csv(d, "interactions", "tent,5", "tent,inf"),
        ("interactions.csv", 3, "rating"), "is not a finite number",
    ),
    "nan price csv": (
        lambda d: replace_csv(d, "catalog", "35.5", "NaN"),
        ("catalog.csv", 2, "price"), "'NaN' is not a finite number",
    ),
    "nan price parquet": (_nan_price_parquet, ("catalog.parquet", 2, "price"), "nan is not a finite number"),
    "negative price": (
        lambda d: replace_csv(d, "catalog", "35.5", "-1"), ("catalog.csv", 2, "price"), "is negative",
    ),
    "price not a number": (
        lambda d: replace_csv(d, "catalog", "35.5", "$35"), ("catalog.csv", 2, "price"), "is not a number",
    ),
    "empty title": (
        lambda d: replace_csv(d, "catalog", "Oak lamp", "   "), ("catalog.csv", 4, "title"), "is empty",
    ),
    "empty user": (
        lambda d: replace_csv(d, "interactions", "u2,p3", ",p3"),
        ("interactions.csv", 3, "user_id"), "is empty",
    ),
    "non-utf8 text": (_non_utf8_description, ("catalog.csv", 3, "description"), "not valid UTF-8"),
    "duplicate product": (
        lambda d: replace_csv(d, "catalog", "p5,Spare mug", "p2,Spare mug"),
        ("catalog.csv", 5, "product_id"), "'p2' is a duplicate (first at row 2)",
    ),
    "bad timestamp": (
        lambda d: replace_csv(d, "interactions", "2024-01-03", "yesterday"),
        ("interactions.csv", 5, "timestamp"), "neither an ISO-8601 time nor an epoch number",
    ),
    "parquet that is csv": (_csv_named_parquet, ("judgments.parquet", None, None), "is not a Parquet file"),
    "broken jsonl line": (_broken_jsonl_line, ("judgments.jsonl", 3, None), "line 3 is not valid JSON"),
    "two formats": (_two_formats, ("judgments.csv", None, None), "keep exactly one file per table"),
    "unsupported extension": (_unsupported_extension, ("judgments.json", None, None), "not a supported"),
    "empty table": (_empty_table, ("judgments.csv", None, None), "has no data rows"),
    "ragged row": (_ragged_row, ("judgments.csv", 3, None), "has 4 fields but the header has 3"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_problem_is_reported_where_it_is(tmp_path: Path, case: str) -> None:
    break_it, where, message = BROKEN[case]
    directory = make_merchant(tmp_path)
    break_it(directory)
    problems = validate_merchant_dir(directory)
    assert len(problems) == 1, [str(p) for p in problems]
    assert (problems[0].file, problems[0].row, problems[0].field) == where
    assert message in problems[0].message
    with pytest.raises(DataValidationError) as raised:
        load_merchant(directory)
    assert raised.value.problems == problems
    assert str(problems[0]) in str(raised.value)


def test_missing_or_non_directory(tmp_path: Path) -> None:
    assert "does not exist" in validate_merchant_dir(tmp_path / "nowhere")[0].message
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in validate_merchant_dir(tmp_path / "file")[0].message


def test_jsonl_that_is_really_csv_is_one_problem(tmp_path: Path) -> None:
    directory = make_merchant(tmp_path)
    (directory / "judgments.csv").rename(directory / "judgments.jsonl")
    problems = validate_merchant_dir(directory)
    assert [(p.file, p.row) for p in problems] == [("judgments.jsonl", None)]
    assert "is not JSON Lines" in problems[0].message and "line 1" in problems[0].message


def test_a_malformed_catalog_row_does_not_flood_unknown_product_problems(tmp_path: Path) -> None:
    directory = make_merchant(tmp_path)
    replace_csv(directory, "catalog", "p3,Blue tent", "p3,Blue,tent")
    problems = validate_merchant_dir(directory)
    assert located(problems) == {("catalog.csv", 3, None)}


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    directory = make_merchant(tmp_path)
    replace_csv(directory, "catalog", "35.5", "NaN")
    replace_csv(directory, "catalog", "p5,Spare mug", "p1,Spare mug")
    replace_csv(directory, "interactions", "click", "clik")
    replace_csv(directory, "interactions", "tent,5", "tent,9")
    replace_csv(directory, "judgments", "warm scarf,p2", "warm scarf,p7")
    problems = validate_merchant_dir(directory)
    assert located(problems) == {
        ("catalog.csv", 2, "price"),
        ("catalog.csv", 5, "product_id"),
        ("interactions.csv", 1, "label"),
        ("interactions.csv", 3, "rating"),
        ("judgments.csv", 2, "product_id"),
    }
    with pytest.raises(DataValidationError) as raised:
        load_merchant(directory)
    assert len(raised.value.problems) == 5
    assert "5 problems" in str(raised.value)


def test_error_message_lists_fifty_and_counts_the_rest(tmp_path: Path) -> None:
    directory = tmp_path / "shop"
    write_table(directory, "catalog", [{"product_id": "p1", "title": "Mug"}])
    write_table(directory, "judgments", [{"query": "mug", "product_id": "p1", "label": 9}] * 60)
    with pytest.raises(DataValidationError) as raised:
        load_merchant(directory)
    assert len(raised.value.problems) == 60
    assert "row 60" not in str(raised.value) and "... and 10 more" in str(raised.value)


# --------------------------------------------------------------------------- examples
@pytest.fixture
def merchant(tmp_path: Path) -> MerchantData:
    return load_merchant(make_merchant(tmp_path))


def test_product_text_joins_present_parts() -> None:
    text = product_text("Kettle", category="kitchen", brand="", description="Steel.")
    assert text == "Kettle | kitchen | Steel."


def test_contexts_come_from_query_then_history_then_nothing(merchant: MerchantData) -> None:
    ctr = [e for e in build_examples(merchant, history_length=2) if e.task == "ctr"]
    # u1 by time: p1 (09:00), p2 (10:00), p3 (next day), p4 (day after); most recent first.
    assert [e.context for e in ctr] == [
        "Red wool scarf",  # row 1 (p2): one earlier product
        "",  # row 2 (p1): u1's first interaction
        "tent",  # row 3: u2's search
        "Steel kettle ; Red wool scarf",  # row 4 (p3)
        "Blue tent ; Steel kettle",  # row 5 (p4): only the last two
    ]
    assert [e.group for e in ctr] == ["u1", "u1", "u2", "u1", "u1"]
    assert [e.product_id for e in ctr] == ["p2", "p1", "p3", "p3", "p4"]
    assert ctr[0].product == "Steel kettle | kitchen"
    assert ctr[2].product == "Blue tent | outdoor | Camp | Sleeps two."
    assert all(e.context == "" for e in build_examples(merchant, history_length=0) if e.group == "u1")


def test_history_without_timestamps_follows_file_order(tmp_path: Path) -> None:
    directory = tmp_path / "shop"
    write_table(directory, "catalog", CATALOG)
    untimed = [{k: v for k, v in row.items() if k != "timestamp"} for row in INTERACTIONS]
    write_table(directory, "interactions", untimed)
    contexts = [e.context for e in build_examples(load_merchant(directory), tasks=("ctr",))]
    assert contexts[1] == "Steel kettle" and contexts[3] == "Red wool scarf ; Steel kettle"


def test_targets_follow_conversion_label(merchant: MerchantData) -> None:
    def ctr_targets(conversion: str) -> list[float]:
        examples = build_examples(merchant, conversion_label=conversion)
        return [e.target for e in examples if e.task == "ctr"]

    assert ctr_targets("purchase") == [0.0, 0.0, 1.0, 1.0, 0.0]
    assert ctr_targets("click") == [1.0, 0.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="conversion_label"):
        build_examples(merchant, conversion_label="view")


def test_ratings_and_relevance_examples(merchant: MerchantData) -> None:
    examples = build_examples(merchant)
    ratings = [e for e in examples if e.task == "rating"]
    assert [(e.product_id, e.target, e.context) for e in ratings] == [
        ("p3", 5.0, "tent"),
        ("p3", 4.0, "Steel kettle ; Red wool scarf"),
    ]
    relevance = [e for e in examples if e.task == "relevance"]
    assert [(e.context, e.group, e.product_id, e.target) for e in relevance] == [
        ("warm scarf", "warm scarf", "p1", 3.0),
        ("warm scarf", "warm scarf", "p2", 0.0),
        ("kettle", "kettle", "p2", 2.0),
    ]
    assert relevance[0].product == "Red wool scarf | apparel | Acme | Warm."
    assert {e.task for e in build_examples(merchant, tasks=("relevance",))} == {"relevance"}
    with pytest.raises(ValueError, match="tasks"):
        build_examples(merchant, tasks=("fraud",))


# --------------------------------------------------------------------------- splits
def _examples(count: int) -> list[Example]:
    return [
        Example("ctr", "", f"item {i}", float(i % 2), group=f"u{i % 7}", product_id=f"p{i}")
        for i in range(count)
    ]


def test_split_is_deterministic_disjoint_and_complete() -> None:
    examples = _examples(400)
    train, test = split_examples(examples, test_fraction=0.25, seed=3)
    assert (train, test) == split_examples(examples, test_fraction=0.25, seed=3)
    assert len(train) + len(test) == 400
    assert {e.product_id for e in train}.isdisjoint({e.product_id for e in test})
    assert 70 <= len(test) <= 130
    assert split_examples(examples, test_fraction=0.25, seed=4)[1] != test


def test_split_side_of_a_record_never_depends_on_the_others() -> None:
    examples = _examples(200)
    _, test = split_examples(examples, test_fraction=0.3, seed=0)
    _, test_of_subset = split_examples(examples[::-1][:120], test_fraction=0.3, seed=0)
    kept = {e.product_id for e in examples[80:]}
    assert {e.product_id for e in test_of_subset} == {e.product_id for e in test} & kept


def test_split_is_pinned_across_machines() -> None:
    # sha256-based, so these sides are the same on every machine and Python hash seed.
    _, test = split_examples(_examples(12), test_fraction=0.5, seed=0)
    assert [e.product_id for e in test] == PINNED_TEST_IDS


def test_split_separates_repeated_records() -> None:
    repeated = [Example("ctr", "", "mug", 1.0, group="u1", product_id="p1")] * 40
    train, test = split_examples(repeated, test_fraction=0.5, seed=0)
    assert train and test


PINNED_TEST_IDS = ["p1", "p2", "p4", "p6", "p10", "p11"]


def test_split_windows_make_k_folds() -> None:
    examples = _examples(300)
    ids = lambda part: {e.product_id for e in part}  # noqa: E731
    folds = [split_examples(examples, test_fraction=0.25, seed=2, offset=k / 4)[1] for k in range(4)]
    # Disjoint, and together every record exactly once.
    assert sum(len(f) for f in folds) == len(examples)
    assert set().union(*map(ids, folds)) == ids(examples)
    # Offset 0 is the plain split; a fold's training set is every other fold.
    assert folds[0] == split_examples(examples, test_fraction=0.25, seed=2)[1]
    train, _ = split_examples(examples, test_fraction=0.25, seed=2, offset=0.5)
    assert ids(train) == ids(folds[0]) | ids(folds[1]) | ids(folds[3])
    # A window past 1 wraps round to the start of the range.
    _, wrapped = split_examples(examples, test_fraction=0.5, seed=2, offset=0.75)
    assert ids(wrapped) == ids(folds[3]) | ids(folds[0])


@pytest.mark.parametrize("offset", [-0.1, 1.0, float("nan")])
def test_split_refuses_an_offset_outside_the_range(offset: float) -> None:
    with pytest.raises(ValueError, match="offset"):
        split_examples(_examples(10), test_fraction=0.5, seed=0, offset=offset)


def test_split_holds_out_whole_queries() -> None:
    judgments = [Example("relevance", f"q{i % 23}", f"item {i}", float(i % 4), group=f"q{i % 23}",
                         product_id=f"p{i}") for i in range(230)]
    train, test = split_examples(judgments, test_fraction=0.3, seed=1)
    assert train and test
    assert {e.group for e in train}.isdisjoint({e.group for e in test})
    assert all(sum(e.group == q for e in test) == 10 for q in {e.group for e in test})


def test_split_keeps_a_rows_click_and_rating_together(merchant: MerchantData) -> None:
    examples = build_examples(merchant, tasks=("ctr", "rating"))
    rated = {e.record for e in examples if e.task == "rating"}
    assert rated, "the fixture must have rated interactions"
    for seed in range(20):
        train, test = split_examples(examples, test_fraction=0.5, seed=seed)
        assert {e.record for e in train}.isdisjoint({e.record for e in test})
        assert len(train) + len(test) == len(examples)


# --------------------------------------------------------------------------- writing
@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_write_then_load_round_trips(merchant: MerchantData, tmp_path: Path, fmt: Any) -> None:
    out = tmp_path / "out"
    path = write_merchant(merchant, out, file_format=fmt)
    assert path == out / "shop" and sorted(p.name for p in path.iterdir()) == sorted(
        f"{t}.{fmt}" for t in ("catalog", "interactions", "judgments")
    )
    again = load_merchant(path)
    pd.testing.assert_frame_equal(again.catalog, merchant.catalog)
    assert again.interactions is not None and merchant.interactions is not None
    pd.testing.assert_frame_equal(again.interactions, merchant.interactions)
    assert again.judgments is not None and merchant.judgments is not None
    pd.testing.assert_frame_equal(again.judgments, merchant.judgments)


def test_write_is_atomic_and_refuses_to_clobber(merchant: MerchantData, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_merchant(merchant, out)
    with pytest.raises(FileExistsError):
        write_merchant(merchant, out)
    broken_judgments = pd.DataFrame({"query": ["mug"], "product_id": ["nope"], "label": [1]})
    broken = MerchantData("broken", merchant.catalog, None, broken_judgments)
    with pytest.raises(DataValidationError, match="'nope' is not in catalog.parquet"):
        write_merchant(broken, out)
    assert sorted(p.name for p in out.iterdir()) == ["shop"]  # no partial merchant, no temp dir
    replaced = MerchantData("shop", merchant.catalog, None, merchant.judgments)
    write_merchant(replaced, out, overwrite=True)
    assert sorted(p.name for p in (out / "shop").iterdir()) == ["catalog.parquet", "judgments.parquet"]
    assert sorted(p.name for p in out.iterdir()) == ["shop"]


def test_overwrite_keeps_a_nodes_privacy_state(merchant: MerchantData, tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = write_merchant(merchant, out, file_format="csv")
    (path / ".fedshop").mkdir()
    (path / ".fedshop" / "privacy.json").write_text("spent")
    (path / "README.txt").write_text("notes")
    write_merchant(merchant, out, file_format="parquet", overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == [
        ".fedshop", "README.txt", "catalog.parquet", "interactions.parquet", "judgments.parquet"
    ]
    assert (path / ".fedshop" / "privacy.json").read_text() == "spent"
    assert sorted(p.name for p in out.iterdir()) == ["shop"]


def test_check_output_dir_refuses_non_empty(tmp_path: Path) -> None:
    assert check_output_dir(tmp_path / "new", overwrite=False).is_dir()
    (tmp_path / "new" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        check_output_dir(tmp_path / "new", overwrite=False)
    assert check_output_dir(tmp_path / "new", overwrite=True).is_dir()
