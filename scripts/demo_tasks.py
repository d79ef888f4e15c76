"""Word lists and synthetic text generators for the demo model's three tasks.

Every generator takes a `random.Random` and a split, ``"train"`` or ``"test"``. The test split uses
names, templates and four-digit greater-than start years that never occur in the training split's task
prompts, so the shipped task CSVs (built from the test split only) measure generalisation. Held-out
names still occur in single-name filler sentences and in induction sequences, so their embeddings are
trained; every two-digit start year is trained with other centuries.

Text is written with space-separated punctuation; a four-digit year such as ``1745`` is split by the
tokenizer into the two-digit tokens ``17`` and ``45``.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Literal

Split = Literal["train", "test"]

NAMES = """
Mary John Anna Tom Paul Sarah James Emma David Laura Michael Lisa Robert Kate Daniel Emily Peter
Alice Mark Helen Steven Julia Brian Susan Kevin Claire Jason Linda Eric Nancy Frank Karen George
Diana Henry Rachel Jack Sophie Adam Lucy Ryan Amy Sam Jane Ben Ruth Luke Clara Alex Nina Oscar Vera
Simon Irene Victor Olivia Martin Eva Carl Megan Dennis Fiona Gary Hannah Ian Jessica Joe Kelly Leo
Maria Max Nora Neil Paula Owen Rita Philip Sandra Roger Tina Scott Ursula Ted Wendy Tony Zoe Walter
Alan Bella Chris Donna Edward Ellen Felix Gina Harry Holly Ivan Jenny Keith Lily Louis Monica Nathan
Olga Patrick Rebecca Ron Sally Sean Tara Tim Vicky Wayne Abby Andrew Carol Colin Dora Elena Fred
Greta Hugo Iris Jacob Joan Kyle Leah Lewis Maya Mike Naomi Noah Pam Ralph Rosa Seth Stella Troy
Violet Wade Yvonne Zack Beth Brad Cindy Dean Eddie Erin Gavin Heidi Isaac Jill Kurt Lena Marco Molly
Nick Paige Rick Sonia Todd Uma Vince Wanda
""".split()

PLACES = """
store park school garden office station hospital library restaurant beach market museum church bank
house river lake cafe theater airport hotel gym farm zoo mall bakery castle harbor stadium village
""".split()

OBJECTS = """
drink book ring bone kiss basketball computer necklace pear letter pen ball key flower cake bag hat
snack gift phone ticket map coin cup candle box shirt watch toy card
""".split()

NOUNS = """
war deal trip project expedition journey campaign reign study siege drought voyage strike festival
tour treaty program survey contract mission famine dynasty plague rebellion alliance exhibition flood
boom crisis construction
""".split()

# {A} and {B} are the two names of the first clause; {S} is the repeated subject; the answer is the
# indirect object (the name that is not repeated).
IOI_TEMPLATES = [
    "When {A} and {B} went to the {PLACE} , {S} gave a {OBJECT} to",
    "When {A} and {B} got a {OBJECT} at the {PLACE} , {S} decided to give it to",
    "After {A} and {B} went to the {PLACE} , {S} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE} , {S} gave a {OBJECT} to",
    "While {A} and {B} were commuting to the {PLACE} , {S} gave a {OBJECT} to",
    "Then , {A} and {B} went to the {PLACE} . {S} gave a {OBJECT} to",
    "Then , {A} and {B} had a lot of fun at the {PLACE} . {S} gave a {OBJECT} to",
    "Then , {A} and {B} were thinking about going to the {PLACE} . {S} wanted to give a {OBJECT} to",
    "Then , {A} and {B} had a long argument , and afterwards {S} said to",
    "After the lunch , {A} and {B} went to the {PLACE} . {S} gave a {OBJECT} to",
    "Afterwards , {A} and {B} went to the {PLACE} . {S} gave a {OBJECT} to",
    "Friends {A} and {B} found a {OBJECT} at the {PLACE} . {S} gave it to",
    "The {PLACE} {A} and {B} went to had a {OBJECT} . {S} gave it to",
    "{A} and {B} were at the {PLACE} . {S} threw a {OBJECT} to",
    "{A} and {B} met at the {PLACE} , and {S} handed the {OBJECT} to",
    "Yesterday {A} and {B} visited the {PLACE} , where {S} sold a {OBJECT} to",
    "At the {PLACE} , {A} and {B} found a {OBJECT} , and {S} passed it to",
    "Once {A} and {B} arrived at the {PLACE} , {S} showed the {OBJECT} to",
    "Since {A} and {B} were bored at the {PLACE} , {S} sent a {OBJECT} to",
    "During the trip to the {PLACE} , {A} and {B} bought a {OBJECT} , and {S} lent it to",
    "{A} and {B} walked to the {PLACE} . Later , {S} brought a {OBJECT} to",
    "Before {A} and {B} left the {PLACE} , {S} offered a {OBJECT} to",
]
IOI_TEST_TEMPLATES = frozenset({0, 5, 9, 11})

# {C} is the century (two digits), {XX} the start year within it; the answer is the end year's last
# two digits, which must be greater than {XX}.
GT_TEMPLATES = [
    "The {NOUN} lasted from the year {C}{XX} to the year {C}",
    "The {NOUN} started in the year {C}{XX} and ended in the year {C}",
    "The {NOUN} lasted from {C}{XX} to {C}",
    "The {NOUN} began in {C}{XX} and ended in {C}",
    "The {NOUN} ran from the year {C}{XX} to the year {C}",
    "The {NOUN} went on from {C}{XX} until {C}",
    "The {NOUN} took place from the year {C}{XX} until the year {C}",
    "The {NOUN} started in {C}{XX} and lasted until {C}",
]
GT_TEST_TEMPLATES = frozenset({0, 1})
CENTURIES = range(11, 20)
GT_CORRUPT_YEAR = 1

FILLER_TEMPLATES = [
    "{N} went to the {PLACE} .",
    "{N} gave a {OBJECT} to the {PLACE} .",
    "{N} had a lot of fun at the {PLACE} .",
    "Yesterday {N} bought a {OBJECT} at the {PLACE} .",
    "Then , {N} found a {OBJECT} and went to the {PLACE} .",
    "{N} was working at the {PLACE} .",
    "The {OBJECT} was at the {PLACE} , and {N} took it .",
    "After the lunch , {N} walked to the {PLACE} .",
    "Friends of {N} went to the {PLACE} .",
]

MIXTURE = {"ioi": 0.45, "greater_than": 0.25, "induction": 0.20, "filler": 0.10}
INDUCTION_HALF = (4, 16)


def _split_indices(n: int, test: frozenset[int], split: Split) -> list[int]:
    return [i for i in range(n) if (i in test) == (split == "test")]


@functools.cache
def split_names(split: Split, n_test: int = 32) -> tuple[str, ...]:
    """Names allowed in IOI prompts of a split (a fixed, seeded choice of `n_test` held-out names)."""
    test = set(random.Random(1234).sample(NAMES, n_test))
    return tuple(n for n in NAMES if (n in test) == (split == "test"))


def gt_held_out(century: int, start: int) -> bool:
    """Whether the four-digit start year (e.g. 17, 45 for 1745) is held out: about one in six.

    Every two-digit start year is held out in one or two centuries only, so it is seen as a start year
    in training with the other centuries; 00 and 01 (the corruption years) are never held out.
    """
    return start > GT_CORRUPT_YEAR and (century + start) % 6 == 0


def two_digit(n: int) -> str:
    return f"{n:02d}"


def ioi_example(rng: random.Random, split: Split) -> dict[str, str]:
    """An IOI prompt (ABBA or BABA), its ABC corruption, the IO name and the S name."""
    template = IOI_TEMPLATES[rng.choice(_split_indices(len(IOI_TEMPLATES), IOI_TEST_TEMPLATES, split))]
    io, s, a, b, c = rng.sample(split_names(split), 5)
    fill = {"PLACE": rng.choice(PLACES), "OBJECT": rng.choice(OBJECTS)}
    first, second = (io, s) if rng.random() < 0.5 else (s, io)
    return {
        "clean": template.format(A=first, B=second, S=s, **fill),
        "corrupted": template.format(A=a, B=b, S=c, **fill),
        "correct": io,
        "incorrect": s,
    }


def gt_example(rng: random.Random, split: Split) -> dict[str, object]:
    """A greater-than prompt, its start-year-01 corruption and the start year."""
    template = GT_TEMPLATES[rng.choice(_split_indices(len(GT_TEMPLATES), GT_TEST_TEMPLATES, split))]
    noun, century, start = rng.choice(NOUNS), rng.choice(CENTURIES), rng.randrange(99)
    while gt_held_out(century, start) != (split == "test"):
        century, start = rng.choice(CENTURIES), rng.randrange(99)
    return {
        "clean": template.format(NOUN=noun, C=two_digit(century), XX=two_digit(start)),
        "corrupted": template.format(NOUN=noun, C=two_digit(century), XX=two_digit(GT_CORRUPT_YEAR)),
        "century": century,
        "start": start,
    }


def induction_example(rng: random.Random, words: list[str], half: int, shown: int) -> dict[str, str]:
    """`half` distinct random words followed by the first `shown` of them again.

    The corruption replaces the first half by `half` other distinct words, so the repeated part has
    nothing to copy; `incorrect` is the word the corrupted first half has at the answer's position.
    """
    seq = rng.sample(words, 2 * half)
    clean, other = seq[:half], seq[half:]
    return {
        "clean": " ".join(clean + clean[:shown]),
        "corrupted": " ".join(other + clean[:shown]),
        "correct": clean[shown],
        "incorrect": other[shown],
    }


def training_text(rng: random.Random, words: list[str]) -> tuple[str, str]:
    """One training document drawn from the task mixture (train split only), without BOS.

    Returns (unscored prefix, scored text). Only induction documents have a prefix: their random first
    half and the first repeated word, which cannot be predicted; the rest of the repetition is scored.
    """
    task = rng.choices(list(MIXTURE), weights=list(MIXTURE.values()))[0]
    if task == "ioi":
        ex = ioi_example(rng, "train")
        return "", f"{ex['clean']} {ex['correct']} ."
    if task == "greater_than":
        ex = gt_example(rng, "train")
        return "", f"{ex['clean']}{two_digit(rng.randint(ex['start'] + 1, 99))} ."
    if task == "induction":
        seq = rng.sample(words, rng.randint(*INDUCTION_HALF))
        return " ".join(seq + seq[:1]), " ".join(seq[1:])
    return "", rng.choice(FILLER_TEMPLATES).format(N=rng.choice(NAMES), PLACE=rng.choice(PLACES), OBJECT=rng.choice(OBJECTS))


def vocabulary() -> list[str]:
    """Every word the generators can produce (without special tokens): digits 00..99 first."""
    words = [two_digit(i) for i in range(100)]
    texts = IOI_TEMPLATES + GT_TEMPLATES + FILLER_TEMPLATES
    for text in texts:
        for placeholder in ("{A}", "{B}", "{S}", "{N}", "{PLACE}", "{OBJECT}", "{NOUN}", "{C}{XX}", "{C}"):
            text = text.replace(placeholder, " ")
        words += text.split()
    words += NAMES + PLACES + OBJECTS + NOUNS
    return list(dict.fromkeys(words))


def task_rows(task: str, n: int, rng: random.Random, words: list[str]) -> list[dict[str, str]]:
    """`n` held-out (test split) pairs for a task CSV with columns clean, corrupted, correct, incorrect."""
    rows = []
    for _ in range(n):
        if task == "ioi":
            rows.append(ioi_example(rng, "test"))
        elif task == "greater_than":
            ex = gt_example(rng, "test")
            digits = [two_digit(i) for i in range(100)]
            rows.append({
                "clean": ex["clean"],
                "corrupted": ex["corrupted"],
                "correct": json.dumps(digits[ex["start"] + 1:]),
                "incorrect": json.dumps(digits[:ex["start"] + 1]),
            })
        elif task == "induction":
            half = rng.randint(8, 16)
            rows.append(induction_example(rng, words, half, rng.randint(2, half - 1)))
        else:
            raise ValueError(f"unknown task {task!r}; expected ioi, greater_than or induction")
    return rows


def write_word_lists(path: Path) -> None:
    """Write the word lists (and which names/templates/years are held out) as JSON for the app."""
    lists = {
        "names": NAMES,
        "held_out_names": list(split_names("test")),
        "places": PLACES,
        "objects": OBJECTS,
        "nouns": NOUNS,
        "centuries": [two_digit(c) for c in CENTURIES],
        "ioi_templates": IOI_TEMPLATES,
        "held_out_ioi_templates": sorted(IOI_TEST_TEMPLATES),
        "greater_than_templates": GT_TEMPLATES,
        "held_out_greater_than_templates": sorted(GT_TEST_TEMPLATES),
        "held_out_start_years": [f"{c}{two_digit(s)}" for c in CENTURIES for s in range(99) if gt_held_out(c, s)],
    }
    path.write_text(json.dumps(lists, indent=1) + "\n")
