"""Distillation on the tiny BERT: KD loss properties, student initialisation, round-trip, export, agreement."""

import numpy as np
import pytest
import torch

from squeezeflow.tasks.base import ModelError
from squeezeflow.tasks.data import DataConfig, load_splits
from squeezeflow.tasks.distill import DistillConfig, StudentShape, build_student, distill
from squeezeflow.tasks.export import ExportConfig, export
from squeezeflow.tasks.runtime import load_predictor
from squeezeflow.tasks.training import UNLABELLED, TrainConfig, kd_loss
from squeezeflow.tasks.variant import StageContext

from .conftest import FILLER, NEGATIVE, POSITIVE, sentiment_rows, write_tsv, written


def test_kd_loss_scales_soft_term_by_t_squared():
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 3), torch.randn(8, 3)
    labels = torch.randint(0, 3, (8,))
    soft = lambda t: kd_loss(student, teacher, labels, temperature=t, soft_weight=1.0)
    kl = lambda t: torch.nn.functional.kl_div(
        torch.log_softmax(student / t, -1), torch.log_softmax(teacher / t, -1), reduction="batchmean", log_target=True
    )
    for t in (1.0, 2.0, 4.0):
        assert soft(t).item() == pytest.approx((kl(t) * t * t).item(), rel=1e-5)


def test_kd_loss_is_pure_cross_entropy_when_soft_weight_is_zero():
    student, teacher, labels = torch.randn(5, 2), torch.randn(5, 2), torch.tensor([0, 1, 1, 0, 1])
    got = kd_loss(student, teacher, labels, temperature=3.0, soft_weight=0.0)
    assert got.item() == pytest.approx(torch.nn.functional.cross_entropy(student, labels).item())


def test_kd_loss_is_zero_when_student_matches_teacher():
    logits = torch.randn(4, 3)
    assert kd_loss(logits, logits, None, temperature=2.0, soft_weight=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_gives_unlabelled_rows_the_soft_term_alone():
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 2), torch.randn(6, 2)
    labels = torch.tensor([0, UNLABELLED, 1, 1, UNLABELLED, 0])
    rows = [
        kd_loss(
            student[i : i + 1],
            teacher[i : i + 1],
            labels[i : i + 1] if labels[i] != UNLABELLED else None,
            temperature=2.0,
            soft_weight=0.3,
        )
        for i in range(6)
    ]
    assert kd_loss(student, teacher, labels, temperature=2.0, soft_weight=0.3).item() == pytest.approx(
        torch.stack(rows).mean().item(), rel=1e-5
    )


def test_evenly_spaced_and_explicit_layers():
    assert StudentShape(num_layers=3).teacher_layers(6) == [0, 2, 5]
    assert StudentShape(num_layers=2).teacher_layers(6) == [0, 5]
    assert StudentShape(layers=[1, 4]).teacher_layers(6) == [1, 4]
    with pytest.raises(ModelError, match="do not exist"):
        StudentShape(layers=[7]).teacher_layers(6)
    with pytest.raises(ValueError, match="exactly one of num_layers or layers"):
        StudentShape(num_layers=2, layers=[0, 1])


def test_student_layers_equal_the_chosen_teacher_layers(tiny_model_dir):
    student, teacher, chosen = build_student(tiny_model_dir, StudentShape(layers=[1]))
    assert chosen == [1] and student.config.num_hidden_layers == 1
    t, s = teacher.state_dict(), student.state_dict()
    for key in s:
        if key.startswith("bert.encoder.layer.0."):
            assert torch.equal(s[key], t[key.replace("layer.0.", "layer.1.")]), key
        elif not key.startswith("bert.encoder"):
            assert torch.equal(s[key], t[key]), key


def test_a_distilbert_student_of_every_teacher_layer_computes_the_teachers_hidden_states(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    student, teacher, chosen = build_student(tiny_model_dir, StudentShape(num_layers=2, family="distilbert"))
    assert student.config.model_type == "distilbert" and chosen == [0, 1]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tokenizer(["the film was really excellent", "awful"], padding=True, return_tensors="pt")
    student.eval(), teacher.eval()
    with torch.no_grad():
        mine = student(batch["input_ids"], batch["attention_mask"], output_hidden_states=True).hidden_states
        theirs = teacher(**batch, output_hidden_states=True).hidden_states
    for s, t in zip(mine, theirs):  # the embeddings (token type folded in) and each layer, where tokens are real
        real = batch["attention_mask"].bool()
        assert torch.allclose(s[real], t[real], atol=1e-5)


def test_a_distilbert_student_is_distilled_exported_and_quantized(trained_tiny, tmp_path):
    from squeezeflow.tasks.quantize import QuantizeConfig, quantize

    teacher, data = trained_tiny
    ctx = StageContext(data=data, num_labels=2, max_length=32, seed=7, teacher=teacher, cache_dir=tmp_path / "c")
    shape = StudentShape(num_layers=1, family="distilbert")
    cfg = DistillConfig(students=[shape.model_dump()], training={"epochs": 2, "learning_rate": 1e-3})
    student = distill(teacher, shape, cfg, ctx, tmp_path / "v")
    assert student.lineage.endswith("distill[L1-distilbert]")
    texts = load_splits(data, 2).eval.texts
    own = load_predictor(student.path, "hf").logits(texts)
    onnx = export(student, ExportConfig(), tmp_path / "v")
    assert np.abs(load_predictor(onnx.path, "onnx").logits(texts) - own).max() < 1e-3
    int8 = quantize(onnx, "dynamic", QuantizeConfig(), ctx, tmp_path / "v")
    truth = np.asarray(load_splits(data, 2).eval.labels)
    assert (load_predictor(int8.path, "onnx").logits(texts).argmax(-1) == truth).mean() >= 0.8


def test_smaller_ffn_starts_from_scratch_only_where_shapes_differ(tiny_model_dir):
    student, teacher, chosen = build_student(tiny_model_dir, StudentShape(num_layers=1, intermediate_size=16))
    assert student.config.intermediate_size == 16 and chosen == [1]  # one layer: the teacher's last
    assert torch.equal(
        student.state_dict()["bert.encoder.layer.0.attention.self.query.weight"],
        teacher.state_dict()["bert.encoder.layer.1.attention.self.query.weight"],
    )
    assert student.state_dict()["bert.encoder.layer.0.intermediate.dense.weight"].shape == (16, 32)


@pytest.fixture(scope="module")
def distilled(trained_tiny, tmp_path_factory):
    teacher, data = trained_tiny
    root = tmp_path_factory.mktemp("distill")
    ctx = StageContext(data=data, num_labels=2, max_length=32, seed=7, teacher=teacher, cache_dir=root / "cache")
    cfg = DistillConfig(
        students=[StudentShape(num_layers=1)], training=TrainConfig(epochs=4, learning_rate=3e-3, batch_size=16)
    )
    return teacher, distill(teacher, cfg.students[0], cfg, ctx, root / "variants"), ctx, cfg


def test_distilled_student_matches_teacher_and_round_trips(distilled, tmp_path):
    teacher, student, ctx, _ = distilled
    assert student.lineage == "teacher>distill[L1]" and student.format == "hf"
    assert student.metrics["distill_best_validation_score"] >= 0.9
    eval_ = load_splits(ctx.data, 2).eval
    t_pred = load_predictor(teacher.path, "hf").logits(eval_.texts).argmax(-1)
    reloaded = load_predictor(student.path, "hf")  # from_pretrained round trip
    assert reloaded.model.config.num_hidden_layers == 1
    s_pred = reloaded.logits(eval_.texts).argmax(-1)
    assert (s_pred == t_pred).mean() >= 0.9
    onnx_student = export(student, ExportConfig(), tmp_path)
    np.testing.assert_allclose(
        load_predictor(onnx_student.path, "onnx").logits(eval_.texts), reloaded.logits(eval_.texts), atol=1e-4
    )


def test_teacher_logits_are_cached_in_the_order_of_the_texts(distilled, tmp_path):
    from squeezeflow.tasks.distill import teacher_logits

    _, _, ctx, _ = distilled
    assert len(list(ctx.cache_dir.glob("teacher-logits-*.npy"))) >= 1
    texts = ["a long sentence about the plot the acting and the music of this film", "good", "bad acting", "fine"] * 20
    logits = teacher_logits(ctx.teacher.path, texts, 32, tmp_path)
    one_by_one = np.concatenate([load_predictor(ctx.teacher.path, "hf").logits([t]) for t in texts[:4]])
    np.testing.assert_allclose(logits[:4], one_by_one, atol=1e-4)
    np.testing.assert_array_equal(teacher_logits(ctx.teacher.path, texts, 32, tmp_path), logits)  # from the cache file
    assert len(list(tmp_path.glob("teacher-logits-*.npy"))) == 1


def assert_weights_are_the_mean(soup_dir, copy_dirs):
    from safetensors.torch import load_file

    copies = [load_file(f"{d}/model.safetensors") for d in copy_dirs]
    assert not torch.allclose(copies[0]["classifier.weight"], copies[1]["classifier.weight"])  # the copies differ
    for key, averaged in load_file(f"{soup_dir}/model.safetensors").items():
        # a key bias shifts every attention score of a query equally, so its gradient is rounding noise, which Adam
        # scales up to full steps: those biases differ from run to run and carry no meaning
        if not key.endswith("attention.self.key.bias"):
            torch.testing.assert_close(
                averaged, sum(c[key] for c in copies) / len(copies), atol=1e-6, rtol=1e-5, msg=key
            )


def test_student_soup_is_the_average_of_students_trained_in_other_orders(trained_tiny, tmp_path):
    teacher, data = trained_tiny
    cfg = DistillConfig(
        students=[StudentShape(num_layers=1)],
        best_on_validation=False,
        training=TrainConfig(epochs=2, learning_rate=3e-3, batch_size=16),
    )
    made = {}
    for name, seed, soup in (("first", 7, 1), ("second", 8, 1), ("soup", 7, 2)):
        ctx = StageContext(
            data=data, num_labels=2, max_length=32, seed=seed, teacher=teacher, cache_dir=tmp_path / "cache"
        )
        made[name] = distill(teacher, cfg.students[0], cfg.model_copy(update={"soup": soup}), ctx, tmp_path / name)
    assert "soup" not in made["first"].params and made["soup"].params["soup"] == 2
    assert made["soup"].metrics["distill_copy2_train_steps"] == made["second"].metrics["distill_train_steps"]
    assert_weights_are_the_mean(made["soup"].path, [made["first"].path, made["second"].path])
    eval_ = load_splits(data, 2).eval
    assert (
        load_predictor(made["soup"].path, "hf").logits(eval_.texts).argmax(-1) == np.asarray(eval_.labels)
    ).mean() >= 0.9


def test_unlabelled_training_data_learns_from_soft_labels(trained_tiny, tmp_path):
    teacher, data = trained_tiny
    texts = load_splits(data, 2).train.texts
    (tmp_path / "unlabelled.tsv").write_text("text\n" + "".join(t + "\n" for t in texts))
    unlabelled = DataConfig(train=tmp_path / "unlabelled.tsv", eval=data.eval, train_has_labels=False)
    ctx = StageContext(
        data=unlabelled, num_labels=2, max_length=32, seed=7, teacher=teacher, cache_dir=tmp_path / "cache"
    )
    cfg = DistillConfig(
        students=[StudentShape(num_layers=1)], training=TrainConfig(epochs=4, learning_rate=3e-3, batch_size=16)
    )
    student = distill(teacher, cfg.students[0], cfg, ctx, tmp_path / "variants")
    eval_ = load_splits(data, 2).eval
    accuracy = (load_predictor(student.path, "hf").logits(eval_.texts).argmax(-1) == np.asarray(eval_.labels)).mean()
    assert accuracy >= 0.9


def born_again_teacher(tiny_model_dir, data, out_root, soft_weight):
    from squeezeflow.tasks.teacher import BornAgainConfig, ModelConfig, TeacherConfig, make_teacher

    return make_teacher(
        ModelConfig(source=str(tiny_model_dir), num_labels=2, max_length=32),
        TeacherConfig(epochs=6, learning_rate=3e-3, batch_size=16, born_again=BornAgainConfig(soft_weight=soft_weight)),
        data,
        out_root,
        seed=7,
    )


def test_born_again_teacher_is_a_second_fine_tune_that_agrees_with_the_first(tiny_model_dir, trained_tiny, tmp_path):
    plain, data = trained_tiny  # the same recipe and seed without born_again: the first fine-tune
    born = born_again_teacher(tiny_model_dir, data, tmp_path, soft_weight=1.0)
    assert "born_again" not in plain.params  # unset, it leaves the teacher's id as it was
    assert born.params["born_again"] == {"soft_weight": 1.0, "temperature": 2.0} and born.id != plain.id
    assert born.metrics["first_train_steps"] == born.metrics["train_steps"] == plain.metrics["train_steps"]
    eval_ = load_splits(data, 2).eval
    first = load_predictor(plain.path, "hf").logits(eval_.texts).argmax(-1)
    second = load_predictor(born.path, "hf").logits(eval_.texts).argmax(-1)
    assert (second == np.asarray(eval_.labels)).mean() >= 0.9 and (second == first).mean() >= 0.9


def test_born_again_teacher_learns_what_the_first_fine_tune_says(tiny_model_dir, trained_tiny, tmp_path, monkeypatch):
    import squeezeflow.tasks.teacher as teacher_module

    real = teacher_module.predict_logits
    monkeypatch.setattr(
        teacher_module, "predict_logits", lambda *args: -real(*args)
    )  # a first fine-tune that says the opposite
    _, data = trained_tiny
    born = born_again_teacher(
        tiny_model_dir, data, tmp_path, soft_weight=1.0
    )  # soft targets only: the labels carry no weight
    eval_ = load_splits(data, 2).eval
    assert (load_predictor(born.path, "hf").logits(eval_.texts).argmax(-1) == np.asarray(eval_.labels)).mean() <= 0.1


def test_soup_teacher_is_the_average_of_copies_fine_tuned_with_successive_seeds(tiny_model_dir, trained_tiny, tmp_path):
    from squeezeflow.tasks.teacher import ModelConfig, TeacherConfig, make_teacher

    _, data = trained_tiny
    model_cfg, recipe = (
        ModelConfig(source=str(tiny_model_dir), num_labels=2, max_length=32),
        dict(epochs=6, learning_rate=3e-3, batch_size=16),
    )
    # every copy made here, under the same torch thread settings: float sums in another order drift apart over training
    plain = make_teacher(model_cfg, TeacherConfig(**recipe), data, tmp_path / "first", seed=7)  # the soup's first copy
    second = make_teacher(model_cfg, TeacherConfig(**recipe), data, tmp_path / "second", seed=8)
    soup = make_teacher(model_cfg, TeacherConfig(**recipe, soup=2), data, tmp_path / "soup", seed=7)
    assert "soup" not in plain.params and soup.params["soup"] == 2 and soup.id != plain.id
    assert soup.metrics["copy1_train_steps"] == soup.metrics["copy2_train_steps"] == plain.metrics["train_steps"]
    assert soup.metrics["train_seconds"] == pytest.approx(
        soup.metrics["copy1_train_seconds"] + soup.metrics["copy2_train_seconds"]
    )
    assert_weights_are_the_mean(soup.path, [plain.path, second.path])
    eval_ = load_splits(data, 2).eval
    assert (load_predictor(soup.path, "hf").logits(eval_.texts).argmax(-1) == np.asarray(eval_.labels)).mean() >= 0.9


def test_soup_is_a_config_error_with_born_again_or_without_fine_tuning():
    from pydantic import ValidationError

    from squeezeflow.tasks.teacher import BornAgainConfig, TeacherConfig

    with pytest.raises(ValidationError, match="soup: give either soup .* or born_again"):
        TeacherConfig(soup=3, born_again=BornAgainConfig())
    with pytest.raises(ValidationError, match="soup: averaging fine-tuned copies needs finetune: true"):
        TeacherConfig(soup=2, finetune=False)


def _layer_outputs(model_dir, texts):
    """Hidden states and attentions of the model in `model_dir` on `texts` (padded to the longest), in eval mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager")
    batch = AutoTokenizer.from_pretrained(model_dir)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch, output_hidden_states=True, output_attentions=True), batch["attention_mask"]


def test_layer_matching_loss_is_the_mean_over_real_tokens_and_ignores_padding(tiny_model_dir):
    from types import SimpleNamespace

    from squeezeflow.tasks.distill import layer_matching_loss

    out, mask = _layer_outputs(tiny_model_dir, [f"{POSITIVE[0]} {FILLER[0]} {FILLER[1]} {FILLER[2]}", NEGATIVE[0]])
    assert (mask == 0).any()  # the short sentence is padded
    both = dict(hidden_weight=1.0, attention_weight=1.0)
    assert layer_matching_loss(out, out, mask, [0, 1], **both).item() == pytest.approx(0.0, abs=1e-6)

    # every hidden state of every real token 0.5 off: an MSE of 0.25 per layer
    shifted = SimpleNamespace(hidden_states=tuple(h + 0.5 for h in out.hidden_states), attentions=out.attentions)
    assert layer_matching_loss(
        shifted, out, mask, [0, 1], hidden_weight=1.0, attention_weight=0.0
    ).item() == pytest.approx(0.5)

    # a padding position's attention row may hold anything
    pad = (mask == 0)[:, None, :, None]
    garbage = SimpleNamespace(
        hidden_states=out.hidden_states, attentions=tuple(torch.where(pad, 1.0, a) for a in out.attentions)
    )
    assert layer_matching_loss(garbage, out, mask, [0, 1], **both).item() == pytest.approx(0.0, abs=1e-6)

    # a student with its own distributions over the real tokens: the KL is the mean over heads and real queries of
    # KL(teacher || student)
    torch.manual_seed(0)
    weights = torch.rand_like(out.attentions[1]) * mask[:, None, None, :]
    own = weights / weights.sum(-1, keepdim=True)
    student = SimpleNamespace(
        hidden_states=out.hidden_states, attentions=(own,)
    )  # one student layer, matched to teacher layer 1
    t_att = out.attentions[1]
    per_query = (torch.special.xlogy(t_att, t_att) - torch.special.xlogy(t_att, own)).sum(-1).mean(1)
    expected = (per_query * mask).sum() / mask.sum()
    got = layer_matching_loss(student, out, mask, [1], hidden_weight=0.0, attention_weight=1.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-4) and expected > 0.05


def test_attention_matching_students_train_without_attention_dropout(trained_tiny, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from squeezeflow.tasks.distill import layer_matching_loss

    teacher, data = trained_tiny
    batch = AutoTokenizer.from_pretrained(teacher.path)(
        [f"{POSITIVE[0]} {FILLER[0]}", NEGATIVE[1]], padding=True, return_tensors="pt"
    )
    kl = {}
    for dropout in (None, 0.0):
        # the student is a copy of the whole teacher, so only dropout tells their attentions apart
        student, teacher_model, chosen = build_student(
            teacher.path, StudentShape(layers=[0, 1]), attention_dropout=dropout
        )
        student.train()
        torch.manual_seed(0)
        s_out = student(**batch, output_attentions=True)
        t_out = teacher_model(**batch, output_attentions=True)
        kl[dropout] = layer_matching_loss(
            s_out, t_out, batch["attention_mask"], chosen, hidden_weight=0.0, attention_weight=1.0
        ).item()
    assert kl[0.0] < 0.05 < kl[None]

    ctx = StageContext(data=data, num_labels=2, max_length=32, seed=7, teacher=teacher, cache_dir=tmp_path / "cache")
    cfg = DistillConfig(
        students=[StudentShape(layers=[1])],
        hidden_weight=1.0,
        attention_weight=1.0,
        training=TrainConfig(epochs=1, learning_rate=1e-3, batch_size=16, max_examples=64),
    )
    distilled = distill(teacher, cfg.students[0], cfg, ctx, tmp_path / "variants")
    assert np.isfinite(distilled.metrics["distill_train_loss"])
    # the saved student fine-tunes later (QAT, exits) with the teacher's attention dropout
    saved = AutoConfig.from_pretrained(distilled.path).attention_probs_dropout_prob
    assert saved == AutoConfig.from_pretrained(teacher.path).attention_probs_dropout_prob > 0


def test_length_grouped_batches_cover_every_example_once_with_less_padding():
    import random

    import torch

    from squeezeflow.tasks.training import batch_order

    rng = random.Random(0)
    texts = [" ".join(["word"] * rng.randint(1, 60)) for _ in range(1000)]
    order = rng.sample(range(1000), 1000)
    plain = batch_order(order, texts, 16, False, torch.Generator().manual_seed(0))
    grouped = batch_order(order, texts, 16, True, torch.Generator().manual_seed(0))
    assert sorted(i for batch in grouped for i in batch) == list(range(1000))
    assert all(len(batch) <= 16 for batch in grouped)

    def padded_tokens(batches):
        return sum(len(batch) * max(len(texts[i]) for i in batch) for batch in batches)

    assert padded_tokens(grouped) < 0.6 * padded_tokens(plain)
    # still shuffled: the batches do not come out in length order
    assert [max(len(texts[i]) for i in b) for b in grouped] != sorted(max(len(texts[i]) for i in b) for b in grouped)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_learns_the_known_answer_in_either_precision(tiny_model_dir, precision):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from squeezeflow.tasks.training import accuracy_on, train

    from .conftest import sentiment_rows

    fit, held = sentiment_rows(240, seed=1), sentiment_rows(60, seed=2)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    figures = train(
        model,
        tokenizer,
        [t for t, _ in fit],
        [y for _, y in fit],
        TrainConfig(epochs=6, learning_rate=3e-3, batch_size=16, precision=precision),
        max_length=32,
        seed=7,
    )
    assert figures["train_mixed_precision"] == float(precision == "bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay fp32
    truth = np.array([y for _, y in held])
    assert accuracy_on(model, tokenizer, [t for t, _ in held], truth, 32) >= 0.9


def test_word_neighbours_are_the_nearest_whole_words_by_embedding_cosine(trained_tiny):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from squeezeflow.tasks.augment import word_neighbours

    teacher, _ = trained_tiny
    model, tokenizer = (
        AutoModelForSequenceClassification.from_pretrained(teacher.path),
        AutoTokenizer.from_pretrained(teacher.path),
    )
    found = word_neighbours(model, tokenizer, {"good", "Movie", "a", "xylophone", "!"}, k=3)
    assert set(found) == {"good", "Movie"}  # one-letter, unknown and non-alphabetic words are never swapped
    table = torch.nn.functional.normalize(model.get_input_embeddings().weight.detach(), dim=-1)
    vocab = tokenizer.get_vocab()
    candidates = [w for w in vocab if len(w) >= 2 and w.isalpha() and w != "good"]
    by_cosine = sorted(candidates, key=lambda w: -(table[vocab[w]] @ table[vocab["good"]]).item())
    assert found["good"] == by_cosine[:3]
    assert "movie" not in found["Movie"] and len(found["Movie"]) == 3


def test_augmented_copies_swap_words_for_their_neighbours_seeded():
    from squeezeflow.tasks.augment import AugmentConfig, augment_texts

    half = augment_texts(["good movie", "a"], {"good": ["great"]}, AugmentConfig(copies=20, replace_prob=0.5), seed=3)
    assert set(half) == {"great movie"} and 3 <= len(half) <= 17  # unchanged copies are dropped
    assert (
        augment_texts(["good movie", "a"], {"good": ["great"]}, AugmentConfig(copies=20, replace_prob=0.5), seed=3)
        == half
    )
    assert (
        len(augment_texts(["good movie"], {"good": ["great"]}, AugmentConfig(copies=20, replace_prob=1.0), seed=3))
        == 20
    )


def test_augmented_distillation_teaches_the_student_words_its_data_lacks(trained_tiny, tmp_path):
    """The student starts from scratch (a smaller width) and its training texts hold only "good" and "bad";
    the copies swap in the other sentiment words, and the teacher, which knows them all, labels the copies."""
    teacher, data = trained_tiny
    rng = np.random.default_rng(0)
    narrow = [(" ".join(rng.choice(FILLER, 4)) + (" good" if i % 2 else " bad"), i % 2) for i in range(240)]
    unseen = [
        (" ".join(rng.choice(FILLER, 4)) + " " + rng.choice(POSITIVE[1:] if i % 2 else NEGATIVE[1:]), i % 2)
        for i in range(60)
    ]
    narrow_data = DataConfig(
        train=write_tsv(tmp_path / "narrow.tsv", narrow), eval=write_tsv(tmp_path / "unseen.tsv", unseen)
    )
    ctx = StageContext(
        data=narrow_data, num_labels=2, max_length=32, seed=7, teacher=teacher, cache_dir=tmp_path / "cache"
    )
    shape = StudentShape(num_layers=1, hidden_size=16)

    def accuracy_on_unseen_words(**augment):
        cfg = DistillConfig(
            students=[shape],
            soft_weight=0.5,
            best_on_validation=False,
            augment=augment or None,
            training=TrainConfig(epochs=8, learning_rate=3e-3, batch_size=16),
        )
        student = distill(teacher, shape, cfg, ctx, tmp_path / "variants")
        return student, (
            load_predictor(student.path, "hf").logits([t for t, _ in unseen]).argmax(-1) == [y for _, y in unseen]
        ).mean()

    plain, plain_accuracy = accuracy_on_unseen_words()
    augmented, augmented_accuracy = accuracy_on_unseen_words(copies=4, replace_prob=0.5, neighbours=30)
    assert "augment" not in plain.params
    assert augmented.params["augment"] == {"copies": 4, "replace_prob": 0.5, "neighbours": 30}
    assert augmented.metrics["distill_train_steps"] > 3 * plain.metrics["distill_train_steps"]
    assert plain_accuracy <= 0.75 and augmented_accuracy >= 0.9, (plain_accuracy, augmented_accuracy)


def test_augmented_texts_need_the_teacher():
    with pytest.raises(ValueError, match="augment: augmented texts have no labels"):
        DistillConfig(students=[StudentShape(num_layers=1)], from_labels_only=True, augment={"copies": 1})


def long_flipped_data(root) -> tuple[DataConfig, list[tuple[str, int]]]:
    """Training rows of 6 words with their true labels and rows of 10 words with the opposite ones, and the eval rows
    (6 words, true labels): a pass over the long rows alone must learn the opposite rule."""
    short = sentiment_rows(120, seed=1)
    rng = np.random.default_rng(3)
    long = [(text + " " + " ".join(rng.choice(FILLER, 4)), 1 - label) for text, label in sentiment_rows(120, seed=4)]
    eval_rows = sentiment_rows(60, seed=2)
    data = DataConfig(  # a validation file of its own: all 240 rows stay training rows
        train=write_tsv(root / "train.tsv", short + long),
        eval=write_tsv(root / "eval.tsv", eval_rows),
        validation=write_tsv(root / "validation.tsv", sentiment_rows(40, seed=5)),
    )
    return data, eval_rows


def accuracy_of(variant, rows) -> float:
    return float(
        (load_predictor(variant.path, "hf").logits([t for t, _ in rows]).argmax(-1) == [y for _, y in rows]).mean()
    )


def test_long_text_pass_trains_the_student_on_the_long_texts_alone(trained_tiny, tmp_path):
    from squeezeflow.tasks.base import DataError
    from squeezeflow.tasks.training import LongTextPass

    teacher, _ = trained_tiny  # it knows the true rule, and the student starts from its layers
    data, eval_rows = long_flipped_data(tmp_path)
    ctx = StageContext(data=data, num_labels=2, max_length=32, seed=7, teacher=teacher, cache_dir=tmp_path / "cache")
    shape = StudentShape(num_layers=1)
    cfg = DistillConfig(
        students=[shape],
        from_labels_only=True,
        best_on_validation=False,
        training=TrainConfig(epochs=0.05, learning_rate=1e-5, batch_size=16),
    )  # one step: the pass decides
    plain = distill(teacher, shape, cfg, ctx, tmp_path / "variants")
    pass_cfg = LongTextPass(min_words=8, epochs=12, learning_rate=3e-3, batch_size=16)
    passed = distill(teacher, shape, cfg.model_copy(update={"long_text_pass": pass_cfg}), ctx, tmp_path / "variants")
    assert "long_text_pass" not in plain.params and passed.params["long_text_pass"]["min_words"] == 8
    assert (
        passed.metrics["distill_long_text_pass_train_steps"] == 12 * 8
    )  # the 120 long rows, 8 batches of 16, 12 times
    assert accuracy_of(plain, eval_rows) >= 0.9
    assert accuracy_of(passed, eval_rows) <= 0.1  # the opposite rule: only the long rows were learned from
    with pytest.raises(
        DataError, match=r"distill.long_text_pass.min_words: none of the 240 training texts has 11 or more words"
    ):
        distill(
            teacher,
            shape,
            cfg.model_copy(update={"long_text_pass": LongTextPass(min_words=11)}),
            ctx,
            tmp_path / "variants",
        )


def test_long_text_pass_fine_tunes_the_teacher_on_the_long_texts_alone(
    tiny_model_dir, trained_tiny, tmp_path, monkeypatch
):
    import squeezeflow.tasks.teacher as teacher_module
    from squeezeflow.tasks.base import DataError
    from squeezeflow.tasks.teacher import ModelConfig, TeacherConfig, make_teacher
    from squeezeflow.tasks.training import LongTextPass

    plain, _ = trained_tiny
    data, eval_rows = long_flipped_data(tmp_path)
    teacher = make_teacher(
        ModelConfig(source=str(tiny_model_dir), num_labels=2, max_length=32),
        TeacherConfig(
            epochs=0.05,
            learning_rate=1e-5,
            batch_size=16,
            long_text_pass=LongTextPass(min_words=8, epochs=8, learning_rate=3e-3, batch_size=16),
        ),
        data,
        tmp_path / "variants",
        seed=7,
    )
    assert "long_text_pass" not in plain.params and teacher.params["long_text_pass"]["epochs"] == 8
    assert teacher.metrics["long_text_pass_train_steps"] == 8 * 8 and teacher.metrics["train_steps"] == 1
    assert accuracy_of(teacher, eval_rows) <= 0.1
    monkeypatch.setattr(teacher_module, "train", lambda *args, **kwargs: pytest.fail("trained before the check"))
    with pytest.raises(
        DataError, match=r"teacher.long_text_pass.min_words: none of the 240 training texts has 11 or more words"
    ):
        make_teacher(
            ModelConfig(source=str(tiny_model_dir), num_labels=2, max_length=32),
            TeacherConfig(long_text_pass=LongTextPass(min_words=11)),
            data,
            tmp_path / "none",
            seed=7,
        )
    assert not written(tmp_path / "none")


def test_a_fresh_head_learns_at_its_own_rate_and_the_pretrained_encoder_at_its_own(tiny_model_dir):
    from squeezeflow.tasks.teacher import ModelConfig, load_classifier
    from squeezeflow.tasks.training import TrainConfig, train

    # the checkpoint has 2 classes and 3 are asked for: the head starts from random, the rest is loaded
    model, tokenizer, fresh = load_classifier(
        str(tiny_model_dir), ModelConfig(source=str(tiny_model_dir), num_labels=3, max_length=32), new_head=True
    )
    assert fresh == ["classifier.bias", "classifier.weight"]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rows = sentiment_rows(64, seed=3)
    train(
        model,
        tokenizer,
        [t for t, _ in rows],
        [y for _, y in rows],
        TrainConfig(epochs=1, learning_rate=1e-8, batch_size=16, warmup_ratio=0.0),
        max_length=32,
        seed=0,
        learning_rates=dict.fromkeys(fresh, 1e-2),
    )
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in model.named_parameters()}
    assert min(moved[name] for name in fresh) > 1e-3
    assert max(change for name, change in moved.items() if name not in fresh) < 1e-5


def test_two_accumulated_batches_train_as_one_batch_of_both(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from squeezeflow.tasks.training import predict_logits, train

    rows, held = sentiment_rows(64, seed=4), [t for t, _ in sentiment_rows(40, seed=5)]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def logits(batch_size: int, accumulate: int):
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
        for module in model.modules():  # no dropout: the runs draw their random masks in different shapes
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        figures = train(
            model,
            tokenizer,
            [t for t, _ in rows],
            [y for _, y in rows],
            TrainConfig(epochs=1, learning_rate=1e-3, batch_size=batch_size, gradient_accumulation_steps=accumulate),
            max_length=32,
            seed=3,
        )
        assert figures["train_steps"] == 64 / (batch_size * accumulate)  # optimizer steps
        return predict_logits(model, tokenizer, held, 32)

    whole = logits(16, 1)
    # two batches of 8 accumulated take the steps one batch of 16 takes; without accumulation they take twice as many
    accumulated, small = np.abs(logits(8, 2) - whole).max(), np.abs(logits(8, 1) - whole).max()
    print(f"max logit difference from batches of 16: accumulated 2 x 8 {accumulated:.2e}, batches of 8 {small:.2e}")
    assert accumulated < small / 10
