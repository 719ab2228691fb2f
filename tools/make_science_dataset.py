#!/usr/bin/env python3
"""Build data/science_facts.jsonl: CounterFact-style edit records about chemical elements and US states.

The second real-facts dataset of the project, with relations that are not about countries and
cities, so that a method tuned on data/geo_facts.jsonl is also measured on facts it was not tuned
on. Facts come from two PyPI packages (`pip install mendeleev us`):

- chemical elements from `mendeleev` (its data: https://github.com/lmmentel/mendeleev, MIT),
  eleven relations: chemical symbol, atomic number, chemical family, periodic-table block, crystal
  structure, Goldschmidt class, radioactivity, discoverer, year and country of discovery, and the
  language the name comes from;
- US states from `us` (https://github.com/unitedstates/python-us, BSD-3-Clause): capital, postal
  abbreviation, year of statehood.

Records have the shape of data/geo_facts.jsonl (see tools/make_geo_dataset.py): the real fact as
`target_true`, a counterfactual `target_new` drawn (seeded) from the same relation's answers, at
least two rephrasings, and seven locality probes with their true answers and `kind`:

    same_relation   two of the record's own relation about held-out subjects
    other_relation  three of other relations (elements or states) about held-out subjects
    same_subject    the record's own subject, asked a relation that no record edits and that no
                    edit implies (an element's CAS registry number, a state's time zone; an
                    element's period would follow from an edit of its atomic number)
    general         a general-knowledge prompt (tools/general_knowledge.py)

Subjects (elements, states) are split once (seeded) into edit subjects and held-out subjects;
probes are only about held-out subjects or about relations no record edits, so no probe is ever an
edit of the stream. Deterministic for fixed package versions (mendeleev 1.3.0, us 4.0.0 here).

    python3 tools/make_science_dataset.py [--out data/science_facts.jsonl] [--seed 20240818]
"""
import argparse
import json
import math
import random

from general_knowledge import GENERAL_KNOWLEDGE

HELD_OUT_FRACTION = 0.15
SAME_RELATION_PROBES = 2
OTHER_RELATION_PROBES = 3

# relation -> (prompt template, rephrase templates)
TEMPLATES = {
    "symbol": (
        "The chemical symbol of {s} is",
        ["{s} has the chemical symbol", "What is the symbol for {s}? The answer is"],
    ),
    "atomic_number": (
        "The atomic number of {s} is",
        ["{s} has the atomic number", "How many protons does an atom of {s} have? The answer is"],
    ),
    "family": (
        "{s} is a member of the chemical family of the",
        ["Chemists classify {s} as one of the", "Which family of elements does {s} belong to? The"],
    ),
    "block": (
        "In the periodic table, {s} is an element of the",
        ["{s} belongs to the periodic table block called the", "Which block of the periodic table is {s} in? The"],
    ),
    "crystal": (
        "The crystal structure of solid {s} is",
        ["Solid {s} crystallizes in a structure that is", "What is the lattice of {s} crystals? It is"],
    ),
    # (Not "In the Goldschmidt classification, ...": the word would contain the subject "Gold".)
    "goldschmidt": (
        "Geochemists classify {s} as",
        ["In geochemistry, {s} counts as", "What is the geochemical class of {s}? It is"],
    ),
    "radioactive": (
        "Is {s} radioactive? The answer is",
        ["Does {s} have only unstable isotopes? The answer is", "Asked whether {s} is radioactive, a chemist says"],
    ),
    "discoverer": (
        "{s} was discovered by",
        ["The element {s} was first identified by", "Who discovered {s}? It was"],
    ),
    "discovery_year": (
        "{s} was discovered in the year",
        ["The discovery of {s} took place in", "In which year was {s} discovered? In"],
    ),
    "discovery_country": (
        "{s} was first discovered in the country of",
        ["The country where {s} was discovered is", "Where was {s} discovered? In"],
    ),
    "name_language": (
        "The name of the element {s} comes from the language",
        ["The word {s} is derived from the language", "Which language does the name {s} come from? From"],
    ),
    "state_capital": (
        "The capital of the state of {s} is",
        ["{s}'s state capital is", "What is the capital of {s}? The answer is"],
    ),
    "postal_code": (
        "The postal abbreviation of {s} is",
        ["The two-letter postal code for {s} is", "How is {s} abbreviated on envelopes? As"],
    ),
    "statehood": (
        "{s} became a US state in",
        ["{s} was admitted to the Union in", "In which year did {s} join the United States? In"],
    ),
}

FAMILIES = {
    1: "nonmetals",
    2: "noble gases",
    3: "alkali metals",
    4: "alkaline earth metals",
    5: "metalloids",
    6: "halogens",
    7: "poor metals",
    8: "transition metals",
    9: "lanthanides",
    10: "actinides",
}
LATTICES = {
    "HEX": "hexagonal",
    "FCC": "face-centered cubic",
    "BCC": "body-centered cubic",
    "ORC": "orthorhombic",
    "RHL": "rhombohedral",
    "TET": "tetragonal",
    "DIA": "diamond cubic",
    "CUB": "cubic",
    "MCL": "monoclinic",
    "SC": "simple cubic",
}
GOLDSCHMIDT = {"litophile": "lithophile", "chalcophile": "chalcophile", "siderophile": "siderophile", "atmophile": "atmophile"}
LANGUAGES = {"Greek", "Latin", "German", "Anglo-Saxon", "English", "Swedish", "Medieval Latin"}
TIME_ZONES = {
    "America/New_York": "Eastern",
    "America/Detroit": "Eastern",
    "America/Indiana/Indianapolis": "Eastern",
    "America/Kentucky/Louisville": "Eastern",
    "America/Chicago": "Central",
    "America/North_Dakota/Center": "Central",
    "America/Denver": "Mountain",
    "America/Phoenix": "Mountain",
    "America/Boise": "Mountain",
    "America/Los_Angeles": "Pacific",
    "America/Anchorage": "Alaska",
    "Pacific/Honolulu": "Hawaii",
}


def present(value):
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def first_discoverer(text):
    """The first person named, when it is a plain 'First Last' name (labs and initials-only
    spellings are skipped: they make poor one-line answers)."""
    if not present(text) or "ancient" in text.lower():
        return None
    name = text.split(",")[0].strip()
    for prefix in ("Sir ", "Baron "):
        name = name.removeprefix(prefix)
    words = name.split()
    if len(words) != 2 or not all(w.isalpha() and w[0].isupper() for w in words):
        return None
    return name


def element_facts():
    from mendeleev.fetch import fetch_table

    table = fetch_table("elements").sort_values("atomic_number")
    facts, probe_facts = [], {}
    for row in table.itertuples():
        s = row.name
        rel = {
            "symbol": row.symbol,
            "atomic_number": str(int(row.atomic_number)),
            "family": FAMILIES.get(int(row.series_id)) if present(row.series_id) else None,
            "block": f"{row.block}-block" if present(row.block) else None,
            "crystal": LATTICES.get(row.lattice_structure) if present(row.lattice_structure) else None,
            "goldschmidt": GOLDSCHMIDT.get(row.goldschmidt_class) if present(row.goldschmidt_class) else None,
            "radioactive": "yes" if row.is_radioactive else "no",
            "discoverer": first_discoverer(row.discoverers),
            "discovery_year": str(int(row.discovery_year)) if present(row.discovery_year) else None,
            "discovery_country": row.discovery_location
            if present(row.discovery_location) and "/" not in row.discovery_location
            else None,
            "name_language": row.name_origin.split(":")[0]
            if present(row.name_origin) and row.name_origin.split(":")[0] in LANGUAGES
            else None,
        }
        for relation, answer in rel.items():
            if answer:
                facts.append((relation, f"element/{int(row.atomic_number)}", s, answer))
        probe_facts[f"element/{int(row.atomic_number)}"] = {
            "prompt": f"The CAS registry number of {s} is",
            "answer": row.cas,
            "kind": "same_subject",
        }
    return facts, probe_facts


def state_facts():
    import us

    facts, probe_facts = [], {}
    for state in sorted(us.states.STATES, key=lambda st: st.abbr):
        key = f"state/{state.abbr}"
        facts.append(("state_capital", key, state.name, state.capital))
        facts.append(("postal_code", key, state.name, state.abbr))
        facts.append(("statehood", key, state.name, str(state.statehood_year)))
        probe_facts[key] = {
            "prompt": f"Most of {state.name} lies in the time zone called",
            "answer": TIME_ZONES[state.capital_tz],
            "kind": "same_subject",
        }
    return facts, probe_facts


def interleave_relations(facts, rng):
    """Shuffle each relation, then deal them round-robin so every prefix of the file mixes relations."""
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


def probe(relation, subject, answer, kind):
    return {"prompt": TEMPLATES[relation][0].format(s=subject), "answer": answer, "kind": kind}


def build_records(facts, same_subject, rng):
    answers = {}
    for relation, _, _, answer in facts:
        answers.setdefault(relation, set()).add(answer)
    answers = {r: sorted(a) for r, a in answers.items()}

    subjects = sorted({key for _, key, _, _ in facts})
    held_out = {s for s in subjects if rng.random() < HELD_OUT_FRACTION}
    held = {}
    for fact in facts:
        if fact[1] in held_out:
            held.setdefault(fact[0], []).append(fact)
    edit_facts = [f for f in facts if f[1] not in held_out]

    records = []
    for index, (relation, key, subject, answer) in enumerate(interleave_relations(edit_facts, rng)):
        prompt, rephrases = TEMPLATES[relation]
        locality = [probe(r, s, a, "same_relation") for r, _, s, a in rng.sample(held[relation], SAME_RELATION_PROBES)]
        others = rng.sample(sorted(r for r in held if r != relation), OTHER_RELATION_PROBES)
        locality += [probe(r, s, a, "other_relation") for r, _, s, a in (rng.choice(held[o]) for o in others)]
        locality.append(same_subject[key])
        gk_prompt, gk_answer = rng.choice(GENERAL_KNOWLEDGE)
        locality.append({"prompt": gk_prompt, "answer": gk_answer, "kind": "general"})
        records.append(
            {
                "id": f"sci-{index:05d}",
                "knowledge_id": f"{relation}/{key.split('/')[1]}",
                "prompt": prompt.format(s=subject),
                "target_new": rng.choice([a for a in answers[relation] if a != answer]),
                "target_true": answer,
                "subject": subject,
                "rephrases": [r.format(s=subject) for r in rephrases],
                "locality": locality,
            }
        )
    return records, len(held_out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/science_facts.jsonl")
    parser.add_argument("--seed", type=int, default=20240818)
    args = parser.parse_args()

    element, element_probes = element_facts()
    state, state_probes = state_facts()
    records, held = build_records(element + state, {**element_probes, **state_probes}, random.Random(args.seed))
    with open(args.out, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    counts = {}
    for record in records:
        relation = record["knowledge_id"].split("/")[0]
        counts[relation] = counts.get(relation, 0) + 1
    print(f"wrote {len(records)} records to {args.out}: {counts}; {held} held-out subjects for locality")


if __name__ == "__main__":
    main()
