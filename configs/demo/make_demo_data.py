"""Writes the quickstart's demo dataset: short customer-support messages in three intents.

The sentences are composed here from hand-written fragments, so the data is ours and reproducible:
`python configs/demo/make_demo_data.py` rewrites train.tsv and eval.tsv byte for byte.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

LABELS = ["billing", "delivery", "technical"]

OPENERS = [
    "",
    "hi,",
    "hello,",
    "hey there,",
    "good morning,",
    "quick question:",
    "sorry to bother you but",
    "urgent:",
    "please help,",
    "not happy:",
    "just wondering,",
    "following up:",
]

PROBLEMS = {
    "billing": [
        "i was charged twice for my {plan} subscription",
        "my invoice for {month} shows the wrong amount",
        "can i get a refund for the {plan} plan",
        "the payment on my {card} card was declined",
        "why did my monthly fee go up in {month}",
        "please cancel the automatic renewal of my {plan} plan",
        "i need a receipt for the charge from {month}",
        "the discount code was not applied to my bill",
        "you billed my {card} card after i cancelled",
        "how do i update the billing address on my account",
        "there is an unknown charge on my statement from {month}",
        "i want to switch from monthly to yearly billing",
    ],
    "delivery": [
        "my {item} has not arrived yet",
        "the tracking number for my {item} does not work",
        "the courier left my {item} at the wrong address",
        "my parcel with the {item} arrived damaged",
        "can you ship the {item} to my office instead",
        "the {item} i ordered in {month} is still in transit",
        "the box was missing the {item}",
        "when will my {item} be delivered",
        "the driver never came although the app says delivered",
        "i would like express shipping for my {item}",
        "my package is stuck at the depot since {month}",
        "the delivery window for my {item} keeps changing",
    ],
    "technical": [
        "the app crashes when i open the {screen} screen",
        "i cannot log in after resetting my password",
        "the {item} will not connect to wifi",
        "the firmware update failed on my {item}",
        "the {screen} page shows an error code {code}",
        "my {item} keeps restarting by itself",
        "the sync between the app and my {item} stopped working",
        "i get a blank {screen} screen after the latest update",
        "bluetooth pairing with the {item} fails every time",
        "the website times out when i upload a file",
        "two factor codes never reach my phone",
        "the {item} battery drains in an hour since the update",
    ],
}

SLOTS = {
    "plan": ["premium", "family", "basic", "student", "business"],
    "month": ["january", "march", "may", "july", "september", "november"],
    "card": ["visa", "mastercard", "debit", "company"],
    "item": ["headphones", "router", "smart watch", "speaker", "tablet", "camera", "thermostat"],
    "screen": ["settings", "profile", "checkout", "dashboard", "home"],
    "code": ["403", "500", "e17", "x42"],
}

CLOSERS = ["", "thanks", "thank you", "please advise", "what should i do ?", "any update ?", "cheers"]


def compose(rng: random.Random, label: str) -> str:
    problem = rng.choice(PROBLEMS[label])
    filled = problem.format(**{slot: rng.choice(values) for slot, values in SLOTS.items()})
    parts = [rng.choice(OPENERS), filled, rng.choice(CLOSERS)]
    return " ".join(p for p in parts if p)


def make(n_per_label: int, rng: random.Random, seen: set[str]) -> list[tuple[str, int]]:
    rows = []
    for index, label in enumerate(LABELS):
        made = 0
        while made < n_per_label:
            text = compose(rng, label)
            if text in seen:
                continue
            seen.add(text)
            rows.append((text, index))
            made += 1
    rng.shuffle(rows)
    return rows


def write(path: Path, rows: list[tuple[str, int]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def main() -> None:
    here = Path(__file__).resolve().parent
    rng = random.Random(20261125)
    seen: set[str] = set()
    write(here / "train.tsv", make(240, rng, seen))
    write(here / "eval.tsv", make(80, rng, seen))


if __name__ == "__main__":
    main()
