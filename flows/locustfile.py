"""The load `squeeze loadtest` sends (run by Locust, headless): each simulated user posts one text at a time, with its
true label, drawn from the texts file named by SQUEEZE_TEXTS (JSON: [[text, label], ...]), and waits for the answer.
SQUEEZE_PROTOCOL=mlflow posts the text alone to /invocations instead, as `mlflow models serve` takes it."""

import json
import os
import random

from locust import FastHttpUser, task

ROWS = json.loads(open(os.environ["SQUEEZE_TEXTS"], encoding="utf-8").read())
MLFLOW = os.environ.get("SQUEEZE_PROTOCOL") == "mlflow"


class Client(FastHttpUser):
    @task
    def classify(self) -> None:
        text, label = random.choice(ROWS)
        if MLFLOW:
            self.client.post("/invocations", json={"dataframe_split": {"columns": ["text"], "data": [[text]]}})
        else:
            self.client.post("/", json={"texts": [text], "labels": [label]})
