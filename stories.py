"""Synthetic news stories for notebook 05: unlabelled text for gap-sentence pretraining, and (story, summary) pairs.

The paper's low-resource experiment (PEGASUS §6.3) pretrains on a large news corpus and fine-tunes on as few
as 10-1,000 labelled examples. Neither fits in a notebook that runs in minutes on a CPU, so this module makes
a small stand-in of the same shape: as many short news stories as you ask for, from templates of six kinds
(council votes, company deals, sports results, rescues, research findings, appointments) with invented
people, towns, companies and numbers. Surnames, towns and companies are built from syllables, so a held-out
story almost always names people and places that no training story mentions: a summarizer has to *copy*
them from its input, which GSG is meant to teach (the removed sentence has to be rebuilt from the rest).

Each story has a lead sentence with the key facts (half the stories open with a scene-setting sentence
instead, as feature stories do), a few sentences that repeat the entities with more detail, a quote, and
one distractor sentence about something else. Its summary restates the key facts in other words,
so the first sentence (Lead) is a good baseline but not the answer.

`entities(text)` picks out the story-specific facts a text states (its invented names and its numbers), so that
notebook 05 can measure whether a summary copied the right ones from its story.

This is toy data, not news: the templates are few and the language is narrow. It is only meant to make
the *mechanism* of the paper's experiment visible at a scale a laptop can train.
"""

import random
import re

_ONSETS = ["b", "br", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "sh", "j"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "t"]
_FIRST = ["Anna", "Ben", "Clara", "David", "Ella", "Frank", "Grace", "Hugo", "Ida", "Jack", "Kate", "Leo", "Maria",
          "Nina", "Omar", "Paul", "Rosa", "Sam", "Tara", "Victor", "Wendy", "Yusuf", "Zoe", "Adam", "Beth", "Carl"]
_TOWN_ENDS = ["ford", "ton", "bury", "field", "wick", "mouth", "dale", "stead", "port", "ham"]
_COMPANY_ENDS = ["Systems", "Foods", "Energy", "Motors", "Labs", "Logistics", "Bank", "Media", "Pharma", "Steel"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_FACILITIES = ["library", "bridge", "swimming pool", "bus station", "school", "hospital", "park", "market hall",
               "sports centre", "museum"]
_ROLES = ["chief executive", "chair", "director", "head coach", "principal", "editor", "president"]
_FIELDS = ["bees", "coral reefs", "sleep", "soil bacteria", "river fish", "solar cells", "memory", "wheat"]
_FINDINGS = ["live longer in cooler water", "recover faster than expected", "respond to low light",
             "grow twice as fast with less water", "can be predicted from a blood test", "travel further at night"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _name(rng: random.Random, syllables=(2, 3)) -> str:
    return "".join(_syllable(rng) for _ in range(rng.choice(syllables))).capitalize()


class _Entities:
    """Fresh invented names for one story."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def person(self) -> str:
        return f"{self.rng.choice(_FIRST)} {_name(self.rng, (2,))}"

    def town(self) -> str:
        return _name(self.rng, (1, 2)) + self.rng.choice(_TOWN_ENDS)

    def company(self) -> str:
        return f"{_name(self.rng, (2,))} {self.rng.choice(_COMPANY_ENDS)}"


def _surname(person: str) -> str:
    return person.split()[-1]


def _council(rng, e):
    town, mayor, fac, day = e.town(), e.person(), rng.choice(_FACILITIES), rng.choice(_DAYS)
    yes, cost = rng.randint(5, 9), rng.randint(2, 60)
    no = rng.randint(0, yes - 1)
    verb = rng.choice(["build a new", "close the old", "rebuild the"])
    facts = [f"The {town} council voted {yes} to {no} on {day} to {verb} {fac}.",
             f"The plan will cost {cost} million pounds, paid for by {town} taxpayers over ten years.",
             f"Mayor {mayor} said the plan for the {fac} was the right one for {town}.",
             f'"This is the right decision for {town}," {_surname(mayor)} told reporters after the vote.',
             f"Opponents said the {cost} million pounds should go to roads instead."]
    summary = rng.choice([f"{town} council votes to {verb} {fac} at a cost of {cost} million pounds.",
                          f"Mayor {mayor} wins a {yes} to {no} vote to {verb} {fac} in {town}."])
    return town, facts, summary


def _deal(rng, e):
    buyer, target, town, boss = e.company(), e.company(), e.town(), e.person()
    price, jobs, day = rng.randint(10, 900), rng.randint(2, 40) * 50, rng.choice(_DAYS)
    facts = [f"{buyer} agreed on {day} to buy {target} for {price} million dollars.",
             f"{target}, which is based in {town}, employs {jobs} people.",
             f"{buyer} chief executive {boss} said the deal would make {buyer} stronger.",
             f'"{target} is a great fit for us," {_surname(boss)} said, adding that no jobs in {town} would go.',
             f"Shares in {buyer} rose after the {price} million dollar deal was announced."]
    summary = rng.choice([f"{buyer} will buy {target} of {town} for {price} million dollars.",
                          f"{buyer} buys {target} for {price} million dollars, keeping {jobs} jobs in {town}."])
    return town, facts, summary


def _match(rng, e):
    home, away, player = e.town(), e.town(), e.person()
    a, b, goals = rng.randint(2, 6), rng.randint(0, 1), rng.randint(2, 3)
    coach, crowd = e.person(), rng.randint(3, 40) * 1000
    facts = [f"{home} beat {away} {a} to {b} on {rng.choice(_DAYS)} in front of {crowd} fans.",
             f"{player} scored {goals} goals for {home}, the first after ten minutes.",
             f"{away} had not lost a match since the start of the season.",
             f'"{_surname(player)} was brilliant today," said {home} coach {coach}.',
             f"The win moves {home} to the top of the league, one point ahead of {away}."]
    summary = rng.choice([f"{player} scores {goals} as {home} beat {away} {a} to {b}.",
                          f"{home} go top after a {a} to {b} win over {away}, with {goals} goals from {player}."])
    return home, facts, summary


def _rescue(rng, e):
    town, leader, n = e.town(), e.person(), rng.randint(2, 9)
    peak, hours = _name(rng) + " " + rng.choice(["Hill", "Peak", "Fell", "Ridge"]), rng.randint(3, 30)
    facts = [f"Rescuers from {town} found {n} missing walkers on {peak} after a search of {hours} hours.",
             f"The {n} walkers had lost their way in thick fog on {peak} on Saturday evening.",
             f"{town} rescue team leader {leader} said the walkers were cold but unhurt.",
             f'"They did the right thing by staying together," {_surname(leader)} said.',
             f"The {town} team has been called out to {peak} four times this year."]
    summary = rng.choice([f"{n} walkers lost on {peak} are found safe by the {town} rescue team.",
                          f"The {town} rescue team finds {n} walkers on {peak} after {hours} hours."])
    return town, facts, summary


def _study(rng, e):
    town, lead, field, finding = e.town(), e.person(), rng.choice(_FIELDS), rng.choice(_FINDINGS)
    n = rng.randint(2, 90) * 10
    facts = [f"Scientists at the University of {town} say {field} {finding}.",
             f"The team, led by professor {lead}, studied {n} samples over three years.",
             f"{lead} said the result surprised the {town} team.",
             f'"We did not expect {field} to behave like this," {_surname(lead)} said.',
             f"Other researchers want to repeat the {town} study of {field} before drawing conclusions."]
    summary = rng.choice([f"A {town} study of {n} samples finds that {field} {finding}.",
                          f"Professor {lead} of {town} finds that {field} {finding}."])
    return town, facts, summary


def _appointment(rng, e):
    org, new, old, role = e.company(), e.person(), e.person(), rng.choice(_ROLES)
    town, years = e.town(), rng.randint(3, 25)
    facts = [f"{org} has named {new} as its new {role}, replacing {old}.",
             f"{old} is leaving after {years} years at {org} in {town}.",
             f"{new} joins {org} from a rival firm and will start next month.",
             f'"I am proud to lead {org}," {_surname(new)} said in a statement.',
             f"{org} said {old} would stay on as an adviser until the end of the year."]
    summary = rng.choice([f"{new} replaces {old} as {role} of {org}.",
                          f"{org} names {new} {role} after {years} years of {old}."])
    return town, facts, summary


KINDS = {"council": _council, "deal": _deal, "match": _match, "rescue": _rescue, "study": _study,
         "appointment": _appointment}


def _distractor(rng, e, town) -> str:
    return rng.choice([f"Elsewhere, {e.person()} opened a new cafe in {e.town()} this week.",
                       f"Roadworks on the {e.town()} road are expected to last until {rng.choice(_DAYS)}.",
                       f"The weather in {town} is expected to stay {rng.choice(['dry', 'wet', 'cold', 'warm'])}.",
                       f"A separate meeting about parking in {e.town()} was postponed.",
                       f"Tickets for the {e.town()} summer fair go on sale next week."])


def _scene(rng, town) -> str:
    return rng.choice([f"It was a {rng.choice(['grey', 'bright', 'windy', 'quiet'])} morning in {town}.",
                       f"Few people in {town} expected the news this week.",
                       f"The mood in {town} has changed in recent days."])


def story(rng: random.Random, kind: str | None = None) -> tuple[str, str]:
    """One (story, summary) pair; kind: one of KINDS, or None for a random one."""
    e = _Entities(rng)
    town, facts, summary = KINDS[kind or rng.choice(sorted(KINDS))](rng, e)
    lead, details = facts[0], facts[1:4]  # the fifth sentence of each template is left for longer stories
    details.insert(rng.randint(1, len(details)), _distractor(rng, e, town))  # never before the first detail
    sentences = [lead] + details
    if rng.random() < 0.5:  # feature-style opening: the key facts are not in the first sentence
        sentences.insert(0, _scene(rng, town))
    return " ".join(sentences), summary


# The capitalised words the templates themselves write (sentence openings, titles, days, company and landmark
# endings): everything else capitalised in a story is a name made up for that story, first names included.
TEMPLATE_CAPITALS = {
    "A", "Bank", "Elsewhere", "Energy", "Fell", "Few", "Foods", "Friday", "Hill", "I", "It", "Labs", "Logistics",
    "Mayor", "Media", "Monday", "Motors", "Opponents", "Other", "Peak", "Pharma", "Professor", "Rescuers", "Ridge",
    "Roadworks", "Saturday", "Scientists", "Shares", "Steel", "Sunday", "Systems", "The", "They", "This",
    "Thursday", "Tickets", "Tuesday", "University", "We", "Wednesday"}


def entities(text: str) -> set[str]:
    """The story-specific facts a text states: its names (capitalised words that are not template words) and its
    numbers. A summary of a new story can only get these right by copying them from the story, so comparing a
    summary's entities with its story's and its reference's measures copying (notebook 05)."""
    words = re.findall(r"[A-Za-z]+|[0-9]+", text)
    return {w for w in words if w.isdigit() or (w[0].isupper() and w not in TEMPLATE_CAPITALS)}


def stories(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (story, summary) pairs, reproducible from seed."""
    rng = random.Random(seed)
    return [story(rng) for _ in range(n)]
