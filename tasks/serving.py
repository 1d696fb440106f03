"""The champion as an MLflow pyfunc, logged as *code* (MLflow "models from code"), so nothing is pickled:
raw texts in, labels and class probabilities out. The model files travel as the artifact `model`."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

CHUNK = 32


class ChampionModel(PythonModel):
    def load_context(self, context):
        from squeezeflow.tasks.runtime import load_predictor

        config = context.model_config
        self.label_names = list(config["label_names"])
        self.predictor = load_predictor(context.artifacts["model"], config["format"], int(config.get("threads", 1)))

    def predict(self, context, model_input, params=None):
        from squeezeflow.tasks.runtime import softmax

        if isinstance(model_input, pd.DataFrame):
            if "text" not in model_input.columns:
                raise ValueError(f"expected a DataFrame with a 'text' column, got columns {list(model_input.columns)}")
            texts = [str(t) for t in model_input["text"]]
        else:
            texts = [str(t) for t in model_input]
        if not texts:
            return pd.DataFrame({"label": [], "label_id": [], "score": [], "probabilities": []})
        logits = np.concatenate([self.predictor.logits(texts[i : i + CHUNK]) for i in range(0, len(texts), CHUNK)])
        probabilities = softmax(logits)
        ids = probabilities.argmax(-1)
        return pd.DataFrame(
            {
                "label": [self.label_names[i] for i in ids],
                "label_id": ids.astype(int),
                "score": probabilities.max(-1),
                "probabilities": [row.tolist() for row in probabilities],
            }
        )


mlflow.models.set_model(ChampionModel())
