"""The embedded world's grammar, prompt sets, renderer and analytic evaluator."""
import random

import numpy as np
import pytest

from leapalign import shapeworld
from leapalign.shapeworld import shapeeval as ev
from leapalign.shapeworld import world


def test_render_is_deterministic_and_antialiased():
    a = world.render("a red circle to the left of a blue square", seed=7)
    b = world.render("a red circle to the left of a blue square", seed=7)
    c = world.render("a red circle to the left of a blue square", seed=8)
    assert a.shape == (32, 32, 3) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # edges are blended: some pixels are neither background nor a palette colour
    palette = np.array([world.BACKGROUND, *world.COLORS.values()], np.float32)
    dist = np.abs(a.reshape(-1, 1, 3) - palette[None]).sum(-1).min(-1)
    assert (dist > 0.05).sum() > 5


def test_every_caption_parses_back_to_its_spec():
    for spec in world._all_specs():
        assert world.parse(world.caption(spec)) == spec


@pytest.mark.parametrize("bad", ["a dog", "three red circles", "a red circle next to a blue square", ""])
def test_parse_rejects_prompts_outside_the_grammar(bad):
    with pytest.raises(ValueError, match="not a ShapeWorld prompt"):
        world.parse(bad)


def test_prompt_sets_are_balanced_and_hold_out_compositions():
    train, rows = set(world.prompts("train")), world.prompt_rows("eval")
    assert len(train) > 1000 and 200 <= len(rows) <= 400
    tags = [r["tag"] for r in rows]
    assert {t: tags.count(t) for t in world.TAGS} == {t: len(rows) // 6 for t in world.TAGS}
    for r in rows:
        assert world.parse(r["prompt"]).tag == r["tag"]
        if r["tag"] in ("position", "color_attr"):
            assert r["prompt"] not in train  # held-out compositions
    # the shipped files are what the grammar generates
    assert [ {k: v for k, v in r.items()} for r in rows] == world._build_sets()["eval"]
    assert sorted(train) == sorted(r["prompt"] for r in world._build_sets()["train"])


def test_unknown_prompt_set_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown ShapeWorld prompt set 'tests'"):
        shapeworld.prompts("tests")


def test_shapeeval_scores_ground_truth_renders_near_one():
    rows = world.prompt_rows("eval")
    prompts = [r["prompt"] for r in rows]
    res = shapeworld.evaluate(world.render_batch(prompts, [1000 + r["seed"] for r in rows]), prompts)
    assert res["overall"] >= 0.99, res
    assert set(res) == {"overall", *world.TAGS}


def test_shapeeval_scores_mismatched_prompts_near_zero():
    rows = world.prompt_rows("eval")
    prompts = [r["prompt"] for r in rows]
    images = world.render_batch(prompts, [2000 + r["seed"] for r in rows])
    rng = random.Random(0)
    wrong = [world.mismatch(p, rng) for p in prompts]
    assert all(w != p and world.parse(w).tag == world.parse(p).tag for w, p in zip(wrong, prompts))
    assert shapeworld.evaluate(images, wrong)["overall"] <= 0.02


def test_shapeeval_detects_shape_colour_and_position():
    img = world.render_scene([world.Shape("triangle", "green", 8, 16, 6.5), world.Shape("circle", "purple", 24, 16, 4.0)])
    dets = sorted(ev.detect(img), key=lambda d: d.cx)
    assert [(d.shape, d.color, d.size) for d in dets] == [("triangle", "green", "big"), ("circle", "purple", "small")]
    assert ev.check(img, "a green triangle to the left of a purple circle")
    assert not ev.check(img, "a green triangle to the right of a purple circle")
    assert not ev.check(img, "a green triangle")  # two objects where one was asked for
    blank = np.full((32, 32, 3), world.BACKGROUND, np.float32)
    assert ev.detect(blank) == []


def test_position_parts_separate_drawing_both_objects_from_their_relation():
    rows = [r for r in world.prompt_rows("eval") if world.parse(r["prompt"]).tag == "position"]
    for r in rows[:12]:
        img = world.render(r["prompt"], 3000 + r["seed"])
        spec = world.parse(r["prompt"])
        flipped = world.flip_relation(r["prompt"])
        assert world.parse(flipped).objects == spec.objects and world.flip_relation(flipped) == r["prompt"]
        assert ev.position_parts(img, r["prompt"]) == (True, True)
        assert ev.position_parts(img, flipped) == (True, False)
        assert ev.position_parts(img, world.caption(world.PromptSpec("position", spec.objects[::-1], spec.relation))) == (True, False)
        # one layout read under both words: the offsets cancel, so it cannot pass both
        assert ev.relation_offset(img, r["prompt"]) > 3.0 and ev.relation_offset(img, flipped) == -ev.relation_offset(img, r["prompt"])
    one = world.render_scene([world.Shape("triangle", "green", 8, 16, 6.5)])
    assert ev.position_parts(one, "a green triangle to the left of a purple circle") == (False, False)
    assert ev.relation_offset(one, "a green triangle to the left of a purple circle") is None
    with pytest.raises(ValueError, match="not a position prompt"):
        ev.position_parts(one, "a green triangle")


def test_evaluate_rejects_count_mismatch():
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        shapeworld.evaluate(np.zeros((2, 32, 32, 3), np.float32), ["a circle"])
