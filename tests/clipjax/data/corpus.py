"""Deterministic text corpora for tokenizer parity tests and benchmarks.

``captions(n, seed)`` imitates web/COCO image captions (mostly plain English, with the
occasional curly apostrophe, accent, ``&amp;``, em dash, hashtag or emoji that real alt-text
has). ``mixed_corpus(n, seed)`` is adversarial: scripts, emoji, HTML entities, mojibake,
ligatures, control characters, odd whitespace, numbers, special-token look-alikes, very long
and empty strings, random code points, and mixtures of all of these.
"""
from __future__ import annotations

import random

NOUNS = """dog cat man woman child boy girl baby horse cow sheep bird duck eagle owl fish shark
whale elephant giraffe zebra lion tiger bear panda monkey rabbit squirrel deer fox wolf car truck
bus train bicycle motorcycle boat ship airplane helicopter tractor skateboard surfboard kite
umbrella bench table chair sofa bed lamp clock vase bottle cup glass plate bowl pizza sandwich
burger salad cake donut apple banana orange broccoli carrot laptop phone keyboard television
camera book guitar piano violin drum ball frisbee racket bat glove hat shirt dress jacket shoes
backpack suitcase tree flower garden forest mountain river lake ocean beach desert island bridge
building house church castle tower street road sidewalk park field farm kitchen bathroom bedroom
office restaurant market city village skyline sunset sunrise sky cloud rain snow storm fireworks
statue painting poster logo icon pattern texture wallpaper portrait landscape""".split()
ADJECTIVES = """red blue green yellow white black brown pink purple orange gray golden silver
small large tiny huge old young new vintage modern rustic beautiful cute happy smiling sad angry
wooden metal plastic glass stone wet dry sunny cloudy snowy foggy dark bright colorful empty
crowded busy quiet abstract realistic minimalist elegant luxury cozy fresh delicious
handmade antique retro futuristic""".split()
VERBS = """sitting standing walking running jumping eating drinking playing riding holding
carrying looking sleeping lying swimming flying driving reading writing cooking smiling laughing
dancing singing climbing skiing surfing skating posing waiting""".split()
PLACES = """in the park|on the beach|in a kitchen|on a city street|in the snow|at night|in the
forest|near a lake|on a table|in front of a building|at the airport|on a farm|in a living room|at
sunset|under a tree|next to a window|on the grass|in the rain|at the zoo|in a field""".replace(
    "\n", " ").split("|")
CITIES = """London Paris New York Tokyo Berlin Sydney Rome Madrid Toronto Chicago Seattle Boston
Amsterdam Prague Vienna Dublin Lisbon Barcelona Moscow Istanbul""".split()
BRANDS = "Nike Adidas Apple Samsung Sony Canon Nikon Ford BMW Toyota IKEA LEGO Disney".split()
ARTICLES = ["a", "the", "two", "three", "some", "an old", "a young", "several", "many"]
PRODUCTS = ["T-Shirt", "Hoodie", "Mug", "Poster", "Phone Case", "Sticker", "Canvas Print",
            "Sneakers", "Backpack", "Watch", "Lamp", "Throw Pillow", "Tote Bag"]
SIZES = ["S", "M", "L", "XL", "XXL", "10x8", "24 x 36", "11oz", "500ml"]
HASHTAGS = ["#nature", "#travel", "#photography", "#love", "#instagood", "#art", "#food",
            "#dogsofinstagram", "#sunset", "#fashion", "#vintage", "#design"]
SPICE = ["Don\u2019t", "caf\u00e9", "na\u00efve", "Beyonc\u00e9", "r\u00e9sum\u00e9", "&amp;",
         "\u2014", "\u201cquoted\u201d", "\u2764\ufe0f", "\U0001f436", "M\u00fcnchen",
         "S\u00e3o Paulo", "\u00bd price", "25\u00b0C", "&#39;", "&quot;hi&quot;"]


def _caption(rng: random.Random) -> str:
    n, a, v, p = (rng.choice(NOUNS), rng.choice(ADJECTIVES), rng.choice(VERBS),
                  rng.choice(PLACES))
    kind = rng.random()
    if kind < 0.40:    # COCO style
        s = rng.choice([
            f"{rng.choice(ARTICLES)} {a} {n} {v} {p}",
            f"A {a} {n} {v} next to a {rng.choice(NOUNS)}",
            f"{rng.choice(ARTICLES)} {n}s and a {rng.choice(NOUNS)} {p}",
            f"A close up of a {a} {n} on a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}",
            f"There is a {n} that is {v} {p}",
            f"A {n} {v} while a {rng.choice(NOUNS)} is {rng.choice(VERBS)} {p}",
        ])
        s = s[0].upper() + s[1:] + rng.choice([".", "", " .", "."])
    elif kind < 0.70:  # product / alt text
        s = rng.choice([
            f"{rng.choice(BRANDS)} {a.title()} {n.title()} {rng.choice(PRODUCTS)} - Size "
            f"{rng.choice(SIZES)}",
            f"{a.title()} {n.title()} {rng.choice(PRODUCTS)} | {rng.choice(BRANDS)} Store",
            f"Men's {a} {rng.choice(PRODUCTS).lower()}, {rng.randint(2, 99)}% off",
            f"{rng.randint(1, 6)} Bedroom House for Sale in {rng.choice(CITIES)}, "
            f"${rng.randint(100, 999)},{rng.randint(100, 999)}",
            f"IMG_{rng.randint(1000, 9999)}.JPG",
            f"{a.title()} {n} wallpaper {rng.choice(['1920x1080', '4K', 'HD', '2560x1440'])}",
            f"Vintage {rng.randint(1950, 1999)}s {a.title()} {rng.choice(BRANDS)} {n.title()}",
        ])
    elif kind < 0.85:  # stock photo title
        s = (f"Stock Photo - {a.title()} {n} {v} {p} in {rng.choice(CITIES)}, "
             f"{rng.choice(['royalty free', 'high resolution', 'editorial', 'image'])} "
             f"{rng.randint(10000, 99999999)}")
    else:              # social
        s = (f"{rng.choice(['Our', 'My', 'This'])} {a} {n} {v} {p}! "
             + " ".join(rng.sample(HASHTAGS, rng.randint(1, 4))))
    if rng.random() < 0.08:
        words = s.split(" ")
        words.insert(rng.randrange(len(words) + 1), rng.choice(SPICE))
        s = " ".join(words)
    return s


def captions(n: int, seed: int = 0) -> list[str]:
    """``n`` realistic image captions, deterministic in ``seed``."""
    rng = random.Random(seed)
    return [_caption(rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Adversarial corpus
# ---------------------------------------------------------------------------------------------

CHINESE = ["一只狗在草地上奔跑", "城市的夜景非常美丽", "我爱北京天安门", "这是一张照片。",
           "红色的汽车停在路边", "春眠不觉晓，处处闻啼鸟"]
JAPANESE = ["猫がソファーで寝ている", "東京タワーの夜景", "すしとラーメンが好きです",
            "ｶﾀｶﾅ ﾊﾝｶｸ", "コーヒー☕️を飲む", "「こんにちは」と言った"]
KOREAN = ["강아지가 공원에서 놀고 있다", "서울의 야경", "맛있는 김치찌개", "ㅋㅋㅋ ㅎㅎ",
          "\u1100\u1161\u11a8 decomposed jamo"]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵", "❤️", "🏳️‍🌈", "✔", "☕", "🐶🐱", "👩🏻‍💻",
         "1️⃣", "🤖 robot", "©®™"]
HTML = ["&amp;", "&#39;", "&quot;", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp;", "&amp;#39;",
        "&amp;amp;amp;", "&nbsp;", "&EACUTE;", "&eacute;", "&hellip;", "&#x2019;", "&#8217;",
        "&notanentity;", "&#0;", "&#xd800;", "&#1114112;", "&amp", "&lt;", "&gt", "&#65;&#x42;",
        "Tom &amp; Jerry", "it&#39;s", "&copy; 2020", "AT&T", "&", "&&", "&#;", "&#x;",
        "<b>&amp;</b>", "&NotNestedGreaterGreater;", "&frac12;"]
MOJIBAKE_SOURCES = ["café", "naïve", "Beyoncé", "crème brûlée", "don’t", "“quoted”", "—",
                    "São Paulo", "Zürich", "😀", "日本語", "€100", "½", "Ωmega", "ñandú"]
QUOTES = ["‘single’", "“double”", "‚low‘", "„low“", "‹angle›", "«guillemets»", "ʼapostrophe",
          "it’s", "I‘m", "‛reversed‛", "″seconds″"]
LIGATURES = ["ﬁne", "ﬂower", "ﬀ", "ﬃ", "ﬄ", "ﬅ", "ﬆ", "Ĳssel", "Ǆ", "ǅ", "ŉ"]
WIDTH = ["ＬＯＵＤ　ＮＯＩＳＥＳ", "１２３", "ｶﾀｶﾅ", "！？", "Ｈｅｌｌｏ，ｗｏｒｌｄ"]
CONTROLS = ["\x00", "\x01", "\x07", "\x08", "\x0b", "\x0c", "\x0e", "\x1b", "\x1c", "\x1f",
            "\x7f", "\x80", "\x85", "\x91", "\x9f", "\u200b", "\u200c", "\u200d", "\u2060",
            "\ufeff", "\ufff9", "\ufffc", "\ufffd", "\u206a", "\x1b[31mred\x1b[0m", "\u00ad",
            "\u180e", "\u2028", "\u2029", "\ue000"]
WHITESPACE = ["  ", "\t", "\n", "\r\n", "\r", "\xa0", "\u3000", "\u2003", "\u2009", "\u202f",
              "\u205f", " \t \n ", "\n\n\n", "\x0b", "\x0c", "\x1c\x1d\x1e\x1f", "\u1680"]
NUMBERS = ["123", "3.14159", "1,000,000", "2024-01-31", "٣٤٥", "²³", "½", "Ⅻ", "①②", "१२३",
           "๑๒", "0x1F", "1e-5", "+44 20 7946 0958", "¹⁰", "㊿", "𝟘𝟙𝟚", "1st 2nd 3rd"]
SPECIALS = ["<start_of_text>", "<end_of_text>", "<|startoftext|>", "<|endoftext|>",
            "<START_OF_TEXT>", "<End_Of_Text>", "<ſtart_of_text>", "x<end_of_text>y",
            "<start_of_text><end_of_text>", "it's", "IT'S", "we'LL", "they'RE", "I'M", "'ſ",
            "'s'", "''", "'d've", "don'T", "'", "'''s"]
CASE = ["İstanbul", "ΣΟΦΟΣ ΟΔΟΣ", "Σ", "STRASSE ß ẞ", "ǅungla", "ﬀ FF", "Kelvin \u212a",
        "Ångström \u212b", "ΐ", "ŉ", "Ǳ", "ΪΫ", "I\u0307", "ᾼ", "ﬅ"]
SCRIPTS = ["e\u0301", "cafe\u0301", "नमस्ते दुनिया", "مرحبا بالعالم", "שלום עולם", "สวัสดีครับ",
           "Привет мир", "Γειά σου", "ሰላም", "ᚠᚢᚦ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝐁𝐨𝐥𝐝", "ℌℑℜ", "Ⓐⓑ", "ǆ",
           "\u0915\u094d\u0937", "a\u0308\u0301", "ﷺ", "\U00010000", "𓀀", "🄰",
           "\u1f80\u0345"]


def _mojibake(rng: random.Random) -> str:
    src = rng.choice(MOJIBAKE_SOURCES)
    codec = rng.choice(["latin-1", "cp1252", "cp1252", "macroman", "cp437"])
    text = src.encode("utf-8").decode(codec, errors="replace")
    if rng.random() < 0.3:   # double mojibake
        text = text.encode("utf-8").decode(codec, errors="replace")
    return text


def _random_codepoints(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(1, 12)):
        r = rng.random()
        if r < 0.3:
            cp = rng.randint(0x20, 0x2FF)
        elif r < 0.6:
            cp = rng.randint(0x300, 0xFFFF)
        elif r < 0.9:
            cp = rng.randint(0x10000, 0x10FFFF)
        else:
            cp = rng.randint(0x0, 0x20)
        if 0xD800 <= cp <= 0xDFFF and rng.random() < 0.8:
            cp = 0x41
        out.append(chr(cp))
    return "".join(out)


def _long(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.4:
        return " ".join(_caption(rng) for _ in range(rng.randint(8, 30)))
    if kind < 0.6:
        return "".join(rng.choice(CHINESE) for _ in range(rng.randint(5, 40)))
    if kind < 0.8:
        return rng.choice(["a", "ab", "!", "1", "é", "😀", "abc"]) * rng.randint(60, 800)
    return " ".join(rng.choice(NOUNS + NUMBERS + EMOJI) for _ in range(rng.randint(80, 300)))


_CATEGORIES = {
    "caption": lambda r: _caption(r),
    "chinese": lambda r: r.choice(CHINESE),
    "japanese": lambda r: r.choice(JAPANESE),
    "korean": lambda r: r.choice(KOREAN),
    "emoji": lambda r: r.choice(EMOJI),
    "html": lambda r: r.choice(HTML),
    "mojibake": _mojibake,
    "quotes": lambda r: r.choice(QUOTES),
    "ligatures": lambda r: r.choice(LIGATURES),
    "width": lambda r: r.choice(WIDTH),
    "control": lambda r: r.choice(CONTROLS),
    "whitespace": lambda r: r.choice(WHITESPACE),
    "numbers": lambda r: r.choice(NUMBERS),
    "specials": lambda r: r.choice(SPECIALS),
    "case": lambda r: r.choice(CASE),
    "scripts": lambda r: r.choice(SCRIPTS),
    "random": _random_codepoints,
    "long": _long,
    "empty": lambda r: r.choice(["", " ", "\n", "\t\t", "\u3000", "&nbsp;"]),
}


def mixed_corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct adversarial strings, deterministic in ``seed``.

    Every fixed sample of every category comes first (so each edge case is always present);
    the rest are either a single random category sample (40%) or 2-5 samples glued with a
    random separator (none, space, or odd whitespace), sometimes upper- or title-cased.
    """
    rng = random.Random(seed)
    names = sorted(_CATEGORIES)
    fixed = [CHINESE, JAPANESE, KOREAN, EMOJI, HTML, QUOTES, LIGATURES, WIDTH, CONTROLS,
             WHITESPACE, NUMBERS, SPECIALS, CASE, SCRIPTS, MOJIBAKE_SOURCES, SPICE,
             ["", " ", "\n", "\t\t", "\u3000", "&nbsp;"]]
    out = list(dict.fromkeys(s for group in fixed for s in group))
    seen = set(out)
    while len(out) < n:
        if rng.random() < 0.4:
            text = _CATEGORIES[rng.choice(names)](rng)
        else:
            parts = [_CATEGORIES[rng.choice(names)](rng) for _ in range(rng.randint(2, 5))]
            glue = rng.choice(["", " ", " ", "\n", "\t", "  ", "\xa0", "-"])
            text = glue.join(parts)
            if rng.random() < 0.2:
                text = text.upper() if rng.random() < 0.5 else text.title()
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out[:n]
