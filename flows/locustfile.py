"""The load `squeeze loadtest` sends (run by Locust, headless): each simulated user posts one text at a time, with its
true label, drawn from the texts file named by SQUEEZE_TEXTS (JSON: [[text, label], ...]), and waits for the answer."""

import json
import os
import random

from locust import FastHttpUser, task

ROWS = json.loads(open(os.environ["SQUEEZE_TEXTS"], encoding="utf-8").read())


class Client(FastHttpUser):
    @task
    def classify(self) -> None:
        text, label = random.choice(ROWS)
        self.client.post("/", json={"texts": [text], "labels": [label]})
