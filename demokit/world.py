"""
demokit/world.py: the plan of the demo corpus. Its sentences are real English (Bible verses for
train, dev and test; Wikipedia sentences, spoken by a held-out voice, for the open test split;
demokit/text.py). Its spoken-QA passages (Spoken-SQuAD style) come from a small template world of
people, cities, places, days, times, numbers and objects, with questions whose answers are spans of
the passage. No dev or test sentence (nor the other English version of its verse) or passage occurs
in train.
"""

import random

from demokit.tts import training_voices

SEED = 0  # one seed for the whole corpus: texts, voices, tempo, pitch and the TTS noise

# Corpus sizes: sentences (train, dev, test), open_test sentences, QA passages (train, dev, test).
# "large" takes every verse that is left for train (about 7,600) and three times the passages.
SIZES = {
    "full": dict(sentences=(2400, 150, 150), open_test=150, passages=(360, 40, 40)),
    "large": dict(sentences=(None, 150, 150), open_test=300, passages=(1080, 40, 40)),
    "small": dict(sentences=(32, 8, 8), open_test=8, passages=(4, 2, 2)),
}
QUESTIONS_PER_PASSAGE = 3  # questions per spoken passage
SPEED = (0.9, 1.1)  # tempo factor, drawn uniformly per utterance
PITCH = (0.94, 1.06)  # pitch factor (about +-1 semitone), drawn uniformly per utterance


# -----------------------------------------------------------------------------
# The template world of the spoken-QA passages

PEOPLE = {
    "Anna": "f",
    "Ben": "m",
    "Clara": "f",
    "David": "m",
    "Emma": "f",
    "Felix": "m",
    "Grace": "f",
    "Hugo": "m",
    "Julia": "f",
    "Jonas": "m",
    "Laura": "f",
    "Lucas": "m",
    "Mia": "f",
    "Noah": "m",
    "Olivia": "f",
    "Oscar": "m",
    "Rosa": "f",
    "Simon": "m",
    "Tina": "f",
    "Victor": "m",
}
CITIES = [
    "Paris",
    "Rome",
    "Berlin",
    "Vienna",
    "London",
    "Madrid",
    "Lisbon",
    "Prague",
    "Oslo",
    "Zurich",
    "Athens",
    "Dublin",
    "Munich",
    "Cologne",
    "Warsaw",
    "Brussels",
    "Venice",
    "Milan",
    "Copenhagen",
    "Stockholm",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
NUMBERS = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
]
COUNTS = [n for n in NUMBERS if n != "one"]  # how many objects / hours: plural
# part of the day -> the hours that make sense in it
PARTS_OF_DAY = {
    "morning": ["six", "seven", "eight", "nine", "ten", "eleven"],
    "afternoon": ["one", "two", "three", "four", "five"],
    "evening": ["six", "seven", "eight", "nine", "ten", "eleven"],
}
PLACES = [
    "station",
    "library",
    "museum",
    "market",
    "harbor",
    "bakery",
    "hospital",
    "school",
    "park",
    "airport",
    "theater",
    "hotel",
    "bank",
    "church",
    "bookstore",
    "town hall",
]
OBJECTS = [
    "books",
    "apples",
    "letters",
    "chairs",
    "bottles",
    "flowers",
    "keys",
    "cups",
    "boxes",
    "candles",
    "plates",
    "oranges",
    "postcards",
    "pencils",
    "umbrellas",
    "bags",
]
VEHICLES = ["train", "bus", "plane", "night train"]

# Spoken QA passages (English only), in the style of Spoken-SQuAD: every answer is a span of the
# passage. A passage is written as pieces; a piece (tag, words) marks a span that questions point to
# by its tag.
EVENTS = ["concert", "festival", "football match", "opera", "play"]


def random_passage(rng):
    """(passage text, [(question, answer, answer_start)]) with QUESTIONS_PER_PASSAGE questions."""
    a, b = rng.sample(sorted(PEOPLE), 2)
    city, city2 = rng.sample(sorted(CITIES), 2)
    place, place2 = rng.sample(sorted(PLACES), 2)
    day, month, hour, n = (
        rng.choice(list(DAYS)),
        rng.choice(list(MONTHS)),
        rng.choice(list(NUMBERS)),
        rng.choice(COUNTS),
    )
    obj, vehicle, event = (
        rng.choice(sorted(OBJECTS)),
        rng.choice(sorted(VEHICLES)),
        rng.choice(EVENTS),
    )
    she, her, her_poss = ("she", "her", "her") if PEOPLE[a] == "f" else ("he", "him", "his")
    evening_hour = rng.choice(PARTS_OF_DAY["evening"])
    kind = rng.randrange(4)
    if kind == 0:  # a trip
        pieces = [
            "On ",
            ("day", day),
            f", {a} travels from ",
            ("from", city),
            " to ",
            ("to", city2),
            " ",
            ("how", f"by {vehicle}"),
            f". In {city2}, {she} meets ",
            ("who", b),
            " ",
            ("where", f"at the {place}"),
            " at ",
            ("time", f"{hour} o'clock"),
            ". Together they buy ",
            ("what", [("many", n), f" {obj}"]),
            " for the way home.",
        ]
        questions = [
            (f"Who does {a} meet in {city2}?", "who"),
            (f"Where does {a} travel to?", "to"),
            (f"Where does {a} travel from?", "from"),
            (f"On which day does {a} travel?", "day"),
            (f"How does {a} travel to {city2}?", "how"),
            (f"Where do {a} and {b} meet?", "where"),
            (f"At what time do {a} and {b} meet?", "time"),
            ("What do they buy?", "what"),
            (f"How many {obj} do they buy?", "many"),
        ]
    elif kind == 1:  # a shop
        pieces = [
            f"{a} runs a small shop ",
            ("where", f"near the {place}"),
            " in ",
            ("city", city),
            ". On ",
            ("day", day),
            f", {she} sold ",
            ("what", [("many", n), f" {obj}"]),
            " to ",
            ("who", b),
            ". The shop closes at ",
            ("close", f"{evening_hour} o'clock in the evening"),
            ".",
        ]
        questions = [
            (f"Where is {a}'s shop?", "where"),
            (f"In which city is {a}'s shop?", "city"),
            (f"What did {a} sell to {b}?", "what"),
            (f"How many {obj} did {b} buy?", "many"),
            (f"Who bought the {obj}?", "who"),
            (f"On which day did {b} buy the {obj}?", "day"),
            (f"When does {a}'s shop close?", "close"),
        ]
    elif kind == 2:  # a move
        pieces = [
            "In ",
            ("month", month),
            f", {a} moved from ",
            ("from", city),
            " to ",
            ("to", city2),
            f". {she.capitalize()} now works ",
            ("work", f"at the {place}"),
            " and lives near ",
            ("near", f"the {place2}"),
            ". ",
            ("who", b),
            f" visits {her} ",
            ("often", f"every {day}"),
            ".",
        ]
        questions = [
            (f"When did {a} move to {city2}?", "month"),
            (f"Where did {a} live before {month}?", "from"),
            (f"Which city did {a} move to?", "to"),
            (f"Where does {a} work?", "work"),
            (f"What does {a} live near?", "near"),
            (f"Who visits {a} every {day}?", "who"),
            (f"How often does {b} visit {a}?", "often"),
        ]
    else:  # an event
        pieces = [
            f"The {event} in ",
            ("city", city),
            " starts at ",
            ("time", f"{hour} o'clock"),
            " on ",
            ("day", day),
            ". ",
            ("buyer", a),
            " has bought ",
            ("many", n),
            f" tickets for {her_poss} friends. ",
            ("who", b),
            " will wait for them ",
            ("where", f"at the {place}"),
            ".",
        ]
        questions = [
            (f"Where is the {event}?", "city"),
            (f"When does the {event} start?", "time"),
            (f"On which day is the {event}?", "day"),
            (f"How many tickets has {a} bought?", "many"),
            ("Who has bought the tickets?", "buyer"),
            (f"Who will wait at the {place}?", "who"),
            (f"Where will {b} wait?", "where"),
        ]
    text, spans = join_pieces(pieces)
    return text, [
        (q, spans[tag][1], spans[tag][0]) for q, tag in rng.sample(questions, QUESTIONS_PER_PASSAGE)
    ]


def join_pieces(pieces):
    """Pieces (plain strings, lists of pieces, or (tag, piece)) -> (text, {tag: (start, words)})."""
    text, spans = "", {}

    def add(piece):
        nonlocal text
        if isinstance(piece, str):
            text += piece
        elif isinstance(piece, list):
            for p in piece:
                add(p)
        else:
            tag, inner = piece
            start = len(text)
            add(inner)
            spans[tag] = (start, text[start:])

    add(pieces)
    return text, spans


# -----------------------------------------------------------------------------
# The plan: every utterance to synthesise (cheap, deterministic)


def plan_corpus(size="full", seed=SEED, verses=None, open_text=None, pico=None):
    """Every utterance to synthesise, as dicts; deterministic for a seed (and the texts).

    - sentences: Bible verses (demokit.text), split by verse: both English versions of a verse fall
      in the same split, so no dev or test sentence (or its paraphrase) occurs in train. Training
      voices only.
    - open_test: Wikipedia sentences, a source never used in training, all spoken by the held-out
      voice.
    - qa: passages of the template world, each drawn once (no dev/test passage occurs in train).

    verses / open_text default to demokit.text's; pico (is ttspico installed?) to what this machine
    has."""
    from demokit.text import bible_verses, wikipedia_sentences

    verses = bible_verses() if verses is None else verses
    open_text = wikipedia_sentences() if open_text is None else open_text
    pattern, held_out = training_voices(pico)
    rng, plan, sizes = random.Random(seed), [], SIZES[size]

    def add(kind, split, prefix, texts, speakers, **extra):
        for number, (item, speaker) in enumerate(zip(texts, speakers), len(plan) + 1):
            job = dict(
                kind=kind, split=split, audio=f"audio/{prefix}{number:05d}.wav", speaker=speaker
            )
            job.update(speed=round(rng.uniform(*SPEED), 3), pitch=round(rng.uniform(*PITCH), 3))
            plan.append({**job, **item, **extra})

    by_verse = {}
    for ref, english, german, source in verses:
        by_verse.setdefault(ref, []).append(
            dict(text=english, translation=german, source=source, ref=ref)
        )
    refs = sorted(by_verse)
    rng.shuffle(refs)
    train, dev, test = sizes["sentences"]
    for split, count in (
        ("dev", dev),
        ("test", test),
        ("train", train),
    ):  # train last: "None" takes the rest
        picked = []
        while refs and (count is None or len(picked) < count):
            picked += by_verse[refs.pop()]
        picked = (
            picked if count is None else picked[:count]
        )  # a verse cut at the boundary is not used again
        if count is not None and len(picked) < count:
            raise ValueError(
                f"{len(verses)} verses are too few for {size} splits {sizes['sentences']}"
            )
        add("sentences", split, "s", picked, split_voices(pattern, len(picked), rng))
    opened = rng.sample(sorted(set(open_text)), sizes["open_test"])
    add(
        "sentences",
        "open_test",
        "o",
        [dict(text=t, source="wikipedia") for t in opened],
        [held_out] * len(opened),
    )

    seen = set()
    for split, count in zip(("train", "dev", "test"), sizes["passages"]):
        passages = []
        for _ in range(count):
            text, questions = random_passage(rng)
            while text in seen:
                text, questions = random_passage(rng)
            seen.add(text)
            passages.append(dict(text=text, questions=questions))
        add("qa", split, "p", passages, split_voices(pattern, count, rng))
    return plan


def split_voices(pattern, count, rng):
    """A split of `count` utterances takes the first `count` of the voice cycle (every engine, even
    in a small split, in exact proportions), shuffled."""
    voices = [pattern[i % len(pattern)] for i in range(count)]
    rng.shuffle(voices)
    return voices
