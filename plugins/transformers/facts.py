"""Documents of invented facts and questions about them, for RAG demos and benchmarks.

Deterministic for a seed, in English, about people who do not exist (so a model can
answer only from the documents): each document is about one person, their city, job,
pet, favourite colour and instrument, restated among notes about them. A question asks
one fact of one person; the query ends with the start of the answer (the fact's
sentence up to its value), so the answer's first word is checkable. Prompts use the
model's chat template as segments: the instruction (system message and the opening of
the user's turn), the documents, and the query (question, end of turn, answer start)::

    corpus = FactCorpus(tokenizer, seed=0)
    docs = corpus.documents(8, tokens=512)
    prompt = corpus.prompt([docs[3], docs[0]], docs[3].facts[2])
    kv.generate(segments=prompt.segments, max_new_tokens=12)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

FIRST = ("Alder", "Brisa", "Corvin", "Delphine", "Eskel", "Fenna", "Galen", "Hesper",
         "Ilse", "Joran", "Kestra", "Lorcan", "Maren", "Nils", "Orla", "Pavel", "Quilla",
         "Rurik", "Sabine", "Tamsin", "Ulric", "Vesna", "Wendel", "Yara")  # fmt: skip
LAST = ("Ashcombe", "Brightwater", "Coldmere", "Dunhollow", "Eastgate", "Fairbrook",
        "Greywick", "Hollowell", "Ironside", "Kettering", "Larkspur", "Marlowe",
        "Northcott", "Oakhurst", "Pennywhistle", "Quarrington", "Ravensworth",
        "Stonebridge", "Thornbury", "Underwood", "Vantreight", "Whitlock")  # fmt: skip
ATTRIBUTES = {
    "city": (("Lisbon", "Oslo", "Cairo", "Lima", "Hanoi", "Dublin", "Nairobi", "Quito",
              "Vienna", "Perth"), "{name} lives in the city of {value}.",
             "In which city does {name} live?"),
    "job": (("baker", "pilot", "dentist", "farmer", "painter", "lawyer", "nurse",
             "plumber", "teacher", "sailor"), "{name} works as a {value}.",
            "What is the job of {name}?"),
    "pet": (("parrot", "rabbit", "tortoise", "goldfish", "hamster", "ferret", "pony",
             "lizard", "goat", "owl"), "{name} keeps a pet {value}.",
            "What pet does {name} keep?"),
    "colour": (("red", "green", "blue", "yellow", "purple", "orange", "black", "white",
                "silver", "brown"), "The favourite colour of {name} is {value}.",
               "What is the favourite colour of {name}?"),
    "instrument": (("violin", "piano", "guitar", "flute", "drums", "cello", "trumpet",
                    "harp", "banjo", "accordion"), "{name} plays the {value}.",
                   "Which instrument does {name} play?"),
}  # fmt: skip
SYSTEM = (
    "You are a careful assistant. The user gives you documents about people and asks a "
    "question about one of them. Answer with the fact from the documents, in a few words."
)
QUERY_LEAD = (
    "That is all of the documents. Using only the facts in the documents above, and no "
    "other knowledge, answer the following question in one short sentence. Question: "
)
NOTES = (
    "{name} was born in a small village by the sea.", "{name} enjoys long walks on Sundays.",
    "{name} reads the newspaper every morning.", "Friends say {name} is kind and patient.",
    "{name} once travelled across the mountains by train.", "{name} likes to cook soup.",
    "Every summer {name} visits an old friend.", "{name} collects postcards from abroad.",
    "{name} writes letters by hand.", "{name} has two brothers and a sister.",
)  # fmt: skip


@dataclass(frozen=True)
class Fact:
    name: str
    attribute: str
    value: str

    @property
    def question(self) -> str:
        return ATTRIBUTES[self.attribute][2].format(name=self.name)


@dataclass(frozen=True)
class Document:
    text: str
    ids: list[int]
    facts: list[Fact]
    """The facts whose sentence lies wholly inside ``ids``."""


@dataclass(frozen=True)
class Prompt:
    segments: list[list[int]]
    """The instruction, the documents, then the query (the last segment)."""
    fact: Fact

    @property
    def ids(self) -> list[int]:
        return [t for segment in self.segments for t in segment]


class FactCorpus:
    """Documents and questions for a tokenizer with a chat template."""

    def __init__(self, tokenizer: Any, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        self.used: set[str] = set()
        head = tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\x00"}],
            tokenize=False,
        )
        self.instruction_text = head.split("\x00")[0] + "Here are the documents.\n"
        self.instruction = self.encode(self.instruction_text)
        closing = tokenizer.apply_chat_template(
            [{"role": "user", "content": "\x00"}], tokenize=False, add_generation_prompt=True
        )
        self.closing = closing.split("\x00")[1]

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _person(self) -> str:
        while True:
            name = f"{self.rng.choice(FIRST)} {self.rng.choice(LAST)}"
            if name not in self.used:
                self.used.add(name)
                return name

    def document(self, number: int, tokens: int = 512) -> Document:
        """One document of exactly ``tokens`` tokens about one invented person: their
        facts, then the facts again among notes that state none (cut to length)."""
        name = self._person()
        text = f"\nDocument {number}: about {name}."
        facts: list[Fact] = []
        for attribute in self.rng.sample(sorted(ATTRIBUTES), len(ATTRIBUTES)):
            values, sentence, _ = ATTRIBUTES[attribute]
            fact = Fact(name, attribute, self.rng.choice(values))
            text += " " + sentence.format(name=name, value=fact.value)
            facts.append(fact)
        notes = [n.format(name=name) for n in NOTES]
        stated = [ATTRIBUTES[f.attribute][1].format(name=name, value=f.value) for f in facts]
        while len(self.encode(text)) < tokens:
            self.rng.shuffle(notes)
            text += " " + " ".join([*notes[:2], self.rng.choice(stated)])
        ids = self.encode(text)[:tokens]
        kept = self.decode(ids)
        inside = [f for f in facts if ATTRIBUTES[f.attribute][1].format(
            name=f.name, value=f.value) in kept]  # fmt: skip
        return Document(kept, ids, inside)

    def documents(self, count: int, tokens: int = 512) -> list[Document]:
        return [self.document(i + 1, tokens) for i in range(count)]

    def query(self, fact: Fact) -> list[int]:
        """The question, the end of the user's turn and the start of the answer (the
        fact's sentence up to its value), so that the answer's first word is the fact."""
        sentence = ATTRIBUTES[fact.attribute][1].format(name=fact.name, value="\x00")
        return self.encode(QUERY_LEAD + fact.question + self.closing + sentence.split(" \x00")[0])

    def prompt(self, documents: list[Document], fact: Fact) -> Prompt:
        return Prompt([self.instruction, *(d.ids for d in documents), self.query(fact)], fact)

    def correct(self, answer: str, fact: Fact) -> bool:
        """Whether ``answer`` (what follows the query) starts with ``fact``'s value."""
        words = "".join(c.lower() if c.isalnum() else " " for c in answer).split()
        return words[:1] == [fact.value.lower()]
