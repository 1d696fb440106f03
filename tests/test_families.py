"""Every stage × model family cell of tasks/families.py, on a tiny random model of each family (built from its config
class, with the test WordPiece tokenizer): a supported stage runs and makes its variant; a refused one is a one-line
preflight error naming the family, the stage and the way out."""

import numpy as np
import pytest
import torch
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    AutoConfig,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from squeezeflow.tasks.base import ModelError
from squeezeflow.tasks.data import DataConfig, load_splits
from squeezeflow.tasks.distill import DistillConfig, StudentShape, distill
from squeezeflow.tasks.early_exit import EarlyExitConfig, early_exit, load_exit_model, reference_logits
from squeezeflow.tasks.export import ExportConfig, export
from squeezeflow.tasks.families import CELLS, FAMILIES, check_stages, refusal
from squeezeflow.tasks.prune import PruneConfig, prune
from squeezeflow.tasks.quantize import QuantizeConfig, quantize
from squeezeflow.tasks.runtime import load_predictor
from squeezeflow.tasks.teacher import ModelConfig, TeacherConfig, check_model_source, make_teacher
from squeezeflow.tasks.variant import StageContext

from .conftest import FILLER, NEGATIVE, POSITIVE, SPECIAL, sentiment_rows, write_tsv

SHAPE = {"num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64, "num_labels": 2}
BUILDERS = {
    "bert": lambda v: (BertConfig(vocab_size=v, hidden_size=32, **SHAPE), BertForSequenceClassification),
    "distilbert": lambda v: (
        DistilBertConfig(vocab_size=v, dim=32, n_layers=3, n_heads=4, hidden_dim=64, num_labels=2),
        DistilBertForSequenceClassification,
    ),
    "roberta": lambda v: (
        RobertaConfig(
            vocab_size=v, hidden_size=32, pad_token_id=0, type_vocab_size=1, max_position_embeddings=66, **SHAPE
        ),
        RobertaForSequenceClassification,
    ),
    "xlm-roberta": lambda v: (
        XLMRobertaConfig(
            vocab_size=v, hidden_size=32, pad_token_id=0, type_vocab_size=1, max_position_embeddings=66, **SHAPE
        ),
        XLMRobertaForSequenceClassification,
    ),
    "electra": lambda v: (
        ElectraConfig(vocab_size=v, hidden_size=32, embedding_size=32, **SHAPE),
        ElectraForSequenceClassification,
    ),
    "albert": lambda v: (
        AlbertConfig(vocab_size=v, hidden_size=32, embedding_size=16, pad_token_id=0, **SHAPE),
        AlbertForSequenceClassification,
    ),
    "deberta-v2": lambda v: (
        # as DeBERTa-v3 is configured: relative attention through the shared key/query projections
        DebertaV2Config(
            vocab_size=v,
            hidden_size=32,
            pad_token_id=0,
            max_position_embeddings=64,
            relative_attention=True,
            position_buckets=16,
            max_relative_positions=-1,
            pos_att_type=["p2c", "c2p"],
            share_att_key=True,
            norm_rel_ebd="layer_norm",
            position_biased_input=False,
            **SHAPE,
        ),
        DebertaV2ForSequenceClassification,
    ),
}


def test_every_supported_family_has_a_builder_here():
    assert sorted(t for f in FAMILIES for t in f.model_types) == sorted(BUILDERS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-data")
    return DataConfig(
        train=write_tsv(root / "train.tsv", sentiment_rows(120, seed=1)),
        eval=write_tsv(root / "eval.tsv", sentiment_rows(40, seed=2)),
    )


@pytest.mark.parametrize("model_type", sorted(BUILDERS))
def test_each_stage_runs_on_the_family_or_is_refused_at_preflight(model_type, data, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER))) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True, model_max_length=32)
    config, model_class = BUILDERS[model_type](len(tokenizer))
    torch.manual_seed(0)
    model_class(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    source = ModelConfig(source=str(tmp_path / "model"), num_labels=2, max_length=32)
    assert check_model_source(source) == model_type

    out = tmp_path / "variants"
    teacher = make_teacher(source, TeacherConfig(epochs=1, learning_rate=3e-3, batch_size=16), data, out, seed=7)
    ctx = StageContext(data=data, num_labels=2, max_length=32, seed=7, teacher=teacher, cache_dir=tmp_path / "cache")
    onnx_parent = export(teacher, ExportConfig(), out)
    texts = load_splits(data, 2).eval.texts[:16]
    reference = load_predictor(teacher.path, "hf").logits(texts)
    quantize_cfg = QuantizeConfig(modes=["dynamic", "static", "qat"], calibration_examples=16, qat={"epochs": 0.2})
    make = {
        "distill": lambda: distill(
            teacher,
            StudentShape(num_layers=2),
            DistillConfig(students=[{"num_layers": 2}], training={"epochs": 0.5}),
            ctx,
            out,
        ),
        **{
            f"prune:{part}": lambda part=part: prune(
                teacher,
                0.5,
                PruneConfig(ratios=[0.5], heads=part == "heads", ffn=part == "ffn", recovery={"epochs": 0.2}),
                ctx,
                out,
            )
            for part in ("heads", "ffn")
        },
        # threshold 0 never exits early: the chained ONNX graph must then give the model's own logits
        "early_exit": lambda: early_exit(
            teacher, 0.0, EarlyExitConfig(thresholds=[0.0], training={"epochs": 0.5}), ctx, out
        ),
        "export": lambda: onnx_parent,
        "quantize:dynamic": lambda: quantize(onnx_parent, "dynamic", quantize_cfg, ctx, out, teacher),
        "quantize:static": lambda: quantize(onnx_parent, "static", quantize_cfg, ctx, out, teacher),
        "quantize:qat": lambda: quantize(onnx_parent, "qat", quantize_cfg, ctx, out, teacher),
    }
    for cell in CELLS:
        stage, _, mode = cell.partition(":")
        reason = refusal(model_type, stage, mode or None)
        if reason is None:
            made = make[cell]()
            assert (tmp_path / "variants" / made.id).is_dir(), cell
            if cell == "distill":  # two of the teacher's three layers, of the same family
                student = AutoConfig.from_pretrained(made.path)
                assert (student.model_type, student.num_hidden_layers) == (model_type, 2)
            if cell in ("export", "early_exit"):  # parity of the ONNX graph with PyTorch, for this family
                got = load_predictor(made.path, made.format).logits(texts)
                assert np.abs(got - reference).max() < 1e-3, (cell, np.abs(got - reference).max())
            if cell == "early_exit":  # where some rows leave early, the chained graph agrees with PyTorch row by row
                sometimes = early_exit(
                    teacher, 0.5, EarlyExitConfig(thresholds=[0.5], training={"epochs": 0.5}), ctx, out
                )
                exit_model = load_exit_model(next(p for p in out.iterdir() if p.name.startswith("exits-")))
                inputs = dict(AutoTokenizer.from_pretrained(teacher.path)(texts, padding=True, return_tensors="pt"))
                expected, exit_layers = reference_logits(exit_model, inputs, "entropy", 0.5)
                predictor = load_predictor(sometimes.path, "onnx-exit")
                assert np.abs(predictor.logits(texts) - expected).max() < 1e-3
                assert predictor.last_exit_layers.tolist() == exit_layers.tolist()
            if stage == "prune":  # heads or channels physically gone; the smaller model reloads and exports as it is
                assert made.metrics["prune_params_after_m"] < made.metrics["prune_params_before_m"]
                shrunk = made.metrics["prune_heads_per_layer"] < 4, made.metrics["prune_intermediate_size"] < 64
                assert shrunk == (mode == "heads", mode == "ffn"), (cell, shrunk)
                own = load_predictor(made.path, made.format).logits(texts)
                exported = load_predictor(export(made, ExportConfig(), out).path, "onnx").logits(texts)
                assert np.abs(exported - own).max() < 1e-3, np.abs(exported - own).max()
        else:
            if stage == "quantize":
                stages = [quantize_cfg.model_copy(update={"modes": [mode]})]
            elif stage == "prune":
                stages = [PruneConfig(ratios=[0.5], heads=mode == "heads", ffn=mode == "ffn")]
            else:
                stages = [_Stage(stage)]
            with pytest.raises(ModelError, match=r"^stages\.0: .* does not support .* models: it .*; .*$"):
                check_stages(model_type, stages)


class _Stage:
    """A recipe stage as check_stages reads it: its kind (and no quantize modes)."""

    def __init__(self, kind: str):
        self.kind = kind


def test_a_vocabulary_only_prune_is_not_refused_where_heads_cannot_go():
    check_stages("deberta-v2", [PruneConfig(ratios=[0.0], vocabulary="task")])
    with pytest.raises(
        ModelError, match=r"^stages\.0: prune of heads does not support DeBERTa-v2 models: .*heads: false"
    ):
        check_stages("deberta-v2", [PruneConfig(ratios=[0.3])])
