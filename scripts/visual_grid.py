"""The sample grid in docs/visual.md: for every class, the same 4 seeds under each variant, one
panel per variant side by side (ar | sjd | lantern | gsd by default).

    PYTHONPATH=src python scripts/visual_grid.py --out docs/img/visual-grid.png --cfg 2 \
        --variants ar sjd lantern:16,0.4 gsd:16
"""

from __future__ import annotations

import argparse

import torch

import semiar
from semiar.bench.image import parse_variant
from semiar.models.image import load_image_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/img/visual-grid.png")
    ap.add_argument("--model", default="mnist-vq")
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=["ar", "sjd", "lantern:16,0.4", "gsd:16"])
    a = ap.parse_args()
    model = load_image_model(a.model)
    panels = []
    for spec in a.variants:
        method, kw = parse_variant(spec)
        rows = [semiar.generate_images(model, cls=c, n=a.per_class, method=method, cfg=a.cfg, seed=a.seed + 100 * c,
                                       **kw).images for c in range(model.config.num_classes)]
        panels.append(torch.cat(rows))  # [classes * per_class, 1, 28, 28], class by class
        print(spec, flush=True)
    # interleave the panels row by row: class c's samples of every variant on one line
    n = a.per_class
    lines = []
    for c in range(model.config.num_classes):
        for p in panels:
            lines.append(p[c * n:(c + 1) * n])
            lines.append(torch.zeros(1, *p.shape[1:]))  # a blank cell between variants
    grid = torch.cat(lines)
    semiar.save_image_grid(grid, a.out, columns=len(panels) * (n + 1), scale=1)
    print(f"wrote {a.out}: variants {', '.join(a.variants)} left to right, classes 0-9 top to bottom")


if __name__ == "__main__":
    main()
