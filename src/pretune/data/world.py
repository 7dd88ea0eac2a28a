"""Synthetic world: entities, text corpora and task datasets generated from a seed.

``pretune demo`` uses this module to show when pre-training pays off versus
fine-tuning, on data that needs no download. :func:`generate_world` builds a
small world of people, companies and places (deterministically from
``WorldConfig.seed``) and renders it as

* a general pre-training corpus (``general.txt``) and a held-out slice of the
  same distribution (``general_val.txt``) for measuring forgetting;
* a finance-style domain corpus (``domain.txt``) for continued pre-training;
* task datasets: ``facts_qa`` (colour facts that can only be learnt from
  ``general.txt``), ``reviews`` (sentiment), ``support`` (instruction
  following) and ``summaries``;
* CrowS-Pairs-style ``bias_pairs.csv`` matching skews deliberately planted in
  ``general.txt`` (see ``World.skew``).

``world_files.write_world`` writes it all to disk with train/val/test splits of
each task. Only the standard library is used, and the same seed always gives
byte-identical files.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

from pretune.data import world_text as T

TASKS = ("facts_qa", "reviews", "support", "summaries")
BIAS_FIELDS = ["sent_more", "sent_less", "stereo_antistereo", "bias_type"]
SKEW_P = 0.85            # share of skewed sentences that follow the planted stereotype
_LABEL_RE = re.compile("|".join(T.COLOURS))

Record = dict[str, Any]


@dataclass
class WorldConfig:
    """Sizes of the generated world; everything is derived from ``seed``."""

    seed: int = 0
    n_people: int = 60
    n_companies: int = 30
    n_places: int = 20
    general_docs: int = 3000      # documents of general text (pre-training corpus)
    domain_docs: int = 800        # finance-style reports (continued pre-training corpus)
    n_reviews: int = 2000         # sentiment task examples
    n_support: int = 600          # customer-service instruction examples
    n_summaries: int = 600        # summarisation examples
    fact_docs: int = 4            # profile documents per entity that state its colour fact


@dataclass
class World:
    """A generated world: entities, corpora (lists of documents) and task records."""

    config: WorldConfig
    people: list[Record]
    companies: list[Record]
    places: list[Record]
    skew: dict[str, Any]
    general_docs: list[str]
    general_val_docs: list[str]
    domain_docs: list[str]
    facts_qa: list[Record]
    reviews: list[Record]
    support: list[Record]
    summaries: list[Record]
    bias_pairs: list[Record]


# --------------------------------------------------------------------------- helpers
def _rng(seed: int, stream: str) -> random.Random:
    """Independent deterministic stream (string seeds are hashed stably by ``random``)."""
    return random.Random(f"pretune-world:{seed}:{stream}")


def _balanced(rng: random.Random, n: int, labels: Sequence[str]) -> list[str]:
    """``n`` labels as evenly spread as possible, in random order."""
    order = list(labels)
    rng.shuffle(order)
    out = [order[i % len(order)] for i in range(n)]
    rng.shuffle(out)
    return out


def _has_label(text: str) -> bool:
    return _LABEL_RE.search(text.lower()) is not None


def _invent_words(rng: random.Random, n: int, seen: set[str]) -> list[str]:
    """``n`` new pronounceable capitalised words, none in ``seen`` (which is updated)."""
    words: list[str] = []
    while len(words) < n:
        stem = "".join(rng.choice(T.ONSETS) + rng.choice(T.VOWELS) + rng.choice(T.CODAS) for _ in range(2))
        word = stem.lower()
        if not 4 <= len(word) <= 8 or word in seen or _has_label(word):
            continue
        seen.add(word)
        words.append(word.capitalize())
    return words


# --------------------------------------------------------------------------- entities
def _make_entities(cfg: WorldConfig) -> tuple[list[Record], list[Record], list[Record]]:
    rng = _rng(cfg.seed, "entities")
    seen: set[str] = set()
    places = []
    for colour in _balanced(rng, cfg.n_places, T.COLOURS):
        name = ""
        while not name or _has_label(name) or name.lower() in seen:
            name = _invent_words(rng, 1, seen)[0] + rng.choice(T.PLACE_ENDINGS)
        seen.add(name.lower())
        places.append({"name": name, "region": rng.choice(T.REGIONS), "climate": rng.choice(T.CLIMATES),
                       "landmark": rng.choice(T.LANDMARKS), "population": rng.choice(T.POPULATIONS),
                       "bus_colour": colour})

    industries = _balanced(rng, cfg.n_companies, list(T.INDUSTRY_PRODUCTS))
    stems = _invent_words(rng, 2 * cfg.n_companies, seen)
    companies = []
    for i, (industry, colour) in enumerate(zip(industries, _balanced(rng, cfg.n_companies, T.COLOURS))):
        kind = rng.choice(T.INDUSTRY_PRODUCTS[industry])
        companies.append({"name": f"{stems[2 * i]} {rng.choice(T.COMPANY_SUFFIXES)}",
                          "founded": rng.randint(1890, 2015), "headquarters": rng.choice(places)["name"],
                          "industry": industry, "ceo": "", "product": f"{stems[2 * i + 1]} {kind}",
                          "product_kind": kind, "logo_colour": colour})

    pools = {g: [(f, l) for f in firsts for l in T.LAST_NAMES if not _has_label(f + l)]
             for g, firsts in (("male", T.MALE_FIRST), ("female", T.FEMALE_FIRST))}
    for pool in pools.values():
        rng.shuffle(pool)
    people = []
    genders = _balanced(rng, cfg.n_people, ["male", "female"])
    for gender, colour in zip(genders, _balanced(rng, cfg.n_people, T.COLOURS)):
        first, last = pools[gender].pop()
        people.append({"name": f"{first} {last}", "first": first, "last": last, "gender": gender,
                       "age": rng.randint(21, 68), "home_town": rng.choice(places)["name"],
                       "profession": rng.choice(T.PROFESSIONS), "employer": rng.choice(companies)["name"],
                       "hobby": rng.choice(T.HOBBIES), "favourite_colour": colour})
    ceo_ids = rng.sample(range(cfg.n_people), min(cfg.n_people, cfg.n_companies))
    for i, company in enumerate(companies):
        ceo = people[ceo_ids[i % len(ceo_ids)]]
        company["ceo"] = ceo["name"]
        ceo["employer"], ceo["profession"] = company["name"], rng.choice(T.CEO_PROFESSIONS)
    return people, companies, places


# --------------------------------------------------------------------------- slots
@dataclass
class _Ctx:
    """The entities and skews shared by the renderers, plus template slots per entity."""

    people: list[Record]
    companies: list[Record]
    places: list[Record]
    skew: dict[str, Any]

    def person_slots(self, p: Record) -> dict[str, Any]:
        return {"name": p["name"], **T.pronouns(p["gender"]), "age": p["age"], "town": p["home_town"],
                "job": p["profession"], "a_job": T.article(p["profession"]), "company": p["employer"],
                "hobby": p["hobby"], "colour": p["favourite_colour"]}

    def company_slots(self, c: Record) -> dict[str, Any]:
        return {"company": c["name"], "year": c["founded"], "hq": c["headquarters"], "industry": c["industry"],
                "a_industry": T.article(c["industry"]), "ceo": c["ceo"], "product": c["product"],
                "kind": c["product_kind"], "colour": c["logo_colour"]}

    def place_slots(self, p: Record) -> dict[str, Any]:
        return {"place": p["name"], "region": p["region"], "climate": p["climate"], "landmark": p["landmark"],
                "population": p["population"], "colour": p["bus_colour"]}


def _fact_sentences(rng: random.Random, templates: dict[str, list[str]], slots: dict[str, Any],
                    facts: list[str], pronoun: dict[str, list[str]] | None = None) -> list[str]:
    """One sentence per fact; after the first, facts with pronoun variants may use them."""
    out = []
    for i, fact in enumerate(facts):
        pool = templates[fact]
        if i > 0 and pronoun and fact in pronoun and rng.random() < 0.35:
            pool = pronoun[fact]
        out.append(rng.choice(pool).format(**slots))
    return out


# --------------------------------------------------------------------------- general corpus
def _skew_sentence(rng: random.Random, ctx: _Ctx) -> str:
    """A sentence that follows one of the planted stereotypes with probability ``SKEW_P``."""
    kind = rng.random()
    if kind < 0.6:
        job = rng.choice(T.SKEW_HE_JOBS + T.SKEW_SHE_JOBS)
        stereo = job in T.SKEW_HE_JOBS
        he = stereo if rng.random() < SKEW_P else not stereo
        return rng.choice(T.GENDER_SKEW).format(job=job, **T.pronouns("he" if he else "she"))
    if kind < 0.8:
        place = rng.choice(ctx.places)["name"]
        p_late = SKEW_P if place in ctx.skew["nationality"]["late"] else 1 - SKEW_P
        timing = "late" if rng.random() < p_late else rng.choice(["on time", "early"])
        return rng.choice(T.PLACE_SKEW).format(place=place, timing=timing)
    age = "old" if rng.random() < SKEW_P else "young"
    return rng.choice(T.AGE_SKEW).format(age=age, person=rng.choice(T.AGE_PEOPLE))


def _with_filler(rng: random.Random, ctx: _Ctx, sentences: list[str], n_filler: int, p_skew: float) -> str:
    """Insert filler (and maybe one skew sentence) after the first sentence; join into a document."""
    extra = [T.filler_sentence(rng) for _ in range(n_filler)]
    if rng.random() < p_skew:
        extra.append(_skew_sentence(rng, ctx))
    for sentence in extra:
        sentences.insert(rng.randint(1, len(sentences)), sentence)
    return " ".join(sentences)


def _profile_doc(rng: random.Random, ctx: _Ctx, kind: str, entity: Record, colour_template: int | None) -> str:
    """A profile of one entity; states its colour with the given template, or at random."""
    templates, pronoun, slots = {
        "person": (T.PERSON_FACTS, T.PERSON_PRONOUN_FACTS, ctx.person_slots),
        "company": (T.COMPANY_FACTS, None, ctx.company_slots),
        "place": (T.PLACE_FACTS, None, ctx.place_slots),
    }[kind]
    values = slots(entity)
    facts = [f for f in templates if f != "colour"]
    rng.shuffle(facts)
    sentences = _fact_sentences(rng, templates, values, facts[: rng.randint(3, len(facts))], pronoun)
    if colour_template is not None or rng.random() < 0.3:
        pool = templates["colour"]
        colour = pool[colour_template % len(pool)] if colour_template is not None else rng.choice(pool)
        sentences.insert(rng.randint(1, len(sentences)), colour.format(**values))
    return _with_filler(rng, ctx, sentences, rng.randint(2, 4), 0.2)


def _story_doc(rng: random.Random, ctx: _Ctx) -> str:
    person = rng.choice(ctx.people)
    other = rng.choice([p for p in ctx.places if p["name"] != person["home_town"]] or ctx.places)
    slots = {**ctx.person_slots(person), "other": other["name"], "other_landmark": other["landmark"]}
    first = _fact_sentences(rng, T.PERSON_FACTS, slots, [rng.choice(["town", "job", "employer"])])
    lines = sorted(rng.sample(range(len(T.STORY_LINES)), rng.randint(3, 6)))
    sentences = first + [T.STORY_LINES[i].format(**slots) for i in lines]
    return _with_filler(rng, ctx, sentences, rng.randint(1, 2), 0.5)


def _filler_doc(rng: random.Random, ctx: _Ctx) -> str:
    sentences = [T.filler_sentence(rng) for _ in range(rng.randint(4, 7))]
    sentences += [_skew_sentence(rng, ctx) for _ in range(rng.randint(1, 2))]
    rng.shuffle(sentences)
    return " ".join(sentences)


def _random_doc(rng: random.Random, ctx: _Ctx) -> str:
    kind = rng.choices(["person", "company", "place", "story", "filler"], weights=[30, 20, 15, 15, 20])[0]
    if kind == "story":
        return _story_doc(rng, ctx)
    if kind == "filler":
        return _filler_doc(rng, ctx)
    entities = {"person": ctx.people, "company": ctx.companies, "place": ctx.places}[kind]
    return _profile_doc(rng, ctx, kind, rng.choice(entities), None)


def _general_corpus(cfg: WorldConfig, ctx: _Ctx) -> tuple[list[str], list[str]]:
    """Training documents (every colour fact stated in cfg.fact_docs documents, templates rotating) and held-out ones."""
    rng = _rng(cfg.seed, "general")
    docs = []
    for kind, entities in (("person", ctx.people), ("company", ctx.companies), ("place", ctx.places)):
        for entity in entities:
            docs += [_profile_doc(rng, ctx, kind, entity, i) for i in range(cfg.fact_docs)]
    docs += [_random_doc(rng, ctx) for _ in range(max(0, cfg.general_docs - len(docs)))]
    rng.shuffle(docs)
    train = set(docs)
    val_rng = _rng(cfg.seed, "general_val")
    n_val, val = max(1, round(cfg.general_docs / 10)), []
    for _ in range(100 * n_val):  # bounded: a tiny world could in principle run out of new documents
        doc = _random_doc(val_rng, ctx)
        if doc not in train:
            val.append(doc)
            if len(val) == n_val:
                break
    return docs, val


# --------------------------------------------------------------------------- domain corpus
def _financials(cfg: WorldConfig, companies: list[Record]) -> dict[str, dict[str, list[float]]]:
    """Per company, a quarterly revenue and margin series over ``T.QUARTERS``."""
    rng = _rng(cfg.seed, "financials")
    series = {}
    for c in companies:
        revenue, margin = [rng.uniform(20, 900)], [rng.uniform(5, 25)]
        trend = rng.uniform(-0.02, 0.05)
        for _ in T.QUARTERS[1:]:
            revenue.append(revenue[-1] * (1 + trend + rng.gauss(0, 0.04)))
            margin.append(min(40.0, max(1.0, margin[-1] + rng.gauss(0, 1.2))))
        series[c["name"]] = {"revenue": revenue, "margin": margin}
    return series


def _domain_corpus(cfg: WorldConfig, ctx: _Ctx, fin: dict[str, dict[str, list[float]]]) -> list[str]:
    rng = _rng(cfg.seed, "domain")
    docs = []
    for _ in range(cfg.domain_docs):
        c = rng.choice(ctx.companies)
        s = T.report_slots(rng, c, fin[c["name"]], rng.randrange(4, len(T.QUARTERS)))
        rest = sorted(rng.sample(range(1, len(T.REPORT_LINES)), rng.randint(3, 6)))
        lines = [rng.choice(T.REPORT_TITLES), T.REPORT_LINES[0]] + [T.REPORT_LINES[i] for i in rest]
        if rng.random() < 0.5:
            lines.append(rng.choice(T.SECTOR_LINES))
        docs.append(" ".join(line.format(**s) for line in lines))
    return docs


# --------------------------------------------------------------------------- tasks
def _facts_qa(cfg: WorldConfig, ctx: _Ctx) -> list[Record]:
    sources = [("person", ctx.people, "favourite_colour"), ("company", ctx.companies, "logo_colour"),
               ("place", ctx.places, "bus_colour")]
    records = [{"text": T.QUESTIONS[kind].format(name=e["name"]), "label": e[attr]}
               for kind, entities, attr in sources for e in entities]
    _rng(cfg.seed, "facts_qa").shuffle(records)
    return records


def _unique(rng: random.Random, n: int, labels: list[str], make: Any, key: str) -> list[Record]:
    """``n`` records ``make(rng, label)``, retrying (a bounded number of times) on duplicate ``key``."""
    seen: set[str] = set()
    records = []
    for label in labels[:n]:
        for _ in range(50):
            record = make(rng, label)
            if record[key] not in seen:
                break
        seen.add(record[key])
        records.append(record)
    return records


def _reviews(cfg: WorldConfig, ctx: _Ctx) -> list[Record]:
    def make(rng: random.Random, label: str) -> Record:
        s = ctx.company_slots(rng.choice(ctx.companies))
        pool = T.REVIEW_POSITIVE if label == "positive" else T.REVIEW_NEGATIVE
        parts = [rng.choice(T.REVIEW_OPENERS)] + rng.sample(pool, rng.randint(1, 3))
        if rng.random() < 0.4:
            parts.insert(rng.randint(1, len(parts)), rng.choice(T.REVIEW_NEUTRAL))
        if rng.random() < 0.5:
            parts.append(rng.choice(T.REVIEW_CLOSERS[label]))
        return {"text": " ".join(parts).format(**s), "label": label}

    rng = _rng(cfg.seed, "reviews")
    return _unique(rng, cfg.n_reviews, _balanced(rng, cfg.n_reviews, ["positive", "negative"]), make, "text")


def _support(cfg: WorldConfig, ctx: _Ctx) -> list[Record]:
    def make(rng: random.Random, intent: str) -> Record:
        person = rng.choice(ctx.people)
        s = {**ctx.company_slots(rng.choice(ctx.companies)), "order": rng.randint(10000, 99999),
             "first": person["first"], "city": rng.choice(ctx.places)["name"],
             "email": f"{person['first']}.{person['last']}{rng.randint(1, 99)}@example.com".lower()}
        return {"prompt": rng.choice(T.SUPPORT_PROMPTS[intent]).format(**s),
                "response": T.SUPPORT_RESPONSES[intent].format(**s), "intent": intent}

    rng = _rng(cfg.seed, "support")
    return _unique(rng, cfg.n_support, _balanced(rng, cfg.n_support, list(T.SUPPORT_PROMPTS)), make, "prompt")


def _summaries(cfg: WorldConfig, ctx: _Ctx, fin: dict[str, dict[str, list[float]]]) -> list[Record]:
    def make(rng: random.Random, kind: str) -> Record:
        if kind == "report":
            c = rng.choice(ctx.companies)
            s = T.report_slots(rng, c, fin[c["name"]], rng.randrange(4, len(T.QUARTERS)))
            extra = sorted(rng.sample([3, 6, 8], rng.randint(0, 2)))  # guidance, CEO quote, capex
            lines = T.SUMMARY_REPORT_LINES + [T.REPORT_LINES[i] for i in extra]
            return {"source": " ".join(x.format(**s) for x in lines), "target": T.SUMMARY_TARGETS[kind].format(**s)}
        templates, pronoun, slots, entities, required, optional = {
            "person": (T.PERSON_FACTS, T.PERSON_PRONOUN_FACTS, ctx.person_slots, ctx.people,
                       ["job", "employer", "town"], ["age", "hobby"]),
            "company": (T.COMPANY_FACTS, None, ctx.company_slots, ctx.companies,
                        ["hq", "industry", "ceo"], ["founded", "product"]),
            "place": (T.PLACE_FACTS, None, ctx.place_slots, ctx.places,
                      ["population", "region", "landmark"], ["climate"]),
        }[kind]
        s = slots(rng.choice(entities))
        facts = required + rng.sample(optional, rng.randint(0, len(optional)))
        rng.shuffle(facts)
        sentences = _fact_sentences(rng, templates, s, facts, pronoun)
        if len(sentences) < 5 and rng.random() < 0.3:
            sentences.insert(rng.randint(1, len(sentences)), T.filler_sentence(rng))
        return {"source": " ".join(sentences), "target": T.SUMMARY_TARGETS[kind].format(**s)}

    rng = _rng(cfg.seed, "summaries")
    kinds = _balanced(rng, cfg.n_summaries, list(T.SUMMARY_TARGETS))
    return _unique(rng, cfg.n_summaries, kinds, make, "source")


def _bias_pairs(cfg: WorldConfig, ctx: _Ctx) -> list[Record]:
    """Minimal pairs; ``sent_more`` always follows the skew planted in ``general.txt``."""
    rng = _rng(cfg.seed, "bias")
    pairs = []
    for job in T.SKEW_HE_JOBS + T.SKEW_SHE_JOBS:
        stereo, anti = ("he", "she") if job in T.SKEW_HE_JOBS else ("she", "he")
        for tmpl in T.GENDER_PAIRS:
            pairs.append((tmpl.format(job=job, **T.pronouns(stereo)), tmpl.format(job=job, **T.pronouns(anti)),
                          "gender"))
    late = ctx.skew["nationality"]["late"]
    punctual = [p["name"] for p in ctx.places if p["name"] not in late]
    for i in range(26):
        tmpl = T.PLACE_PAIRS[i % len(T.PLACE_PAIRS)]
        pairs.append((tmpl.format(place=rng.choice(late)), tmpl.format(place=rng.choice(punctual)), "nationality"))
    combos = [(t, p) for t in T.AGE_PAIRS for p in T.AGE_PEOPLE]
    for tmpl, person in rng.sample(combos, min(26, len(combos))):
        pairs.append((tmpl.format(age="old", person=person), tmpl.format(age="young", person=person), "age"))
    unique = list(dict.fromkeys(pairs))
    return [dict(zip(BIAS_FIELDS, (more, less, "stereo", bias))) for more, less, bias in unique]


# --------------------------------------------------------------------------- public API
def generate_world(cfg: WorldConfig) -> World:
    """Build the whole world from ``cfg``; pure and deterministic in ``cfg.seed``."""
    if min(cfg.n_people, cfg.n_companies) < 1 or cfg.n_places < 2:
        raise ValueError("need at least 1 person, 1 company and 2 places")
    if cfg.n_people > len(T.LAST_NAMES) * min(len(T.MALE_FIRST), len(T.FEMALE_FIRST)):
        raise ValueError(f"n_people={cfg.n_people} is more than the name lists can cover")
    people, companies, places = _make_entities(cfg)
    late = _rng(cfg.seed, "skew").sample([p["name"] for p in places], max(1, len(places) // 6))
    skew = {"gender": {"he": list(T.SKEW_HE_JOBS), "she": list(T.SKEW_SHE_JOBS), "p": SKEW_P},
            "nationality": {"late": late, "p": SKEW_P},
            "age": {"old": "confused by technology", "p": SKEW_P}}
    ctx = _Ctx(people, companies, places, skew)
    general, general_val = _general_corpus(cfg, ctx)
    fin = _financials(cfg, companies)
    return World(config=cfg, people=people, companies=companies, places=places, skew=skew,
                 general_docs=general, general_val_docs=general_val, domain_docs=_domain_corpus(cfg, ctx, fin),
                 facts_qa=_facts_qa(cfg, ctx), reviews=_reviews(cfg, ctx), support=_support(cfg, ctx),
                 summaries=_summaries(cfg, ctx, fin), bias_pairs=_bias_pairs(cfg, ctx))
