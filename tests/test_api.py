"""The image API: generate_images with each method, seeds shared across methods, the grid file."""

import torch

import semiar
from semiar.bench.image_quality import frechet_distance


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
