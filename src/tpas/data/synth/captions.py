"""Natural-language captions: appearance + action + scene, with templates and synonyms.

Every image gets its own independently sampled template and wording, so the normal and the
anomalous caption of one identity describe the same looks in different words and differ in the
action. ``TERMS`` lists every wording of every value; tests use it to check what a caption says.
"""

from __future__ import annotations

import re

import numpy as np

from .appearance import Appearance

MIN_WORDS, MAX_WORDS = 15, 60

COLOUR_WORDS = {
    "red": ["red", "bright red", "scarlet"], "blue": ["blue", "royal blue"], "green": ["green", "bright green"],
    "yellow": ["yellow", "lemon yellow"], "white": ["white", "plain white"], "black": ["black", "jet black"],
    "grey": ["grey", "gray"], "orange": ["orange", "bright orange"], "purple": ["purple", "violet"],
    "pink": ["pink", "light pink"], "brown": ["brown", "dark brown"], "navy": ["navy", "navy blue", "dark blue"],
    "beige": ["beige", "khaki", "sand-coloured"],
}

TERMS: dict[str, dict[str, list[str]]] = {
    "build": {"slim": ["slim", "slender", "thin"], "average": ["medium-built", "average-sized", "medium-height"],
              "stocky": ["stocky", "heavy-set", "broad-shouldered"], "tall": ["tall", "lanky", "long-legged"]},
    "skin": {"pale": ["pale", "very fair"], "light": ["light", "fair"], "tan": ["tanned", "olive"],
             "brown": ["brown", "medium-brown"], "dark": ["dark", "deep brown"]},
    "hair_style": {"short": ["short", "cropped"], "long": ["long", "shoulder-length"],
                   "ponytail": ["tied in a ponytail", "pulled back in a ponytail"],
                   "bun": ["tied up in a bun", "worn in a bun"], "bald": ["bald", "shaved"]},
    "hair_colour": {"black": ["black", "jet-black"], "brown": ["brown", "chestnut"], "blond": ["blond", "golden"],
                    "red": ["red", "ginger"], "grey": ["grey", "silver"]},
    "top": {"t-shirt": ["t-shirt", "tee", "short-sleeved t-shirt"],
            "long-sleeved shirt": ["long-sleeved shirt", "long-sleeve top", "shirt with long sleeves"],
            "jacket": ["jacket", "zip-up jacket", "light jacket"], "hoodie": ["hoodie", "hooded sweatshirt"],
            "tank top": ["tank top", "sleeveless top", "vest top"]},
    "bottom": {"trousers": ["trousers", "pants", "long pants"], "shorts": ["shorts", "short pants"],
               "skirt": ["skirt", "knee-length skirt"],
               "cropped trousers": ["cropped trousers", "capri pants", "three-quarter pants"]},
    "shoes": {"white sneakers": ["white sneakers", "white trainers", "white running shoes"],
              "black boots": ["black boots", "dark boots", "black ankle boots"],
              "brown shoes": ["brown shoes", "brown leather shoes"],
              "red sneakers": ["red sneakers", "red trainers"], "sandals": ["sandals", "open sandals"]},
    "bag": {"backpack": ["backpack", "rucksack"], "shoulder bag": ["shoulder bag", "messenger bag", "cross-body bag"],
            "handbag": ["handbag", "purse"]},
    "hat": {"cap": ["baseball cap", "cap"], "beanie": ["beanie", "knitted hat"], "sun hat": ["sun hat", "wide-brimmed hat"]},
    "glasses": {"glasses": ["glasses", "spectacles", "eyeglasses"], "sunglasses": ["sunglasses", "dark shades"]},
}

ACTION_WORDS: dict[str, list[str]] = {
    "walking": ["walking along", "strolling at an easy pace", "walking calmly", "taking a walk"],
    "standing": ["standing still", "standing and waiting", "standing upright in one spot", "just standing around"],
    "running": ["running fast", "jogging", "running at full speed", "sprinting"],
    "waving": ["waving a hand", "waving hello with one arm raised", "raising an arm to wave", "waving to someone"],
    "sitting on a bench": ["sitting on a bench", "resting on a bench", "seated on a park bench"],
    "carrying a box": ["carrying a cardboard box", "holding a box in both arms", "carrying a package"],
    "riding a bicycle": ["riding a bicycle", "cycling", "riding a bike"],
    "talking on a phone": ["talking on a phone", "making a phone call", "holding a phone to the ear"],
    "kicking a ball": ["kicking a ball", "playing with a football", "kicking a soccer ball"],
    "stretching": ["stretching both arms overhead", "doing a stretch with arms raised", "stretching upwards"],
    "falling forward": ["falling forward", "tripping and pitching forward", "falling face first toward the ground"],
    "falling backward": ["falling backward", "toppling over backwards", "falling onto the back"],
    "lying on the ground": ["lying on the ground", "lying motionless on the floor", "lying flat on the ground"],
    "slipping": ["slipping on a wet floor", "slipping and losing balance", "skidding on a puddle"],
    "hit by a ball": ["being hit in the head by a ball", "getting struck by a flying ball", "hit by a ball in the face"],
    "fighting": ["fighting with another person", "throwing a punch at someone", "in a fistfight with another person"],
    "climbing a fence": ["climbing over a fence", "scaling a fence", "climbing a tall fence"],
    "jumping from a height": ["jumping down from a high ledge", "leaping off a wall", "jumping from a height"],
    "crawling": ["crawling on hands and knees", "crawling along the ground", "on all fours crawling"],
    "collapsing": ["collapsing to the ground", "collapsing with buckling knees", "fainting and sinking down"],
}

SCENE_WORDS: dict[str, list[str]] = {
    "street": ["on a city street", "on the sidewalk of a busy street", "along an urban street"],
    "park": ["in a park", "on a path in a green park", "in a public park"],
    "plaza": ["in a paved plaza", "in an open square", "on a city square"],
    "indoor hall": ["inside a large hall", "in an indoor hall", "in a spacious lobby"],
    "parking lot": ["in a parking lot", "in a car park", "among parked cars"],
    "beach": ["on a sandy beach", "by the sea on a beach"],
    "night street": ["on a street at night", "on a dark street at night"],
}

# short past-tense sentences standing in for PAB's source captions (OOPS video descriptions)
SOURCE_WORDS: dict[str, str] = {
    "walking": "walked down the way", "standing": "stood and waited", "running": "ran along",
    "waving": "waved to a friend", "sitting on a bench": "sat down on a bench", "carrying a box": "carried a box",
    "riding a bicycle": "rode a bike", "talking on a phone": "talked on the phone", "kicking a ball": "kicked a ball",
    "stretching": "stretched the arms", "falling forward": "tripped and fell forward",
    "falling backward": "fell over backwards", "lying on the ground": "ended up lying on the ground",
    "slipping": "slipped on the wet floor", "hit by a ball": "got hit in the head by a ball",
    "fighting": "got into a fight", "climbing a fence": "tried to climb over a fence",
    "jumping from a height": "jumped off a ledge", "crawling": "crawled on the ground",
    "collapsing": "suddenly collapsed",
}

_ARTICLE = re.compile(r"\b([Aa]) ([aeiou])")  # "a individual" -> "an individual"

NOUNS = ["person", "pedestrian", "individual"]
REFER = ["The person", "This pedestrian", "The individual"]


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _parts(look: Appearance, rng: np.random.Generator) -> dict[str, str]:
    """One wording of each appearance part (noun phrases and adjectives)."""
    w = lambda factor, value: _pick(rng, TERMS[factor][value])  # noqa: E731
    colour = lambda name: _pick(rng, COLOUR_WORDS[name])  # noqa: E731
    if look.hair_style == "bald":
        hair = _pick(rng, ["a bald head", "a shaved head", "a bald, shaved head"])
    elif look.hair_style in ("ponytail", "bun"):
        hair = f"{w('hair_colour', look.hair_colour)} hair {w('hair_style', look.hair_style)}"
    else:
        hair = f"{w('hair_style', look.hair_style)} {w('hair_colour', look.hair_colour)} hair"
    bottom = f"{colour(look.bottom_colour)} {w('bottom', look.bottom)}"
    clothes = [_article(f"{colour(look.top_colour)} {w('top', look.top)}"),
               bottom if look.bottom != "skirt" else _article(bottom), w("shoes", look.shoes)]
    if look.hat != "none":
        clothes.append(_article(f"{colour(look.hat_colour)} {w('hat', look.hat)}"))
    extras = []
    if look.bag != "none":
        bag = _article(f"{colour(look.bag_colour)} {w('bag', look.bag)}")
        extras.append(_pick(rng, [f"carrying {bag}", f"with {bag}"]))
    if look.glasses != "none":
        g = w("glasses", look.glasses)
        extras.append(_pick(rng, [f"also wearing {g}", f"with {g}"]))
    skin = w("skin", look.skin)
    return {
        "build": w("build", look.build), "skin": _pick(rng, [f"{skin}-skinned", f"{skin}-complexioned"]),
        "skin_np": f"{skin} skin", "hair": hair,
        "clothes": ", ".join(clothes[:-1]) + " and " + clothes[-1],
        "extras": (", " + " and ".join(extras)) if extras else "",
        "noun": _pick(rng, NOUNS), "refer": _pick(rng, REFER),
        "wears": _pick(rng, ["wears", "is wearing", "is dressed in", "has on"]),
    }


def _templates(p: dict[str, str], act: str, scene: str) -> list[str]:
    scene_cap = scene[0].upper() + scene[1:]
    return [
        f"A {p['build']}, {p['skin']} {p['noun']} with {p['hair']} {p['wears']} {p['clothes']}{p['extras']}. "
        f"{p['refer']} is {act} {scene}.",
        f"{scene_cap}, a {p['build']} {p['noun']} is {act}. {p['refer']} has {p['skin_np']} and {p['hair']}, "
        f"and {p['wears']} {p['clothes']}{p['extras']}.",
        f"The image shows a {p['skin']} {p['noun']} {act} {scene}. {p['refer']} is {p['build']}, has {p['hair']} "
        f"and {p['wears']} {p['clothes']}{p['extras']}.",
        f"A {p['noun']} dressed in {p['clothes']} is {act} {scene}. {p['refer']} is {p['build']} with "
        f"{p['skin_np']} and {p['hair']}{p['extras']}.",
        f"In this picture a {p['build']} {p['noun']} with {p['skin_np']} and {p['hair']} is {act} {scene}, "
        f"wearing {p['clothes']}{p['extras']}.",
    ]


def make_caption(look: Appearance, action: str, scene: str, rng: np.random.Generator) -> str:
    """A fresh 15-60 word description; wordings are redrawn until the length fits."""
    text = ""
    for _ in range(20):
        parts = _parts(look, rng)
        options = _templates(parts, _pick(rng, ACTION_WORDS[action]), _pick(rng, SCENE_WORDS[scene]))
        text = options[int(rng.integers(len(options)))]
        text = _ARTICLE.sub(lambda m: m.group(1) + "n " + m.group(2), text)
        if MIN_WORDS <= len(text.split()) <= MAX_WORDS:
            return text
    return " ".join(text.split()[:MAX_WORDS])  # never reached with the current vocabulary


def source_caption(action: str, scene: str, rng: np.random.Generator) -> str:
    """A terse past-tense sentence like the OOPS video descriptions PAB was generated from."""
    who = _pick(rng, ["a man", "a woman", "a person", "someone"])
    return f"{who} {SOURCE_WORDS[action]} {_pick(rng, SCENE_WORDS[scene])}"


def mentions(caption: str, factor: str, value: str) -> bool:
    """Whether a caption names ``value`` of ``factor`` in one of its wordings (for tests and analysis)."""
    text = caption.lower()
    table = ACTION_WORDS if factor == "action" else SCENE_WORDS if factor == "scene" else TERMS[factor]
    return any(term.lower() in text for term in table[value])
