"""The training tasks of the input pipeline: the release's four prompts, each with its answer (the
scene graph, or the objects with their attributes or relationships, or the objects alone), drawn per
video by `data.task_mix`."""
import json

import numpy as np
import pytest

from data_gen.record import to_traser_json
from data_gen.shards import ShardReader
from traser_jax import config as config_lib
from traser_jax import data as data_lib
from traser_jax import tokens as tokens_lib
from traser_jax.tokenizer import PROMPTS, load_tokenizer

from train_fixtures import SMALL_INPUTS, write_toyworld


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return ShardReader(write_toyworld(root / "shards", num_videos=2)), root


def test_each_task_answers_what_its_prompt_asks(toy):
    reader, _ = toy
    record = reader[0].record
    full = to_traser_json(record)
    assert full["relationships"], "the fixture video needs relations"
    names = [{k: v for k, v in o.items() if k != "attributes"} for o in full["objects"]]
    assert json.loads(data_lib.target_text(record)) == full
    assert json.loads(data_lib.target_text(record, "scene_graph")) == full
    assert json.loads(data_lib.target_text(record, "attributes")) == {"objects": full["objects"]}
    assert json.loads(data_lib.target_text(record, "relationships")) == {"objects": names,
                                                                         "relationships": full["relationships"]}
    assert json.loads(data_lib.target_text(record, "objects")) == {"objects": names}


def test_tasks_are_drawn_per_video_by_weight():
    ids = [f"video-{i:05d}" for i in range(4000)]
    mix = {"scene_graph": 3.0, "attributes": 1.0, "objects": 0.0}
    tasks = [data_lib.task_of(v, mix) for v in ids]
    assert tasks == [data_lib.task_of(v, dict(mix)) for v in ids]  # a function of the id alone
    share = np.mean([t == "attributes" for t in tasks])
    assert 0.22 < share < 0.28, share
    assert "objects" not in tasks and set(tasks) == {"scene_graph", "attributes"}
    assert {data_lib.task_of(v, {"scene_graph": 1.0}) for v in ids[:50]} == {"scene_graph"}


@pytest.mark.parametrize("mix, message", [({"captions": 1.0}, "unknown task 'captions'"),
                                          ({"scene_graph": -1.0}, "must be a number >= 0"),
                                          ({"scene_graph": 0.0}, "sum to 0"),
                                          ({}, "expected {task: weight}")])
def test_a_bad_task_mix_is_refused(mix, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        data_lib.check_task_mix(mix)


def test_featurize_asks_the_task_and_labels_its_answer(toy):
    reader, root = toy
    cfg = config_lib.load("tiny", [f"data.train_dir={root / 'shards'}", f"train.run_dir={root / 'run'}",
                                   *SMALL_INPUTS, "data.task_mix={attributes: 1.0}"])
    tokenizer = load_tokenizer(data_lib.run_tokenizer(cfg))
    token_fn = tokens_lib.as_token_fn(tokenizer)
    example = reader[1]
    features = data_lib.featurize(example, cfg, token_fn)
    ids, labels = features.inputs.input_ids, features.inputs.labels
    answer = labels[labels != tokens_lib.IGNORE_INDEX]
    assert answer.tolist() == token_fn(data_lib.target_text(example.record, "attributes") + "<|im_end|>")
    prefix, _ = tokens_lib.chat_texts(PROMPTS["attributes"])
    assert ids[:len(token_fn(prefix))].tolist() == token_fn(prefix)
    # Without a target (inference) the prompt is the scene graph's, whatever the training mix.
    asked = data_lib.featurize(example, cfg, token_fn, with_target=False).inputs.input_ids
    prefix, _ = tokens_lib.chat_texts(cfg.data.prompt)
    assert asked[:len(token_fn(prefix))].tolist() == token_fn(prefix)


def test_the_tokenizer_refuses_a_bad_task_mix_before_reading_data(tmp_path):
    cfg = config_lib.load("tiny", [f"data.train_dir={tmp_path / 'none'}", f"train.run_dir={tmp_path / 'run'}",
                                   "data.task_mix={captions: 1.0}"])
    with pytest.raises(config_lib.ConfigError, match="unknown task 'captions'"):
        data_lib.run_tokenizer(cfg)
