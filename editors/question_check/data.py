"""Training pairs for the question check: (question, edit prompt) -> same relation or not.

Both texts are masked with the edit's subject (model.mask_subject). Sources, each a
`--data` file read by editors/bench/data.py plus the relations kmd ships:

- ZsRE (`zsre`): a rephrase asks what its prompt asks (positive); another record's
  question put to this record's subject asks something else (negative, unless the two
  questions read the same once masked);
- KnowEdit (`knowedit`): a Subject_Aliasing question asks the edit's question under
  another name (positive: the name stays unmasked); a Relation_Specificity question asks
  another fact of the subject (negative);
- the relations file (relations.yaml): two phrasings of one relation (positive), of two
  relations (negative; a quarter of them relations the encoder puts near each other,
  `nearest_relations`), in declarative, question, possessive and bare-label ("X taxon
  rank") styles; some questions name the subject by another name, unmasked, as an alias
  would;
- unrelated questions (a ZsRE record's locality question) against an edit prompt (negative);
- a KnowEdit file's templates (`template_pairs`): each against every other (negative);
- across styles (`cross_style_pairs`): a record's question against a declarative template
  of another relation (the KnowEdit and relations-file templates, filled with the same
  subject), negative when the two are far apart in the sentence encoder's space (below
  `CROSS_STYLE_MAX_COSINE`, and among the farther 60 % of templates for that question),
  which leaves out the templates that may ask the same thing in other words.

Records of a file listed in `exclude` (case ids, or the first N records of a KnowEdit
file, the evaluated ones) are left out.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from kmd.editors.bench.data import EditRecord, load_records
from kmd.editors.question_check.model import MASK, mask_subject

RELATIONS_FILE = Path(__file__).with_name("relations.yaml")
CROSS_STYLE_MAX_COSINE = 0.5
# Another record's question put to this subject often asks the same thing in other words
# ("What nationality is X?" / "The nationality of X is?"): such pairs, closer than this in
# the sentence encoder's space, are not taken as negatives.
OTHER_QUESTION_MAX_COSINE = 0.7
NEAR_RELATIONS = 6  # hard negatives: each relation against its 6 nearest in the relations file
NEAR_SHARE = 0.25  # of the relations file's negatives; more made the network unsure of the positives
TEMPLATE_MIN_COUNT = 3  # KnowEdit templates used this often take part in template pairs
TEMPLATE_REPEATS = 5  # each pair of two KnowEdit templates, as negatives


@dataclass(frozen=True)
class Pair:
    question: str  # masked
    prompt: str  # masked
    label: float  # 1.0: the question asks the prompt's relation
    source: str


def load_relations(path: Path = RELATIONS_FILE) -> dict[str, list[str]]:
    """relation -> its phrasings; each relation is also asked as "<subject> <relation>" (the
    bare label after the name, as KnowEdit's ZsRE asks "Epaspidoceras taxon rank")."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, list) and len(v) >= 2 for v in data.values()):
        raise ValueError(f"{path}: expected relation -> list of 2+ phrasings with '{{}}' for the subject")
    return {str(k): [str(p) for p in v] + ["{} " + str(k)] for k, v in data.items()}


def _subject_swapped(question: str, old: str | None, new: str | None) -> str | None:
    if not old or not new or old.lower() not in question.lower():
        return None
    return mask_subject(question, old).replace(MASK, new)


def record_pairs(records: Sequence[EditRecord], rng: random.Random, source: str) -> list[Pair]:
    pairs: list[Pair] = []
    for i, r in enumerate(records):
        prompt = mask_subject(r.prompt, r.subject)
        if prompt == r.prompt and not r.same_subject:
            continue  # the subject does not occur in the prompt: nothing to mask
        for rephrase in r.rephrases:
            pairs.append(Pair(mask_subject(rephrase, r.subject), prompt, 1.0, f"{source}:rephrase"))
        for q in r.same_subject:
            pairs.append(Pair(mask_subject(q.prompt, r.subject), prompt, 0.0, f"{source}:same-subject"))
        for q in r.portability:
            if q.kind == "Subject_Aliasing":
                pairs.append(Pair(mask_subject(q.prompt, r.subject), prompt, 1.0, f"{source}:alias"))
        if not r.same_subject and len(records) > 1:  # another record's question about this subject
            other = records[rng.randrange(len(records))]
            swapped = _subject_swapped(other.prompt, other.subject, r.subject)
            if swapped is not None and other is not r:
                masked = mask_subject(swapped, r.subject)
                if masked.lower() != prompt.lower():
                    pairs.append(Pair(masked, prompt, 0.0, f"{source}:other-question"))
        if r.loc_answer and r.loc_prompt != r.prompt and rng.random() < 0.25:
            pairs.append(Pair(r.loc_prompt, prompt, 0.0, f"{source}:unrelated"))
    return pairs


def nearest_relations(relations: dict[str, list[str]], count: int) -> dict[str, list[str]]:
    """relation -> the `count` other relations with the phrasings the sentence encoder puts
    nearest (subject masked): the pairs a random draw of two relations among 128 almost
    never gives ("the country which X is associated with" / "the capital city of X" / "the
    religion which X is associated with")."""
    from kmd.editors.question_check.model import encode

    keys = sorted(relations)
    texts = [t.format(MASK) for k in keys for t in relations[k]]
    owner = torch.tensor([i for i, k in enumerate(keys) for _ in relations[k]])  # (T,) relation of each text
    table = encode(texts, "cpu")  # (T, D)
    cosine = table @ table.T  # (T, T)
    members = torch.zeros(len(keys), len(texts), dtype=torch.bool)
    members[owner, torch.arange(len(texts))] = True  # (K, T)
    # closest phrasing pair of two relations, (K, K): a shared frame ("the X which {} is associated with")
    # is what misleads the network, so the nearest pair counts, not the mean
    by_text = torch.stack([cosine[members[k]].amax(0) for k in range(len(keys))])  # (K, T)
    similarity = torch.stack([by_text[:, members[k]].amax(1) for k in range(len(keys))], dim=1)  # (K, K)
    similarity.fill_diagonal_(float("-inf"))  # never itself
    nearest = similarity.topk(min(count, len(keys) - 1), dim=1).indices
    return {k: [keys[j] for j in nearest[i].tolist()] for i, k in enumerate(keys)}


def relation_pairs(relations: dict[str, list[str]], names: Sequence[str], count: int, rng: random.Random,
                   near: dict[str, list[str]] | None = None) -> list[Pair]:  # fmt: skip
    """`count` positive and `count` negative pairs from the relations file; 30 % of questions
    name the subject (another name, unmasked). With `near` (nearest_relations), some of the
    negatives (NEAR_SHARE) pair a relation with one of its nearest others."""
    keys = sorted(relations)

    def ask(template: str) -> str:
        return template.format(rng.choice(names) if names and rng.random() < 0.3 else MASK)

    pairs = []
    for _ in range(count):
        relation = rng.choice(keys)
        a, b = rng.sample(relations[relation], 2)
        pairs.append(Pair(ask(a), b.format(MASK), 1.0, "relations:same"))
        if near and rng.random() < NEAR_SHARE:
            r1 = rng.choice(keys)
            r2, source = rng.choice(near[r1]), "relations:near"
        else:
            (r1, r2), source = rng.sample(keys, 2), "relations:other"
        pairs.append(Pair(ask(rng.choice(relations[r1])), rng.choice(relations[r2]).format(MASK), 0.0, source))
    return pairs


def cross_style_pairs(records: Sequence[EditRecord], templates: Sequence[str], per_record: int, rng: random.Random,
                      source: str) -> list[Pair]:  # fmt: skip
    """Negatives across styles: each record's masked prompt against `per_record` masked
    templates ('{}' for the subject) that the sentence encoder puts far from it (module doc)."""
    from kmd.editors.question_check.model import encode

    prompts = [mask_subject(r.prompt, r.subject) for r in records if r.subject and r.subject.lower() in r.prompt.lower()]
    masked = sorted({t.replace("{}", MASK) for t in templates})
    if not prompts or not masked:
        return []
    cosines = encode(prompts, "cpu") @ encode(masked, "cpu").T  # (P, T)
    pairs = []
    for row, prompt in enumerate(prompts):
        cut = min(CROSS_STYLE_MAX_COSINE, float(cosines[row].quantile(0.6)))
        far = [masked[j] for j in (cosines[row] < cut).nonzero().flatten().tolist()]
        pairs += [Pair(t, prompt, 0.0, f"{source}:cross-style") for t in rng.sample(far, min(per_record, len(far)))]
    return pairs


def template_pairs(records: Sequence[EditRecord], repeats: int, source: str, min_count: int = TEMPLATE_MIN_COUNT) -> list[Pair]:
    """Negatives between the prompt templates of a KnowEdit file: each template (an edit's or
    a same-subject question's prompt, subject masked, used `min_count`+ times) against every
    other, `repeats` times. A KnowEdit file asks each Wikidata property with one template, so
    two templates are two relations; the rare pairs that read alike ("the country which X is
    associated with" / "the capital city of X") are the ones the same-subject pairs seldom
    give and that hijacked answers on the development set."""
    counts: dict[str, int] = {}
    for r in records:
        if not r.subject:
            continue
        for text in (r.prompt, *(q.prompt for q in r.same_subject)):
            masked = mask_subject(text, r.subject)
            if masked != text:
                counts[masked] = counts.get(masked, 0) + 1
    templates = sorted(t for t, n in counts.items() if n >= min_count)
    return [Pair(a, b, 0.0, f"{source}:template") for a in templates for b in templates if a != b for _ in range(repeats)]


def drop_ambiguous(pairs: list[Pair]) -> list[Pair]:
    """`pairs` without the other-question negatives that may ask the same thing (closer than
    OTHER_QUESTION_MAX_COSINE once masked)."""
    from kmd.editors.question_check.model import encode

    suspect = [i for i, p in enumerate(pairs) if p.source.endswith(":other-question")]
    if not suspect:
        return pairs
    texts = sorted({t for i in suspect for t in (pairs[i].question, pairs[i].prompt)})
    index = {t: row for row, t in enumerate(texts)}
    table = encode(texts, "cpu")
    drop = {i for i in suspect
            if float(table[index[pairs[i].question]] @ table[index[pairs[i].prompt]]) > OTHER_QUESTION_MAX_COSINE}  # fmt: skip
    return [p for i, p in enumerate(pairs) if i not in drop]


def declarative(template: str) -> bool:
    return not template.rstrip().endswith("?")


def training_pairs(files: Sequence[Path], exclude_first: dict[str, int], relation_count: int, seed: int,
                   cross_style: int = 2) -> list[Pair]:  # fmt: skip
    """Pairs from every file (KnowEdit files without their first `exclude_first[name]`
    records), from the relations file, and `cross_style` cross-style negatives per record."""
    rng = random.Random(seed)
    relations = load_relations()
    pairs: list[Pair] = []
    names: list[str] = []
    loaded = []
    for path in files:
        fmt, records = load_records(path)
        records = records[exclude_first.get(path.name, 0) :]
        loaded.append((fmt, records))
        names += [r.subject for r in records if r.subject]
        pairs += record_pairs(records, rng, f"{fmt}")
    templates = [t for phrasings in relations.values() for t in phrasings if declarative(t)]
    templates += sorted({mask_subject(r.prompt, r.subject).replace(MASK, "{}") for _, records in loaded for r in records
                         if r.subject and r.subject.lower() in r.prompt.lower() and declarative(r.prompt)})  # fmt: skip
    if cross_style:
        for fmt, records in loaded:
            pairs += cross_style_pairs(records, templates, cross_style, rng, fmt)
    for fmt, records in loaded:
        if fmt == "knowedit":
            pairs += template_pairs(records, TEMPLATE_REPEATS, fmt)
    pairs = drop_ambiguous(pairs)
    pairs += relation_pairs(relations, names, relation_count, rng, nearest_relations(relations, NEAR_RELATIONS))
    rng.shuffle(pairs)
    return pairs
