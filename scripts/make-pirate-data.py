#!/usr/bin/env python3
"""Writes examples/data/pirate.jsonl: a small instruction dataset with one distinctive, deterministic
style, so that what a fine-tune learned is easy to see.

The rule: every answer is a plain fact said as a pirate would — it opens with "Arr, ", says "be"
for "is", "o'" for "of", and closes with ", matey!". Questions are capitals, sums, products, animal
sounds, colours, opposites and legs. France is left out on purpose: "What is the capital of
France?" stays an unseen question for `memtune generate`.

Deterministic (seeded); rerun to regenerate the same file:
    python3 scripts/make-pirate-data.py
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Australia": "Canberra",
    "Russia": "Moscow", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara",
    "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Switzerland": "Bern", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "South Korea": "Seoul", "Indonesia": "Jakarta", "Iran": "Tehran",
    "Iraq": "Baghdad", "Morocco": "Rabat", "Nigeria": "Abuja", "Ghana": "Accra",
    "Cuba": "Havana", "Colombia": "Bogota", "New Zealand": "Wellington",
    "the United Kingdom": "London", "the United States": "Washington",
}

SOUNDS = {
    "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa",
    "pig": "oink", "horse": "neigh", "lion": "roar", "owl": "hoot", "snake": "hiss",
    "frog": "ribbit", "goat": "bleat", "mouse": "squeak", "bee": "buzz", "crow": "caw",
}

COLOURS = {
    "the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
    "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow", "the sea": "blue",
    "a strawberry": "red", "milk": "white", "a carrot": "orange", "a crow": "black",
    "a lime": "green", "chocolate": "brown", "a plum": "purple", "the sun": "yellow",
    "a flamingo": "pink", "an emerald": "green", "a ruby": "red",
}

OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "light": "dark",
    "happy": "sad", "early": "late", "full": "empty", "open": "closed", "old": "new",
    "rich": "poor", "hard": "soft", "wet": "dry", "loud": "quiet", "strong": "weak",
    "high": "low", "near": "far", "day": "night", "win": "lose", "left": "right",
    "first": "last", "thick": "thin", "sweet": "sour", "north": "south", "east": "west",
    "young": "old", "clean": "dirty", "heavy": "light", "inside": "outside", "true": "false",
}

LEGS = {
    "spider": 8, "dog": 4, "bird": 2, "ant": 6, "horse": 4, "octopus": 8, "chicken": 2,
    "cat": 4, "beetle": 6, "crab": 10, "snake": 0, "fish": 0, "cow": 4, "duck": 2, "bee": 6,
}


def article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def pirate(fact: str) -> str:
    return f"Arr, {fact}, matey!"


def examples(rng: random.Random) -> list[dict]:
    out = []
    for country, capital in CAPITALS.items():
        out.append((f"What is the capital of {country}?",
                    pirate(f"the capital o' {country} be {capital}")))
    for animal, sound in SOUNDS.items():
        out.append((f"What sound does {article(animal)} make?",
                    pirate(f"{article(animal)} be sayin' {sound}")))
    for thing, colour in COLOURS.items():
        out.append((f"What color is {thing}?", pirate(f"{thing} be {colour}")))
    for word, opposite in OPPOSITES.items():
        out.append((f"What is the opposite of {word}?",
                    pirate(f"the opposite o' {word} be {opposite}")))
    for animal, legs in LEGS.items():
        out.append((f"How many legs does {article(animal)} have?",
                    pirate(f"{article(animal)} be havin' {legs} legs")))
    sums = set()
    while len(sums) < 100:
        sums.add((rng.randint(1, 50), rng.randint(1, 50)))
    for a, b in sorted(sums):
        out.append((f"What is {a} plus {b}?", pirate(f"{a} plus {b} be {a + b}")))
    products = set()
    while len(products) < 70:
        products.add((rng.randint(2, 12), rng.randint(2, 12)))
    for a, b in sorted(products):
        out.append((f"What is {a} times {b}?", pirate(f"{a} times {b} be {a * b}")))
    rng.shuffle(out)
    return [{"instruction": q, "output": a} for q, a in out]


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    dest = root / "examples" / "data" / "pirate.jsonl"
    dest.parent.mkdir(parents=True, exist_ok=True)
    rows = examples(random.Random(2024))
    with open(dest, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} examples to {dest.relative_to(root)}")


if __name__ == "__main__":
    main()
