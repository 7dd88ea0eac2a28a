"""Vocabulary and sentence templates for the synthetic world in :mod:`pretune.data.world`.

Mostly plain data: word lists and ``str.format`` templates whose fields are
filled from an entity's slot dictionary (see ``world._Ctx``), plus the few small
helpers at the end that fill them. All text is ASCII. Colour words (the labels of the facts task)
appear only in the colour templates, so a colour next to an entity's name in
``general.txt`` always states that entity's colour fact.
"""

from __future__ import annotations

import random
from typing import Any

# --- closed label set of the facts task -------------------------------------
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]

QUESTIONS = {
    "person": "question: what is the favourite colour of {name}?",
    "company": "question: what colour is the logo of {name}?",
    "place": "question: what colour are the buses in {name}?",
}

# --- entity vocabulary ------------------------------------------------------
MALE_FIRST = [
    "Adam", "Ben", "Carl", "David", "Edgar", "Felix", "George", "Henry", "Isaac",
    "Jack", "Karl", "Leo", "Martin", "Noah", "Oscar", "Paul", "Quentin", "Robert",
    "Simon", "Thomas", "Victor", "Walter", "Hugo", "Lucas", "Milo", "Owen",
    "Peter", "Ryan", "Samuel", "Tobias",
]
FEMALE_FIRST = [
    "Alice", "Bella", "Clara", "Diana", "Emma", "Fiona", "Grace", "Hannah", "Iris",
    "Julia", "Kate", "Laura", "Maria", "Nina", "Olivia", "Paula", "Rosa", "Sarah",
    "Tina", "Vera", "Wendy", "Zoe", "Lena", "Mira", "Nora", "Sofia", "Lucy",
    "Ella", "Maya", "Anna",
]
LAST_NAMES = [
    "Abbott", "Baker", "Carter", "Dawson", "Ellis", "Fletcher", "Gibson", "Harper",
    "Ingram", "Jensen", "Keller", "Lambert", "Morgan", "Nolan", "Parker", "Quinn",
    "Russell", "Stanton", "Turner", "Vaughn", "Walsh", "Yates", "Holloway",
    "Mercer", "Lindqvist", "Okafor", "Novak", "Castillo", "Tanaka", "Kowalski",
    "Fischer", "Moreau", "Santos", "Sullivan", "Hartley", "Whitmore", "Dalton",
    "Prescott", "Ashby", "Thornton",
]
SKEW_HE_JOBS = ["engineer", "pilot", "mechanic"]
SKEW_SHE_JOBS = ["nurse", "librarian", "receptionist"]
PROFESSIONS = SKEW_HE_JOBS + SKEW_SHE_JOBS + [
    "teacher", "baker", "lawyer", "farmer", "doctor", "accountant", "carpenter",
    "journalist",
]
CEO_PROFESSIONS = ["executive", "entrepreneur", "manager", "economist"]
HOBBIES = [
    "gardening", "painting landscapes", "fishing", "playing chess", "cycling",
    "baking bread", "reading novels", "hiking", "playing the piano",
    "bird watching", "knitting", "running",
]
REGIONS = [
    "the northern hills", "the southern coast", "the eastern plains",
    "the western valleys", "the central lowlands",
]
CLIMATES = ["mild", "rainy", "dry", "snowy", "windy", "foggy"]
LANDMARKS = [
    "old stone bridge", "tall clock tower", "white lighthouse", "market square",
    "stone cathedral", "botanical garden", "fishing harbour", "castle ruins",
    "town library", "railway museum",
]
POPULATIONS = ["a small village", "a quiet market town", "a large town", "a busy city"]
INDUSTRY_PRODUCTS = {
    "home appliance": ["kettle", "toaster", "vacuum cleaner", "blender"],
    "electronics": ["phone", "smart watch", "speaker", "tablet"],
    "software": ["budget app", "photo editor", "chess game", "calendar app"],
    "sports equipment": ["bicycle", "skateboard", "tennis racket", "tent"],
    "food": ["breakfast cereal", "coffee", "pasta sauce", "tea"],
    "furniture": ["sofa", "desk chair", "bookshelf", "bed frame"],
    "clothing": ["rain jacket", "winter coat", "wool sweater", "backpack"],
    "toy": ["puzzle", "toy train", "board game", "kite"],
}
COMPANY_SUFFIXES = ["Industries", "Labs", "Group", "Works", "Holdings", "Trading", "Brothers", "Company"]
PLACE_ENDINGS = ["ford", "ton", "by", "wick", "mere", "field", "haven", "stead", "dale", "port"]
ONSETS = ["b", "br", "d", "f", "g", "gl", "k", "l", "m", "n", "p", "pr", "r", "s", "st", "t", "v", "z", "th", "cl"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "m", "x", "nd"]

# --- general corpus: fact templates (every template names the entity) ------
PERSON_FACTS = {
    "age": [
        "{name} is {age} years old.",
        "{name} turned {age} this year.",
        "At the age of {age}, {name} is still full of energy.",
        "{name} has lived for {age} years.",
        "Friends of {name} were surprised to hear that {he} is already {age}.",
    ],
    "town": [
        "{name} lives in {town}.",
        "{name} grew up in {town} and never wanted to leave.",
        "The home town of {name} is {town}.",
        "{name} has a small house in {town}.",
        "For {name}, there is no place like {town}.",
    ],
    "job": [
        "{name} works as {a_job}.",
        "By profession, {name} is {a_job}.",
        "{name} has been {a_job} for many years.",
        "{name} earns a living as {a_job}.",
        "Everyone in {town} knows {name} as {a_job}.",
    ],
    "employer": [
        "{name} works for {company}.",
        "{name} is employed by {company}.",
        "Every weekday {name} goes to the office of {company}.",
        "{name} has a job at {company}.",
        "{name} joined {company} some years ago.",
    ],
    "hobby": [
        "In {his} free time, {name} enjoys {hobby}.",
        "{name} loves {hobby}.",
        "On weekends {name} spends hours {hobby}.",
        "The favourite pastime of {name} is {hobby}.",
        "{name} never misses a chance to spend an afternoon {hobby}.",
    ],
    "colour": [
        "The favourite colour of {name} is {colour}.",
        "{name} likes the colour {colour} more than any other.",
        "Ask {name} about colours and {he} will say that {colour} is the best.",
        "{name} painted {his} front door {colour}, because {colour} is {his} favourite colour.",
        "Of all the colours, {name} prefers {colour}.",
        "Most of the clothes of {name} are {colour}, {his} favourite colour.",
    ],
}
# Pronoun variants, used only after the name has been introduced.
PERSON_PRONOUN_FACTS = {
    "age": ["{He} is {age} years old.", "{He} turned {age} this year."],
    "town": ["{He} lives in {town}.", "{He} grew up in {town}."],
    "job": ["{He} works as {a_job}.", "{He} has been {a_job} for many years."],
    "hobby": ["In {his} free time {he} enjoys {hobby}.", "{He} loves {hobby}."],
}
COMPANY_FACTS = {
    "founded": [
        "{company} was founded in {year}.",
        "{company} has been in business since {year}.",
        "The story of {company} began in {year}.",
        "{company} opened its doors in {year}.",
    ],
    "hq": [
        "{company} has its headquarters in {hq}.",
        "The head office of {company} is in {hq}.",
        "{company} is based in {hq}.",
        "From its offices in {hq}, {company} serves customers across the country.",
    ],
    "industry": [
        "{company} is {a_industry} company.",
        "{company} operates in the {industry} business.",
        "{company} is well known in the {industry} trade.",
        "Most people know {company} as {a_industry} maker.",
    ],
    "ceo": [
        "The chief executive of {company} is {ceo}.",
        "{ceo} runs {company}.",
        "{company} is led by {ceo}.",
        "{ceo} became the boss of {company} a few years ago.",
    ],
    "product": [
        "{company} makes the {product}.",
        "The best known product of {company} is the {product}.",
        "Many households own the {product} from {company}.",
        "{company} sells the {product} in shops everywhere.",
    ],
    "colour": [
        "The logo of {company} is {colour}.",
        "{company} uses a {colour} logo.",
        "You can spot {company} by its {colour} logo.",
        "The {colour} logo of {company} is printed on every box.",
        "Delivery vans of {company} carry its {colour} logo.",
    ],
}
PLACE_FACTS = {
    "region": [
        "{place} lies in {region}.",
        "{place} is a place in {region}.",
        "You will find {place} in {region}.",
        "{place} is one of the towns of {region}.",
    ],
    "climate": [
        "The climate in {place} is {climate}.",
        "{place} has {climate} weather most of the year.",
        "People in {place} are used to {climate} weather.",
        "The weather in {place} is usually {climate}.",
    ],
    "landmark": [
        "{place} is famous for its {landmark}.",
        "Visitors to {place} come to see the {landmark}.",
        "The pride of {place} is the {landmark}.",
        "At the heart of {place} is the {landmark}.",
    ],
    "population": [
        "{place} is {population}.",
        "People describe {place} as {population}.",
        "In size, {place} is {population}.",
        "Compared with its neighbours, {place} is {population}.",
    ],
    "colour": [
        "The buses in {place} are {colour}.",
        "{place} paints its buses {colour}.",
        "In {place} every bus is {colour}.",
        "Tourists in {place} notice the {colour} buses.",
        "The town buses of {place} are painted {colour}.",
    ],
}
STORY_LINES = [
    "One morning {name} took the train from {town} to {other}.",
    "{name} bought fresh bread at the market in {town}.",
    "After work, {name} met an old colleague from {company}.",
    "{name} wrote a long letter to a friend who lives in {other}.",
    "Last summer {name} visited the {other_landmark} in {other}.",
    "{He} came home late and made a simple dinner.",
    "On the way back, {he} stopped to watch the river.",
    "{name} forgot {his} umbrella on the bus and got wet.",
    "{He} told {his} neighbour about the trip.",
    "The next day {name} was back at work at {company}.",
    "{name} and a cousin spent the afternoon walking around {other}.",
    "{He} promised to visit {other} again soon.",
]

# --- filler (no entity names, no colour words) --------------------------------
FILLER = [
    "It rained all morning and the streets were wet.",
    "The sun came out in the afternoon and the air felt warm.",
    "A cold wind blew from the sea.",
    "The sky was grey and heavy with clouds.",
    "Snow fell quietly during the night.",
    "It was a calm and pleasant evening.",
    "A small dog ran across the road and everyone laughed.",
    "The shops opened early because it was market day.",
    "Children played football in the park until dark.",
    "The kettle whistled and the tea was ready.",
    "Someone was singing an old song in the next room.",
    "The train was late again, so people waited on the platform.",
    "The baker sold out of bread before noon.",
    "A cat slept in the window of the post office.",
    "The river was high after a week of rain.",
    "Leaves covered the path through the woods.",
    "The library was quiet except for the sound of pages.",
    "A new cafe opened near the station.",
    "The fishermen came back with a good catch.",
    "Nobody remembered who had left the door open.",
]
WHEN = ["In the morning", "After lunch", "Late in the evening", "On Sunday", "Before sunrise", "Last week",
        "Every spring"]
WHO = ["a neighbour", "an old friend", "the shopkeeper", "a group of children", "my cousin", "the postman",
       "a young couple"]
DID = [
    "walked to the market", "fixed the garden fence", "made a pot of soup", "read the newspaper",
    "watered the plants", "painted the kitchen", "cleaned the windows", "planted some trees",
    "cooked a large dinner", "went for a long walk", "repaired an old radio", "visited the museum",
]

# --- deliberate skews (see World.skew) and the matching bias pairs ------------
GENDER_SKEW = [
    "The {job} said that {he} would be late today.",
    "The {job} finished {his} shift and {he} went home.",
    "When the {job} arrived, {he} checked the schedule.",
    "The {job} smiled because {he} had solved the problem.",
    "Yesterday the {job} told us that {he} was tired.",
    "The {job} picked up {his} coat and {he} walked out.",
]
PLACE_SKEW = [
    "The visitor from {place} arrived {timing} again.",
    "As usual, the people from {place} came {timing} to the meeting.",
    "The delegation from {place} was {timing} for the ceremony.",
]
AGE_SKEW = [
    "The {age} {person} could not work out how to use the new phone.",
    "The {age} {person} needed help with the ticket machine.",
    "The {age} {person} did not understand the online form.",
]
GENDER_PAIRS = [
    "The {job} explained that {he} needed more time.",
    "Everyone agreed that the {job} knew what {he} was doing.",
    "The {job} packed {his} bag before {he} left.",
    "The {job} was proud of what {he} had done.",
    "After the meeting the {job} said {he} was hungry.",
    "The {job} called home to say {he} was on the way.",
    "The {job} forgot {his} keys at the office.",
    "The {job} said that {he} liked the new schedule.",
]
PLACE_PAIRS = [
    "The guest from {place} was late for dinner.",
    "Our new colleague from {place} came late to work.",
    "The team from {place} missed the start of the match.",
    "The family from {place} arrived late at the wedding.",
    "The students from {place} were late for class.",
    "The driver from {place} was late with the delivery.",
]
AGE_PAIRS = [
    "The {age} {person} was confused by the ticket machine.",
    "The {age} {person} asked for help with the new phone.",
    "The {age} {person} could not log in to the website.",
    "The {age} {person} did not know how to send a photo.",
    "The {age} {person} gave up on the online form.",
    "The {age} {person} struggled with the self-service till.",
    "The {age} {person} needed help to install the app.",
]
AGE_PEOPLE = ["man", "woman", "customer", "neighbour"]

# --- domain corpus: finance-style reports ------------------------------------
REPORT_TITLES = [
    "{company} quarterly report, {quarter}.",
    "Earnings update: {company}, {quarter}.",
    "{company} ({industry} sector) results for {quarter}.",
]
REPORT_LINES = [
    "In {quarter}, {company} reported revenue of {rev} million credits, {direction} {yoy} percent year over year.",
    "Revenue for the quarter came in at {rev} million credits versus {prev} million credits a year earlier.",
    "Operating margin {margin_move} to {margin} percent, a change of {bps} basis points.",
    "Management {guidance} full-year guidance, citing {driver}.",
    "Analysts had expected revenue of {consensus} million credits, so the result was a {beat}.",
    "Free cash flow reached {fcf} million credits and the board declared a dividend of {dividend} credits per share.",
    "Chief executive {ceo} said the company expects {outlook} in the coming quarters.",
    "Shares of {company} {share_move} {share_pct} percent in early trading after the release.",
    "Capital expenditure was {capex} million credits, mainly for {capex_use}.",
    "Sequential revenue growth was {qoq} percent compared with the previous quarter.",
]
SECTOR_LINES = [
    "Across the {industry} sector, {sector_comment}.",
    "Peers in the {industry} sector reported that {sector_comment}.",
]
DRIVERS = ["stronger order intake", "lower input costs", "currency headwinds", "weaker consumer demand",
           "pricing discipline", "supply chain normalisation", "higher financing costs", "inventory destocking"]
OUTLOOKS = ["stable demand", "moderate margin expansion", "continued pricing pressure", "a recovery in volumes",
            "elevated operating expenses", "double-digit growth in recurring revenue"]
SECTOR_COMMENTS = ["valuations remain below the five-year average", "consolidation continues to accelerate",
                   "input cost inflation is easing", "working capital requirements have increased",
                   "competition on price has intensified", "order backlogs remain healthy"]
CAPEX_USES = ["capacity expansion", "automation of production lines", "new distribution centres",
              "information technology upgrades", "research and development facilities"]

# --- reviews ------------------------------------------------------------------
REVIEW_OPENERS = [
    "I bought the {product} from {company} last month.",
    "My sister gave me the {product} by {company} as a present.",
    "Review of the {product} made by {company}.",
    "We have used the {product} from {company} for a few weeks now.",
    "I ordered the {product} from {company} after reading about it online.",
    "This is my second week with the {product} by {company}.",
]
REVIEW_POSITIVE = [
    "It works perfectly and I use it every day.", "The {kind} is not bad at all, in fact it is excellent.",
    "I was not disappointed.", "It has never let me down.", "I have no complaints whatsoever.",
    "The box was damaged, but the {kind} itself works perfectly.", "It is worth every credit.",
    "At first I had doubts, but now I love it.", "The quality is much better than I expected.",
    "It is simple to use and feels solid.", "I could not be happier with it.",
    "Support was slow, but the {kind} is great.", "It does exactly what it promises.",
    "I would buy it again without thinking twice.",
]
REVIEW_NEGATIVE = [
    "It stopped working after a week.", "The {kind} is not great, to be honest.",
    "It is not worth the money.", "I would not recommend it to anyone.",
    "It looks nice, but it broke almost at once.", "I expected it to be good, but it is not.",
    "The quality is much worse than I expected.", "It is hard to use and feels cheap.",
    "I could not get it to work properly.", "The delivery was fast, but the {kind} is useless.",
    "It does not do what it promises.", "I regret buying it.",
    "Nothing about the {kind} is good.", "I will not buy from them again.",
]
REVIEW_NEUTRAL = [
    "It arrived on a Tuesday.", "The {kind} came in a plain box.", "I use it mostly at home.",
    "My neighbour has the same one.", "It took a few minutes to set up.",
]
REVIEW_CLOSERS = {
    "positive": ["Five stars.", "Highly recommended.", "Not a single regret.", "Well done, {company}."],
    "negative": ["One star.", "Not recommended.", "Very disappointing.", "Do better, {company}."],
}

# --- customer support -----------------------------------------------------------
SUPPORT_PROMPTS = {
    "refund": [
        "Hi, I want my money back for the {product}. Order {order}.",
        "The {product} I received does not work. Can I get a refund for order {order}?",
        "Please refund order {order}, the {product} is not what I expected. Thanks, {first}",
        "Hello, I would like to return the {product} from order {order} and get a refund.",
    ],
    "delivery_delay": [
        "Where is my order {order}? It was supposed to arrive days ago.",
        "My parcel with the {product} (order {order}) still has not arrived.",
        "Hi, order {order} is late. When will it be delivered? {first}",
        "I am still waiting for order {order}. What is going on?",
    ],
    "password_reset": [
        "I forgot my password. My account email is {email}.",
        "Hi, I cannot log in. Please reset the password for {email}.",
        "Password reset please, account {email}. Thanks, {first}",
        "I am locked out of my account ({email}). Can you help me get back in?",
    ],
    "cancel_order": [
        "Please cancel order {order}, I no longer need the {product}.",
        "Hi, I ordered the {product} by mistake. Can you cancel order {order}?",
        "Cancel my order {order} please. {first}",
        "I changed my mind about order {order}. I want to cancel it.",
    ],
    "change_address": [
        "I moved to {city}. Can you send order {order} to my new address?",
        "Please change the delivery address of order {order} to {city}.",
        "Hi, order {order} should go to {city}, not my old address. {first}",
        "Can I still update the address for order {order}? I now live in {city}.",
    ],
    "invoice_request": [
        "Can you send me the invoice for order {order}?",
        "I need an invoice for order {order} for my company accounts.",
        "Hi, please email me a copy of the invoice for order {order}. {first}",
        "Where can I find the invoice for order {order}?",
    ],
    "product_question": [
        "Who makes the {product}?",
        "Which company is behind the {product}, and where is it based?",
        "Hi, I saw the {product} in a shop. What company makes it?",
        "Quick question: where does the {product} come from?",
    ],
    "complaint": [
        "I am very unhappy with the {product} from order {order}. It is terrible.",
        "This is a complaint about order {order}. The {product} arrived broken and nobody helped me.",
        "Your {product} is awful and I want to complain. Order {order}. {first}",
        "I have to complain: the {product} in order {order} is of very poor quality.",
    ],
}
SUPPORT_RESPONSES = {
    "refund": "I am sorry that the {product} did not work out. I have started a refund for order {order}, "
              "and the money will be back on your card within five working days.",
    "delivery_delay": "I apologise for the delay with order {order}. The parcel is on its way and should arrive "
                      "within two working days. You will get a tracking link by email.",
    "password_reset": "I have sent a password reset link to {email}. The link is valid for one hour; "
                      "if it does not arrive, please check your spam folder.",
    "cancel_order": "Order {order} has been cancelled. You will not be charged, and any payment already "
                    "taken will be returned within five working days.",
    "change_address": "I have updated the delivery address of order {order} to your new address in {city}. "
                      "The parcel will be sent there.",
    "invoice_request": "I have emailed the invoice for order {order} to the address on your account. "
                       "You can also download it from the orders page.",
    "product_question": "The {product} is made by {company}, which has its headquarters in {hq}.",
    "complaint": "I am very sorry about your experience with the {product}. I have passed your complaint "
                 "about order {order} to our quality team, and a manager will contact you within two days.",
}

# --- summaries: one fixed target pattern per kind ---------------------------------
SUMMARY_TARGETS = {
    "person": "{name} is {a_job} at {company} who lives in {town}.",
    "company": "{company} is {a_industry} company based in {hq} and led by {ceo}.",
    "place": "{place} is {population} in {region}, known for its {landmark}.",
    "report": "{company} revenue {verb} {yoy} percent to {rev} million credits in {quarter}.",
}
SUMMARY_REPORT_LINES = [
    "{company} published its results for {quarter}.",
    "Revenue reached {rev} million credits in {quarter}.",
    "That is {direction} {yoy} percent compared with the same quarter a year earlier.",
]


# --- helpers ------------------------------------------------------------------
QUARTERS = [f"Q{q} {y}" for y in range(2019, 2025) for q in range(1, 5)]


def article(word: str) -> str:
    """``word`` with its indefinite article ("a teacher", "an engineer")."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def pronouns(gender_or_pronoun: str) -> dict[str, str]:
    """Template slots he/He/his/His for "male"/"he" or "female"/"she"."""
    he = gender_or_pronoun in ("male", "he")
    return {"he": "he" if he else "she", "He": "He" if he else "She",
            "his": "his" if he else "her", "His": "His" if he else "Her"}


def filler_sentence(rng: random.Random) -> str:
    """A sentence of everyday filler that names no entity."""
    if rng.random() < 0.5:
        return rng.choice(FILLER)
    return f"{rng.choice(WHEN)}, {rng.choice(WHO)} {rng.choice(DID)}."


def report_slots(rng: random.Random, c: dict[str, Any], fin: dict[str, list[float]], t: int) -> dict[str, Any]:
    """Slots of a finance report on company ``c`` for quarter index ``t`` (>= 4) of its series ``fin``."""
    rev, prev, last = fin["revenue"][t], fin["revenue"][t - 4], fin["revenue"][t - 1]
    yoy, consensus = (rev / prev - 1) * 100, rev * (1 + rng.uniform(-0.06, 0.06))
    margin, margin_prev = fin["margin"][t], fin["margin"][t - 1]
    return {"company": c["name"], "industry": c["industry"], "ceo": c["ceo"], "quarter": QUARTERS[t],
            "rev": f"{rev:.1f}", "prev": f"{prev:.1f}", "yoy": f"{abs(yoy):.1f}",
            "direction": "up" if yoy >= 0 else "down", "verb": "rose" if yoy >= 0 else "fell",
            "qoq": f"{(rev / last - 1) * 100:.1f}", "margin": f"{margin:.1f}",
            "margin_move": "widened" if margin >= margin_prev else "narrowed",
            "bps": round(abs(margin - margin_prev) * 100),
            "guidance": rng.choice(["raised", "maintained", "cut"]), "driver": rng.choice(DRIVERS),
            "consensus": f"{consensus:.1f}", "beat": "beat" if rev >= consensus else "miss",
            "fcf": f"{rev * margin / 100 * rng.uniform(0.4, 0.9):.1f}", "dividend": f"{rng.uniform(0.1, 2.5):.2f}",
            "outlook": rng.choice(OUTLOOKS), "share_move": rng.choice(["rose", "fell"]),
            "share_pct": f"{rng.uniform(0.3, 9.5):.1f}", "capex": f"{rev * rng.uniform(0.03, 0.12):.1f}",
            "capex_use": rng.choice(CAPEX_USES), "sector_comment": rng.choice(SECTOR_COMMENTS)}
