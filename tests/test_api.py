"""The Python API: `Session` (a target and drafter loaded once), the one-call front doors, and the image API
(generate_images with each method, seeds shared across methods, the grid file)."""

import pytest
import torch

import semiar
from semiar.bench.image_quality import frechet_distance
from semiar.errors import InvalidArgumentError
from tiny import tiny_model_dir


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return semiar.load_model(str(tiny_model_dir(tmp_path_factory.mktemp("api") / "m")))


def test_a_session_reuses_its_drafter_and_equals_one_call_generate(target):
    s = semiar.Session(target, method="pld")
    prompts = ["abc abc abc", "hello hello", "abc abc abc"]
    got = [s.generate(p, max_new_tokens=16).token_ids for p in prompts]
    assert got == [semiar.generate(p, target, max_new_tokens=16).token_ids for p in prompts]
    assert s.generate("hi", chat=True, max_new_tokens=8).method == "pld"


def test_messages_go_through_the_chat_template(target):
    s = semiar.Session(target)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert s.encode(msgs) == target.encode("hi", chat=True, system="be brief")
    assert s.generate(msgs, max_new_tokens=8).token_ids == semiar.generate(
        "hi", target, chat=True, system="be brief", max_new_tokens=8).token_ids
    with pytest.raises(InvalidArgumentError, match="system message"):
        s.encode(msgs, system="again")


def test_options_are_checked_before_a_model_loads():
    with pytest.raises(InvalidArgumentError, match="unknown method"):
        semiar.Session.check_options(method="warp")
    with pytest.raises(InvalidArgumentError, match="top-p"):
        semiar.stream("hi", "no-such-model-is-loaded", top_p=0)


def test_generate_images_greedy_sjd_equals_ar():
    ar = semiar.generate_images("mnist-vq", cls=4, n=2, method="ar", temperature=0)
    sjd = semiar.generate_images("mnist-vq", cls=4, n=2, method="sjd", temperature=0, cfg=1.0)
    assert sjd.codes == ar.codes
    assert sjd.summary()["steps_per_image"] < ar.summary()["steps_per_image"] == 49


def test_generate_images_with_cfg_same_seed_same_images():
    a = semiar.generate_images("mnist-vq", cls=7, n=2, method="sjd", cfg=2.0, seed=5)
    b = semiar.generate_images("mnist-vq", cls=7, n=2, method="sjd", cfg=2.0, seed=5)
    assert a.codes == b.codes and a.images.shape == (2, 1, 28, 28)


def test_save_grid(tmp_path):
    from PIL import Image

    semiar.save_image_grid(torch.rand(5, 1, 28, 28), str(tmp_path / "g.png"), scale=1)
    assert Image.open(tmp_path / "g.png").size == (3 * 30, 2 * 30)


def test_frechet_distance_of_identical_gaussians_is_zero():
    cov = torch.eye(3).numpy() * 2
    assert abs(frechet_distance([0, 0, 0], cov, [0, 0, 0], cov)) < 1e-9
    assert abs(frechet_distance([1, 0, 0], cov, [0, 0, 0], cov) - 1.0) < 1e-9
