"""stories.entities finds exactly the made-up names and the numbers, so notebook 05's copy rates count facts.

The expected names are not taken from entities() itself: a made-up name is recognised here by the way
stories.py builds it (syllables of onset + vowel + optional coda, a town ending on towns) or as one of its
first names. If a template gains a capitalised word and TEMPLATE_CAPITALS is not updated, that word shows
up as an "entity" that is neither, and the first test fails naming it.
"""

import random
import re

import stories


def made_up_name(word: str) -> bool:
    """True if `word` is built the way stories._name (and _Entities.town) builds names."""
    onset = "|".join(sorted(stories._ONSETS, key=len, reverse=True))  # "sh" before "s"
    vowel = "|".join(set(stories._VOWELS))
    coda = "|".join(c for c in set(stories._CODAS) if c)
    ending = "|".join(stories._TOWN_ENDS)
    return re.fullmatch(rf"(?:(?:{onset})(?:{vowel})(?:{coda})?){{1,3}}(?:{ending})?", word.lower()) is not None


def test_entities_are_the_made_up_names_and_the_numbers():
    for text, summary in stories.stories(500, seed=3):
        for word in stories.entities(text) | stories.entities(summary):
            assert word.isdigit() or word in stories._FIRST or made_up_name(word), (
                f"{word!r} counted as an entity but is neither a number nor a made-up name (in: {text})")


def test_template_words_are_not_entities():
    text = "The Mayor said on Monday that Professor Anna Tuben of the University of Vemouth paid 40 million."
    assert stories.entities(text) == {"Anna", "Tuben", "Vemouth", "40"}


def test_every_fact_of_a_summary_is_in_its_story():
    # The summaries restate the story's facts, so a perfect copier can reach 100% recall from the story alone:
    # a summary's missed entities in notebook 05 are the model's, not the data's.
    rng = random.Random(4)
    for kind in stories.KINDS:
        for _ in range(50):
            text, summary = stories.story(rng, kind)
            assert stories.entities(summary) <= stories.entities(text), (kind, text, summary)
