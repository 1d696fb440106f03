"""`squeeze search`: the search space in a recipe, its errors, and a real 3-trial Optuna search on the tiny task
that is killed, resumes, and reuses the variants earlier trials made."""

import copy
import signal
import sqlite3
import subprocess
import time

import optuna
import pytest
import yaml

from squeezeflow.flows.form import SearchRecipe
from squeezeflow.flows.screen import verdict
from squeezeflow.flows.search import open_study
from squeezeflow.flows.space import SearchSpace
from squeezeflow.tasks.base import ConfigError

from .conftest import make_tiny_config, wait_for
from .test_cli import SQUEEZE, assert_one_line_error, recipe, squeeze


def searched(tree: dict) -> dict:
    tree = copy.deepcopy(tree)
    tree["stages"] = [
        {"kind": "export"},
        {"kind": "quantize", "modes": {"search": [["dynamic"], ["static"]]}, "per_channel": {"search": [True, False]}},
    ]
    tree["benchmark"] = {"threads": 1, "warmup": 1, "rounds": 1, "latency_texts": 10, "measure_rss": False}
    return tree


def test_a_space_names_its_knobs_and_puts_single_values_into_list_knobs(tiny_config):
    tree = copy.deepcopy(tiny_config)
    tree["stages"] = [
        {"kind": "distill", "students": {"search": [{"num_layers": 1}, {"layers": [1]}]}},
        {"kind": "early_exit", "thresholds": {"search": {"low": 0.1, "high": 0.6}}},
        {"kind": "export"},
        {"kind": "quantize", "modes": {"search": [["dynamic"], ["static", "dynamic"]]}},
    ]
    tree["teacher"]["learning_rate"] = {"search": {"low": 1e-4, "high": 1e-2, "log": True}}
    space = SearchSpace(tree, "r.yaml")
    names = {d.name: d for d in space.dimensions}
    assert set(names) == {"teacher.learning_rate", "distill.students", "early_exit.thresholds", "quantize.modes"}
    cfg = space.config(
        {
            "teacher.learning_rate": 1e-3,
            "distill.students": {"layers": [1]},
            "early_exit.thresholds": 0.25,
            "quantize.modes": ["static", "dynamic"],
        }
    )
    assert cfg.stages[0].students[0].layers == [1]
    assert cfg.stages[1].thresholds == [0.25]  # a sampled threshold, tried as a one-item list
    assert cfg.stages[3].modes == ["static", "dynamic"]
    assert cfg.teacher.learning_rate == 1e-3
    # a threshold or an INT8 mode is applied to trained models; a teacher's rate or a student's shape trains them
    assert {n for n, d in names.items() if d.retrains} == {"teacher.learning_rate", "distill.students"}


def test_a_study_is_named_by_its_recipe_not_by_how_its_directories_are_spelled(tiny_config, tmp_path, monkeypatch):
    tree = searched(tiny_config)
    monkeypatch.chdir(tmp_path)
    absolute = SearchSpace({**tree, "data": {**tree["data"], "dir": str(tmp_path)}}, "r.yaml").fingerprint()
    relative = {**tree, "data": {**tree["data"], "dir": "."}, "artifacts_dir": "artifacts"}
    assert SearchSpace(relative, "r.yaml").fingerprint() == absolute
    other = {**relative, "data": {**relative["data"], "dir": "elsewhere"}}
    assert SearchSpace(other, "r.yaml").fingerprint() != absolute


@pytest.mark.parametrize(
    "knob, fragment",
    [
        ({"search": {"low": 0.6, "high": 0.1}}, "stages.0.thresholds.search: low (0.6) must be below high (0.1)"),
        ({"search": [0.3]}, "stages.0.thresholds.search: a choice needs at least two values"),
        ({"search": {"low": 0.1, "hi": 0.6}}, "stages.0.thresholds.search.high: Field required"),
        ({"search": [0.3, 1.5]}, "stages.0.thresholds: the search value 1.5 makes an invalid recipe"),
        ({"search": {"low": 0, "high": 1, "log": True}}, "log scale needs low > 0"),
    ],
)
def test_a_bad_search_space_is_one_clear_line(tiny_config, knob, fragment):
    tree = copy.deepcopy(tiny_config)
    tree["stages"] = [{"kind": "early_exit", "thresholds": knob}, {"kind": "export"}]
    with pytest.raises(ConfigError) as raised:
        SearchSpace(tree, "r.yaml")
    assert fragment in str(raised.value)


def test_the_cli_refuses_a_recipe_with_nothing_to_search_a_bad_budget_or_an_unknown_sampler(tmp_path, tiny_config):
    assert_one_line_error(squeeze("search", recipe(tmp_path, tiny_config)), "nothing to search")
    done = squeeze("search", recipe(tmp_path, searched(tiny_config)), "--budget", "soon")
    assert done.returncode == 2 and "is not a time budget" in done.stderr
    assert_one_line_error(
        squeeze("search", recipe(tmp_path, searched(tiny_config)), "--sampler", "cmaes"),
        "--sampler: 'cmaes'; expected tpe, nsga2 or random",
    )


@pytest.mark.parametrize(
    "sampler, kind",
    [
        ("tpe", optuna.samplers.TPESampler),
        ("nsga2", optuna.samplers.NSGAIISampler),
        ("random", optuna.samplers.RandomSampler),
    ],
)
def test_a_resumed_study_draws_anew_and_a_fresh_one_draws_as_before(tmp_path, tiny_config, sampler, kind):
    tree = copy.deepcopy(tiny_config)
    tree["stages"] = [{"kind": "early_exit", "thresholds": {"search": {"low": 0.05, "high": 0.6}}}, {"kind": "export"}]
    space = SearchSpace(tree, "r.yaml")

    def first_draw(artifacts_dir, seed=None) -> float:
        cfg = space.first().model_copy(update={"artifacts_dir": artifacts_dir})
        study = open_study(cfg, space, "latency", sampler, seed)
        assert isinstance(study.sampler, kind)
        trial = study.ask()
        value = space.dimensions[0].suggest(trial)
        study.tell(trial, [0.9, 1.0])
        return value

    first = first_draw(tmp_path / "a")
    # the process that resumes the study must not replay the first process's draws (it would repeat its trials)
    assert first_draw(tmp_path / "a") != first
    # the recipe's seed still makes a new search reproducible; another seed draws anew
    assert first_draw(tmp_path / "b") == first
    assert first_draw(tmp_path / "c", seed=tiny_config.get("seed", 0) + 1000) != first


def statuses(db) -> dict[str, list[str]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "select r.status, t.value from runs r join tags t on t.run_uuid = r.run_uuid where t.key = 'squeeze.role'"
        ).fetchall()
    out: dict[str, list[str]] = {}
    for status, role in rows:
        out.setdefault(role, []).append(status)
    return out


def test_a_killed_search_resumes_reuses_its_variants_and_nests_trials_in_mlflow(tmp_path, tiny_model_dir):
    tree = searched(make_tiny_config(tmp_path, tiny_model_dir))
    path = recipe(tmp_path, tree)
    journal = tmp_path / "artifacts" / "search" / "tiny.journal"

    def study():
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        (name,) = optuna.get_all_study_names(storage)
        return optuna.load_study(study_name=name, storage=storage)

    cli = subprocess.Popen(
        [SQUEEZE, "search", path, "--trials", "3"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        # killed while its second trial runs: the first is complete
        wait_for(
            lambda: journal.exists() and any(t.number >= 1 and t.state.name == "RUNNING" for t in study().trials),
            300,
            "the search's second trial to start",
        )
        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
    before = {v["id"] for t in study().trials if t.state.name == "COMPLETE" for v in t.user_attrs["variants"]}
    assert before, "the first trial completed before the kill"
    restarted = time.time()

    done = squeeze("search", path, "--trials", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    trials = study().trials
    assert [t.state.name for t in trials].count("COMPLETE") == 3
    # every completed trial tells the sampler whether it kept the accuracy budget
    assert all("accuracy_budget" in t.constraints for t in trials if t.state.name == "COMPLETE")
    killed = [t for t in trials if t.state.name == "FAIL"]
    assert len(killed) == 1
    assert any(t.params == killed[0].params and t.state.name == "COMPLETE" for t in trials[killed[0].number + 1 :])

    # nothing made before the kill was made again: whatever the resumed trials needed and existed was reused
    resumed = {v["id"]: v for t in trials if t.state.name == "COMPLETE" for v in t.user_attrs["variants"]}
    rebuilt = [i for i, v in resumed.items() if v["made_at"] and v["made_at"] >= restarted and i in before]
    assert rebuilt == []
    assert any(v["stage"] == "teacher" and v["made_at"] < restarted for v in resumed.values())

    # MLflow: the killed search and its trial are KILLED; the trial runs are children of the search runs
    roles = statuses(tmp_path / "mlflow.db")
    assert sorted(roles["search"]) == ["FINISHED", "KILLED"]
    assert roles["trial"].count("FINISHED") == 3 and "RUNNING" not in roles["trial"]
    with sqlite3.connect(tmp_path / "mlflow.db") as conn:
        parents = conn.execute(
            "select count(*) from tags t join tags role on role.run_uuid = t.run_uuid and role.key = 'squeeze.role' "
            "and role.value = 'trial' join tags p on p.run_uuid = t.run_uuid and p.key = 'mlflow.parentRunId' "
            "join tags prole on prole.run_uuid = p.value and prole.key = 'squeeze.role' and prole.value = 'search' "
            "where t.key = 'squeeze.trial'"
        ).fetchone()[0]
    assert parents == len(roles["trial"])
    report = next((tmp_path / "artifacts" / "runs").glob("*/search/search.md")).read_text()
    assert "quantize.modes" in report and "eval acc" in report and "within budget" in report
    assert yaml.safe_load(open(path))["stages"][1]["modes"] == {"search": [["dynamic"], ["static"]]}


def test_trials_that_follow_a_training_trial_reuse_its_trained_student(tmp_path, tiny_model_dir):
    tree = make_tiny_config(tmp_path, tiny_model_dir)
    tree["stages"] = [
        {
            "kind": "distill",
            "students": {"search": [{"num_layers": 1}, {"layers": [1]}]},
            "training": {"epochs": 2, "learning_rate": 3e-3, "batch_size": 16},
        },
        {"kind": "export"},
        {"kind": "quantize", "modes": ["dynamic"], "per_channel": {"search": [True, False]}},
    ]
    tree["benchmark"] = {"threads": 1, "warmup": 1, "rounds": 1, "latency_texts": 10, "measure_rss": False}
    done = squeeze("search", recipe(tmp_path, tree), "--trials", "2", "--follow-ups", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "artifacts" / "search" / "tiny.journal"))
    )
    (name,) = optuna.get_all_study_names(storage)
    first, follower = optuna.load_study(study_name=name, storage=storage).trials
    assert follower.user_attrs["follows"] == 0 and "follows" not in first.user_attrs
    assert follower.params["distill.students"] == first.params["distill.students"]
    # the follower's student is the first trial's, made before the follower started
    (student,) = [v for v in follower.user_attrs["variants"] if v["stage"] == "distill"]
    assert student["id"] in {v["id"] for v in first.user_attrs["variants"]}
    assert student["made_at"] < follower.datetime_start.timestamp()
    report = next((tmp_path / "artifacts" / "runs").glob("*/search/search.md")).read_text()
    assert "| 1 (reuses #0) | COMPLETE |" in report


def test_a_screen_calibrates_on_its_first_students_then_keeps_only_those_that_could_keep_the_budget():
    assert verdict(0.30, [0.02]) is None  # one calibration could be a fluke: train in full
    assert verdict(0.10, [0.01, 0.03]) == pytest.approx(0.07)  # the most full training added to any student
    assert verdict(0.10, [-0.02, -0.01]) == pytest.approx(0.10)  # never stricter than the cheap drop itself


def test_a_screened_search_trains_in_full_only_the_students_that_could_keep_the_budget(tmp_path, tiny_model_dir):
    tree = make_tiny_config(tmp_path, tiny_model_dir)
    tree["stages"] = [
        {
            "kind": "distill",
            # the teacher's own two layers learn at once; a width-8 student from scratch at a rate of 1e-8 cannot
            "students": {"search": [{"num_layers": 2}, {"num_layers": 2, "hidden_size": 8}]},
            "training": {"epochs": 2, "learning_rate": {"search": [3e-3, 2e-3, 1e-8]}, "batch_size": 16},
        },
        {"kind": "export"},
        {"kind": "quantize", "modes": ["dynamic"]},
    ]
    tree["benchmark"] = {"threads": 1, "warmup": 1, "rounds": 1, "latency_texts": 10, "measure_rss": False}
    path = recipe(tmp_path, tree)
    # the study as the search flow names it: after its form filled in the defaults
    space = SearchSpace(SearchRecipe.model_validate(yaml.safe_load(open(path))).to_tree(), str(path))
    study = open_study(space.first(), space, "latency")
    # two students that keep the budget calibrate the screen, then one that cannot is screened out
    for students, rate in (
        ('{"num_layers":2}', 3e-3),
        ('{"num_layers":2}', 2e-3),
        ('{"hidden_size":8,"num_layers":2}', 1e-8),
    ):
        study.enqueue_trial({"distill.students": students, "distill.training.learning_rate": rate})
    done = squeeze("search", path, "--trials", "3", "--follow-ups", "0", "--screen", "0.5")
    assert done.returncode == 0, done.stderr[-3000:]
    first, second, third = open_study(space.first(), space, "latency").trials
    for calibrating in (first, second):
        (record,) = calibrating.user_attrs["screen"]
        assert record["kept"] and record["best_drop"] is None and record["full"] is not None
        assert any(v["stage"] == "distill" for v in calibrating.user_attrs["variants"])
    (record,) = third.user_attrs["screen"]
    assert not record["kept"] and record["best_drop"] > 0.05 and record["full"] is None
    # not trained in full; the trial still scored what the rest of its chain made
    assert third.state.name == "COMPLETE" and third.values is not None
    assert not any(v["stage"] == "distill" for v in third.user_attrs["variants"])
    report = next((tmp_path / "artifacts" / "runs").glob("*/search/search.md")).read_text()
    assert "screened students" in report and "distill[L2-H8] out (cheap drop" in report
