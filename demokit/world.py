"""
demokit/world.py: the demo's text and the plan of its corpus. Sentences come from 19 templates over a small
world of people, cities, places, days, times, numbers and objects, each with a hand-written German rendering;
spoken-QA passages (Spoken-SQuAD style) carry questions whose answers are spans of the passage. No dev or
test sentence or passage occurs in train.
"""

import random

from demokit.tts import VOICE_PATTERN

SEED = 0  # one seed for the whole corpus: texts, voices, tempo, pitch and the TTS noise

# Corpus sizes: (train, dev, test). Each passage carries QUESTIONS_PER_PASSAGE questions.
SIZES = {
    "full": dict(sentences=(2400, 150, 150), passages=(360, 40, 40)),
    "small": dict(sentences=(32, 8, 8), passages=(4, 2, 2)),
}
QUESTIONS_PER_PASSAGE = 3
SPEED = (0.9, 1.1)  # tempo factor, drawn uniformly per utterance
PITCH = (0.94, 1.06)  # pitch factor (about +-1 semitone), drawn uniformly per utterance


# -----------------------------------------------------------------------------
# The text: a small world in English, with German renderings

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
CITIES = {
    "Paris": "Paris",
    "Rome": "Rom",
    "Berlin": "Berlin",
    "Vienna": "Wien",
    "London": "London",
    "Madrid": "Madrid",
    "Lisbon": "Lissabon",
    "Prague": "Prag",
    "Oslo": "Oslo",
    "Zurich": "Zürich",
    "Athens": "Athen",
    "Dublin": "Dublin",
    "Munich": "München",
    "Cologne": "Köln",
    "Warsaw": "Warschau",
    "Brussels": "Brüssel",
    "Venice": "Venedig",
    "Milan": "Mailand",
    "Copenhagen": "Kopenhagen",
    "Stockholm": "Stockholm",
}
DAYS = {
    "Monday": "Montag",
    "Tuesday": "Dienstag",
    "Wednesday": "Mittwoch",
    "Thursday": "Donnerstag",
    "Friday": "Freitag",
    "Saturday": "Samstag",
    "Sunday": "Sonntag",
}
MONTHS = {
    "January": "Januar",
    "February": "Februar",
    "March": "März",
    "April": "April",
    "May": "Mai",
    "June": "Juni",
    "July": "Juli",
    "August": "August",
    "September": "September",
    "October": "Oktober",
    "November": "November",
    "December": "Dezember",
}
NUMBERS = {
    "one": "eins",
    "two": "zwei",
    "three": "drei",
    "four": "vier",
    "five": "fünf",
    "six": "sechs",
    "seven": "sieben",
    "eight": "acht",
    "nine": "neun",
    "ten": "zehn",
    "eleven": "elf",
    "twelve": "zwölf",
}
COUNTS = [n for n in NUMBERS if n != "one"]  # how many objects / hours: plural
PRICES = {
    "five": "fünf",
    "ten": "zehn",
    "twelve": "zwölf",
    "fifteen": "fünfzehn",
    "twenty": "zwanzig",
    "thirty": "dreißig",
    "forty": "vierzig",
    "fifty": "fünfzig",
    "sixty": "sechzig",
    "eighty": "achtzig",
}
# part of the day -> (German, the hours that make sense in it)
PARTS_OF_DAY = {
    "morning": ("Morgen", ["six", "seven", "eight", "nine", "ten", "eleven"]),
    "afternoon": ("Nachmittag", ["one", "two", "three", "four", "five"]),
    "evening": ("Abend", ["six", "seven", "eight", "nine", "ten", "eleven"]),
}
# place -> German: at it (dative), to it, it (accusative), of it (genitive), it (nominative)
PLACES = {
    "station": ("am Bahnhof", "zum Bahnhof", "den Bahnhof", "des Bahnhofs", "der Bahnhof"),
    "library": ("in der Bibliothek", "zur Bibliothek", "die Bibliothek", "der Bibliothek", "die Bibliothek"),
    "museum": ("im Museum", "zum Museum", "das Museum", "des Museums", "das Museum"),
    "market": ("auf dem Markt", "zum Markt", "den Markt", "des Marktes", "der Markt"),
    "harbor": ("am Hafen", "zum Hafen", "den Hafen", "des Hafens", "der Hafen"),
    "bakery": ("in der Bäckerei", "zur Bäckerei", "die Bäckerei", "der Bäckerei", "die Bäckerei"),
    "hospital": ("im Krankenhaus", "zum Krankenhaus", "das Krankenhaus", "des Krankenhauses", "das Krankenhaus"),
    "school": ("in der Schule", "zur Schule", "die Schule", "der Schule", "die Schule"),
    "park": ("im Park", "zum Park", "den Park", "des Parks", "der Park"),
    "airport": ("am Flughafen", "zum Flughafen", "den Flughafen", "des Flughafens", "der Flughafen"),
    "theater": ("im Theater", "zum Theater", "das Theater", "des Theaters", "das Theater"),
    "hotel": ("im Hotel", "zum Hotel", "das Hotel", "des Hotels", "das Hotel"),
    "bank": ("in der Bank", "zur Bank", "die Bank", "der Bank", "die Bank"),
    "church": ("in der Kirche", "zur Kirche", "die Kirche", "der Kirche", "die Kirche"),
    "bookstore": (
        "in der Buchhandlung",
        "zur Buchhandlung",
        "die Buchhandlung",
        "der Buchhandlung",
        "die Buchhandlung",
    ),
    "town hall": ("im Rathaus", "zum Rathaus", "das Rathaus", "des Rathauses", "das Rathaus"),
}
SIGHTS = [
    "library",
    "museum",
    "market",
    "harbor",
    "park",
    "theater",
    "church",
    "bookstore",
    "town hall",
]  # to visit, to show
OPENING = [
    "library",
    "museum",
    "market",
    "bakery",
    "theater",
    "bank",
    "bookstore",
    "town hall",
    "school",
]  # closed on a day
SHOPS = ["station", "market", "bakery", "airport", "bookstore", "museum", "harbor"]  # to buy things at
WORKPLACES = [
    "station",
    "library",
    "museum",
    "market",
    "bakery",
    "hospital",
    "school",
    "airport",
    "theater",
    "hotel",
    "bank",
    "bookstore",
    "town hall",
]
OBJECTS = {
    "books": "Bücher",
    "apples": "Äpfel",
    "letters": "Briefe",
    "chairs": "Stühle",
    "bottles": "Flaschen",
    "flowers": "Blumen",
    "keys": "Schlüssel",
    "cups": "Tassen",
    "boxes": "Kisten",
    "candles": "Kerzen",
    "plates": "Teller",
    "oranges": "Orangen",
    "postcards": "Postkarten",
    "pencils": "Bleistifte",
    "umbrellas": "Regenschirme",
    "bags": "Taschen",
}
# vehicle -> German: nominative with article, dative with article, its verb of leaving
VEHICLES = {
    "train": ("der Zug", "dem Zug", "fährt"),
    "bus": ("der Bus", "dem Bus", "fährt"),
    "plane": ("das Flugzeug", "dem Flugzeug", "fliegt"),
    "night train": ("der Nachtzug", "dem Nachtzug", "fährt"),
}

# (English, German, the places it may use; None: any). The slots are those of slots() below.
TEMPLATES = [
    ("{a} meets {b} at the {place} in {city} on {day}.", "{a} trifft {b} am {day_de} {place_at} in {city_de}.", None),
    (
        "{a} buys {n} {obj} at the {place} at {hour} o'clock.",
        "{a} kauft um {hour_uhr} Uhr {n_de} {obj_de} {place_at}.",
        SHOPS,
    ),
    (
        "On {day}, {a} travels from {city} to {city2} by {vehicle}.",
        "Am {day_de} reist {a} mit {vehicle_dat} von {city_de} nach {city2_de}.",
        None,
    ),
    ("{a} calls {b} at {pod_hour} in the {pod}.", "{a} ruft {b} am {pod_de} um {pod_hour_de} an.", None),
    (
        "{a} gives {b} {n} {obj} for the trip to {city}.",
        "{a} gibt {b} {n_de} {obj_de} für die Reise nach {city_de}.",
        None,
    ),
    (
        "{a} and {b} visit the {place} in {city} on {day}.",
        "{a} und {b} besuchen am {day_de} {place_acc} in {city_de}.",
        SIGHTS,
    ),
    (
        "{a} found {n} {obj} near the {place} yesterday.",
        "{a} hat gestern {n_de} {obj_de} in der Nähe {place_gen} gefunden.",
        None,
    ),
    (
        "The {vehicle} to {city} leaves at {hour} on {day}.",
        "{Vehicle_de} nach {city_de} {vehicle_verb} am {day_de} um {hour_de} ab.",
        None,
    ),
    ("{a} has lived in {city} since {month}.", "{a} wohnt seit {month_de} in {city_de}.", None),
    (
        "In {month}, {a} and {b} fly from {city} to {city2}.",
        "Im {month_de} fliegen {a} und {b} von {city_de} nach {city2_de}.",
        None,
    ),
    ("{a} is waiting for {b} at the {place}.", "{a} wartet {place_at} auf {b}.", None),
    ("{a} walks to the {place} every {day} morning.", "{a} geht jeden {day_de}morgen zu Fuß {place_to}.", None),
    ("{a} sold {b} {n} {obj} for {price} euros.", "{a} hat {b} {n_de} {obj_de} für {price_de} Euro verkauft.", None),
    ("The {place} in {city} is closed on {day}s.", "{Place_de} in {city_de} ist {day_adv} geschlossen.", OPENING),
    (
        "The trip from {city} to {city2} takes {n} hours by {vehicle}.",
        "Die Reise von {city_de} nach {city2_de} dauert mit {vehicle_dat} {n_de} Stunden.",
        None,
    ),
    (
        "{a} wrote {b} a letter from {city} in {month}.",
        "{a} hat {b} im {month_de} einen Brief aus {city_de} geschrieben.",
        None,
    ),
    ("{a} works at the {place} in {city}.", "{a} arbeitet {place_at} in {city_de}.", WORKPLACES),
    (
        "{a} takes the bus to the {place} at {hour} o'clock.",
        "{a} fährt um {hour_uhr} Uhr mit dem Bus {place_to}.",
        None,
    ),
    ("Tomorrow {a} will show {b} the {place} in {city}.", "Morgen zeigt {a} {b} {place_acc} in {city_de}.", SIGHTS),
]


def slots(
    a="Anna",
    b="Ben",
    city="Paris",
    city2="Vienna",
    day="Monday",
    month="May",
    hour="ten",
    n="three",
    obj="keys",
    place="station",
    vehicle="train",
    price="twenty",
    pod="evening",
    pod_hour="eight",
):
    """English choices -> every slot a template can use, English and German."""
    at, to, acc, gen, nom = PLACES[place]
    vehicle_nom, vehicle_dat, vehicle_verb = VEHICLES[vehicle]
    return dict(
        a=a,
        b=b,
        city=city,
        city2=city2,
        day=day,
        month=month,
        hour=hour,
        n=n,
        obj=obj,
        place=place,
        vehicle=vehicle,
        price=price,
        pod=pod,
        pod_hour=pod_hour,
        city_de=CITIES[city],
        city2_de=CITIES[city2],
        day_de=DAYS[day],
        day_adv=DAYS[day].lower() + "s",  # montags
        month_de=MONTHS[month],
        hour_de=NUMBERS[hour],
        hour_uhr="ein" if hour == "one" else NUMBERS[hour],  # um ein Uhr
        n_de=NUMBERS[n],
        obj_de=OBJECTS[obj],
        place_at=at,
        place_to=to,
        place_acc=acc,
        place_gen=gen,
        Place_de=nom[0].upper() + nom[1:],
        Vehicle_de=vehicle_nom[0].upper() + vehicle_nom[1:],
        vehicle_dat=vehicle_dat,
        vehicle_verb=vehicle_verb,
        price_de=PRICES[price],
        pod_de=PARTS_OF_DAY[pod][0],
        pod_hour_de=NUMBERS[pod_hour],
    )


def render(template, s):
    """Template number `template` filled with the slots `s` (from slots()): an (English, German) pair."""
    english, german, _ = TEMPLATES[template]
    return english.format(**s), german.format(**s)


def random_sentence(rng):
    """One random (English, German) pair: a random template with random slots."""
    template = rng.randrange(len(TEMPLATES))
    a, b = rng.sample(sorted(PEOPLE), 2)
    city, city2 = rng.sample(sorted(CITIES), 2)
    pod = rng.choice(sorted(PARTS_OF_DAY))
    s = slots(
        a=a,
        b=b,
        city=city,
        city2=city2,
        day=rng.choice(list(DAYS)),
        month=rng.choice(list(MONTHS)),
        hour=rng.choice(list(NUMBERS)),
        n=rng.choice(COUNTS),
        obj=rng.choice(sorted(OBJECTS)),
        place=rng.choice(TEMPLATES[template][2] or sorted(PLACES)),
        vehicle=rng.choice(sorted(VEHICLES)),
        price=rng.choice(list(PRICES)),
        pod=pod,
        pod_hour=rng.choice(PARTS_OF_DAY[pod][1]),
    )
    return render(template, s)


# Spoken QA passages (English only), in the style of Spoken-SQuAD: every answer is a span of the passage.
# A passage is written as pieces; a piece (tag, words) marks a span that questions point to by its tag.
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
    obj, vehicle, event = rng.choice(sorted(OBJECTS)), rng.choice(sorted(VEHICLES)), rng.choice(EVENTS)
    she, her, her_poss = ("she", "her", "her") if PEOPLE[a] == "f" else ("he", "him", "his")
    evening_hour = rng.choice(PARTS_OF_DAY["evening"][1])
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
    return text, [(q, spans[tag][1], spans[tag][0]) for q, tag in rng.sample(questions, QUESTIONS_PER_PASSAGE)]


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


def plan_corpus(size="full", seed=SEED):
    """Every utterance to synthesise, as dicts. Texts are drawn split by split from one stream, and a text
    already drawn is never drawn again: no dev/test sentence or passage occurs in train (or twice anywhere)."""
    rng, seen, plan = random.Random(seed), set(), []
    for kind, make, prefix in (("sentences", random_sentence, "s"), ("qa", random_passage, "p")):
        number = 0
        for split, count in zip(
            ("train", "dev", "test"), SIZES[size]["sentences" if kind == "sentences" else "passages"]
        ):
            voices = [VOICE_PATTERN[i % len(VOICE_PATTERN)] for i in range(count)]
            rng.shuffle(voices)  # exact voice proportions in every split
            for speaker in voices:
                item = make(rng)
                while item[0] in seen:
                    item = make(rng)
                seen.add(item[0])
                number += 1
                job = dict(
                    kind=kind,
                    split=split,
                    audio=f"audio/{prefix}{number:05d}.wav",
                    text=item[0],
                    speaker=speaker,
                    speed=round(rng.uniform(*SPEED), 3),
                    pitch=round(rng.uniform(*PITCH), 3),
                )
                job.update(translation=item[1]) if kind == "sentences" else job.update(questions=item[1])
                plan.append(job)
    return plan
