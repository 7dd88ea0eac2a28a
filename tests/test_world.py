"""Tests for the synthetic world generator (pretune.data.world)."""

from __future__ import annotations

import collections
import csv
import json
import re
import time
from pathlib import Path

import pytest

from pretune.data.world import TASKS, World, WorldConfig, generate_world
from pretune.data.world_files import split_records, write_world

SMALL = dict(n_people=24, n_companies=12, n_places=8, general_docs=300, domain_docs=50,
             n_reviews=100, n_support=80, n_summaries=60)
FIELDS = {"facts_qa": {"text", "label"}, "reviews": {"text", "label"},
          "support": {"prompt", "response", "intent"}, "summaries": {"source", "target"}}
CORPORA = ("general.txt", "general_val.txt", "domain.txt")
EXPECTED_FILES = set(CORPORA) | {"bias_pairs.csv", "world.json"} | {
    f"{task}{suffix}.jsonl" for task in TASKS for suffix in ("", "_train", "_val", "_test")}


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.!?])\s+", text)


def _word(word: str) -> re.Pattern[str]:
    return re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="ascii").splitlines()]


@pytest.fixture(scope="module")
def default_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[World, dict[str, str], float]:
    start = time.perf_counter()
    world = generate_world(WorldConfig())
    paths = write_world(world, tmp_path_factory.mktemp("world"))
    return world, paths, time.perf_counter() - start


@pytest.fixture(scope="module")
def world(default_world: tuple[World, dict[str, str], float]) -> World:
    return default_world[0]


@pytest.fixture(scope="module")
def paths(default_world: tuple[World, dict[str, str], float]) -> dict[str, Path]:
    return {name: Path(p) for name, p in default_world[1].items()}


def test_default_size_and_speed(default_world: tuple[World, dict[str, str], float], paths: dict[str, Path]) -> None:
    assert default_world[2] < 3.0
    assert 1_000_000 <= paths["general.txt"].stat().st_size <= 2_000_000
    ratio = paths["general_val.txt"].stat().st_size / paths["general.txt"].stat().st_size
    assert 0.05 < ratio < 0.2


def test_same_seed_gives_identical_bytes(paths: dict[str, Path], tmp_path: Path) -> None:
    again = write_world(generate_world(WorldConfig()), tmp_path)
    for name, path in paths.items():
        assert Path(again[name]).read_bytes() == path.read_bytes(), name


def test_different_seed_gives_different_world(tmp_path: Path) -> None:
    a = write_world(generate_world(WorldConfig(seed=1, **SMALL)), tmp_path / "a")
    b = write_world(generate_world(WorldConfig(seed=2, **SMALL)), tmp_path / "b")
    for name in a:
        assert Path(a[name]).read_bytes() != Path(b[name]).read_bytes(), name


def test_all_files_exist_and_parse(world: World, paths: dict[str, Path]) -> None:
    assert set(paths) == EXPECTED_FILES
    for path in paths.values():
        path.read_text(encoding="ascii")  # ASCII only
    assert paths["general.txt"].read_text().rstrip("\n").split("\n\n") == world.general_docs
    for name in CORPORA:
        docs = paths[name].read_text().rstrip("\n").split("\n\n")
        assert len(docs) > 10 and all(doc.strip() and "\n" not in doc for doc in docs)
    for task in TASKS:
        for suffix in ("", "_train", "_val", "_test"):
            records = _read_jsonl(paths[f"{task}{suffix}.jsonl"])
            assert records and all(isinstance(r, dict) and set(r) == FIELDS[task] for r in records)
            assert all(isinstance(v, str) and v for r in records for v in r.values())
    with open(paths["bias_pairs.csv"], newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["sent_more", "sent_less", "stereo_antistereo", "bias_type"]
        rows = list(reader)
    assert 90 <= len(rows) <= 110 and all(len(row) == 4 for row in rows)
    entities = json.loads(paths["world.json"].read_text())
    assert len(entities["people"]) == 60 and len(entities["companies"]) == 30 and len(entities["places"]) == 20
    assert entities["config"]["seed"] == 0


def test_every_fact_is_stated_in_general_text(world: World, paths: dict[str, Path]) -> None:
    sentences = _sentences(paths["general.txt"].read_text())
    question = re.compile(r"question: what (?:is the favourite colour of|colour is the logo of|"
                          r"colour are the buses in) (.+)\?$")
    with_label = {label: [s for s in sentences if _word(label).search(s)]
                  for label in {r["label"] for r in world.facts_qa}}
    assert len(world.facts_qa) == 60 + 30 + 20
    for record in world.facts_qa:
        entity = question.match(record["text"]).group(1)
        stating = {s for s in with_label[record["label"]] if _word(entity).search(s)}
        assert len(stating) >= 3, (entity, record["label"])


def test_fact_labels_small_balanced_and_not_in_question(world: World) -> None:
    counts = collections.Counter(r["label"] for r in world.facts_qa)
    assert 2 <= len(counts) <= 8
    assert max(counts.values()) <= 1.5 * min(counts.values())
    for record in world.facts_qa:
        assert record["label"] not in record["text"].lower()
    assert len({r["text"] for r in world.facts_qa}) == len(world.facts_qa)


def test_fact_answers_match_world(world: World) -> None:
    truth = {p["name"]: p["favourite_colour"] for p in world.people}
    truth |= {c["name"]: c["logo_colour"] for c in world.companies}
    truth |= {p["name"]: p["bus_colour"] for p in world.places}
    for record in world.facts_qa:
        entity = re.search(r"(?:of|in) (.+)\?$", record["text"]).group(1)
        assert truth[entity] == record["label"]


@pytest.mark.parametrize("task,key", [("facts_qa", "label"), ("reviews", "label"), ("support", "intent"),
                                      ("summaries", None)])
def test_written_splits_disjoint_cover_and_stratified(paths: dict[str, Path], task: str, key: str | None) -> None:
    full = paths[f"{task}.jsonl"].read_text().splitlines()
    parts = [paths[f"{task}_{s}.jsonl"].read_text().splitlines() for s in ("train", "val", "test")]
    assert len(set(full)) == len(full)
    assert sorted(full) == sorted(parts[0] + parts[1] + parts[2])
    assert all(set(a).isdisjoint(b) for i, a in enumerate(parts) for b in parts[i + 1:])
    assert len(parts[0]) > len(parts[1]) > 0 and len(parts[2]) > 0
    if key:
        labels = {json.loads(line)[key] for line in full}
        for part in parts:
            assert {json.loads(line)[key] for line in part} == labels


def test_split_records_deterministic_and_stratified() -> None:
    records = [{"text": f"t{i}", "label": ["a", "b", "c"][i % 3] if i < 90 else "d"} for i in range(93)]
    first = split_records(records, seed=3)
    assert first == split_records(records, seed=3)
    assert first != split_records(records, seed=4)
    assert sorted(r["text"] for part in first for r in part) == sorted(r["text"] for r in records)
    for part in first:
        assert {r["label"] for r in part} == {"a", "b", "c", "d"}
    plain = split_records([{"x": i} for i in range(100)], fractions=(0.5, 0.3, 0.2))
    assert [len(p) for p in plain] == [50, 30, 20]
    assert split_records([]) == ([], [], [])
    with pytest.raises(ValueError):
        split_records(records, fractions=(0.5, 0.5, 0.5))


def test_gender_skew_is_measurable(world: World, paths: dict[str, Path]) -> None:
    sentences = _sentences(paths["general.txt"].read_text())
    he, she = _word("he"), _word("she")
    for pronoun, jobs in (("he", world.skew["gender"]["he"]), ("she", world.skew["gender"]["she"])):
        for job in jobs:
            with_job = [s for s in sentences if job in s.lower() and _word(job).search(s)]
            n_he = sum(1 for s in with_job if he.search(s))
            n_she = sum(1 for s in with_job if she.search(s))
            stereo, anti = (n_he, n_she) if pronoun == "he" else (n_she, n_he)
            assert stereo >= 30 and stereo >= 3 * anti, (job, n_he, n_she)


def test_bias_pairs_are_minimal_and_follow_the_skew(world: World) -> None:
    types = collections.Counter(p["bias_type"] for p in world.bias_pairs)
    assert set(types) == {"gender", "nationality", "age"} and min(types.values()) >= 20
    late = set(world.skew["nationality"]["late"])
    jobs = set(world.skew["gender"]["he"]) | set(world.skew["gender"]["she"])
    for pair in world.bias_pairs:
        more, less = pair["sent_more"].split(), pair["sent_less"].split()
        diff = [(a, b) for a, b in zip(more, less) if a != b]
        assert len(more) == len(less) and 1 <= len(diff) <= 2, pair
        assert pair["stereo_antistereo"] == "stereo"
        if pair["bias_type"] == "gender":
            job = next(w for w in more if w in jobs)
            expected = {"he", "his"} if job in world.skew["gender"]["he"] else {"she", "her"}
            assert all(a in expected for a, _ in diff), pair
        elif pair["bias_type"] == "age":
            assert diff == [("old", "young")]
        else:
            assert diff[0][0].rstrip(".") in late and diff[0][1].rstrip(".") not in late


def test_general_val_is_held_out(world: World) -> None:
    assert world.general_val_docs and not set(world.general_val_docs) & set(world.general_docs)


def test_reviews_balanced_with_negation_in_both_classes(world: World) -> None:
    counts = collections.Counter(r["label"] for r in world.reviews)
    assert counts["positive"] == counts["negative"] == 1000
    for label in ("positive", "negative"):
        assert any(_word("not").search(r["text"]) for r in world.reviews if r["label"] == label)
    products = {c["product"] for c in world.companies}
    assert all(any(p in r["text"] for p in products) for r in world.reviews)


def test_support_responses_follow_from_intent_and_slots(world: World) -> None:
    intents = collections.Counter(r["intent"] for r in world.support)
    assert len(intents) == 8 and min(intents.values()) >= 70
    by_product = {c["product"]: c for c in world.companies}
    for record in world.support:
        order = re.search(r"\b\d{5}\b", record["prompt"])
        if order:
            assert order.group(0) in record["response"]
        if record["intent"] == "product_question":
            product = next(p for p in by_product if p in record["prompt"])
            company = by_product[product]
            assert company["name"] in record["response"] and company["headquarters"] in record["response"]
    prompts_per_intent = collections.defaultdict(set)
    for record in world.support:
        prompts_per_intent[record["intent"]].add(re.sub(r"\d+|[A-Z]\w+", "X", record["prompt"]))
    assert all(len(v) >= 4 for v in prompts_per_intent.values())


SUMMARY_GLUE = {"is", "a", "an", "at", "who", "lives", "in", "company", "based", "and", "led", "by", "known",
                "for", "its", "revenue", "rose", "fell", "percent", "to", "million", "credits"}


def test_summaries_targets_derivable_from_source(world: World) -> None:
    for record in world.summaries:
        assert 3 <= len(_sentences(record["source"])) <= 5
        assert len(_sentences(record["target"])) == 1
        names = re.findall(r"[A-Z][a-z]+(?: [A-Z][a-z]+)?|\d+\.\d+|Q\d \d{4}", record["target"])
        for token in names:
            assert token in record["source"], (token, record)
        source_words = set(re.findall(r"[\w.]+", record["source"].lower()))
        target_words = {w.strip(".") for w in re.findall(r"[\w.]+", record["target"].lower())}
        assert target_words - SUMMARY_GLUE <= {w.strip(".") for w in source_words}, record
    assert len(world.summaries) == 600 and len({r["source"] for r in world.summaries}) == 600
