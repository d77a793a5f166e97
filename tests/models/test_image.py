"""The image-token family: LlamaGen-format loading (random weights of that architecture, written
with LlamaGen's state-dict names), the 2-D rotary table, tree forwards = sequential ones, CFG."""

import json

import pytest
import torch

from semiar.errors import InvalidArgumentError, ModelFileError, UnknownModelError
from semiar.models.image import (ImageGPT, ImageGPTConfig, LoadedImageModel, llamagen_config, load_image_model,
                                 rope_2d)
from semiar.models.vq import VQConfig, VQModel, code_neighbours

GPT_CFG = ImageGPTConfig(vocab_size=64, dim=64, n_layer=2, n_head=4, multiple_of=32, num_classes=5, grid=4)
VQ_CFG = VQConfig(codebook_size=64, codebook_embed_dim=8, ch=32, ch_mult=(1, 2, 2), z_channels=32,
                  num_res_blocks=1, in_channels=3, image_size=16)


def tiny_image_model(cfg_scale=1.0, seed=0) -> LoadedImageModel:
    torch.manual_seed(seed)
    gpt = ImageGPT(GPT_CFG)
    for p in gpt.parameters():
        torch.nn.init.normal_(p, std=0.3)
    m = LoadedImageModel("tiny", None, gpt.eval(), VQModel(VQ_CFG).eval())
    return m.guided(cfg_scale) if cfg_scale != 1.0 else m


def _llamagen_names(gpt_sd: dict, vq_sd: dict) -> tuple[dict, dict]:
    """Our state dicts as a LlamaGen checkpoint holds them: `model` wrappers, a DDP prefix on the
    VQ, LlamaGen's extra buffers; the names inside are LlamaGen's own."""
    gpt = {"model": {**gpt_sd, "freqs_cis": torch.zeros(3)}}
    vq = {"model": {**{"module." + k: v for k, v in vq_sd.items()}, "module.quantize.codebook_used": torch.zeros(65536)}}
    return gpt, vq


LLAMAGEN_GPT_NAMES = ["tok_embeddings.weight", "cls_embedding.embedding_table.weight", "layers.0.attention.wqkv.weight",
                      "layers.0.attention.wo.weight", "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w2.weight",
                      "layers.0.feed_forward.w3.weight", "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight",
                      "norm.weight", "output.weight"]
LLAMAGEN_VQ_NAMES = ["encoder.conv_in.weight", "encoder.conv_blocks.0.res.0.norm1.weight",
                     "encoder.conv_blocks.0.downsample.conv.weight", "encoder.conv_blocks.2.attn.0.q.weight",
                     "encoder.mid.1.proj_out.weight", "encoder.norm_out.weight", "encoder.conv_out.weight",
                     "decoder.conv_blocks.0.attn.0.k.weight", "decoder.conv_blocks.0.upsample.conv.weight",
                     "decoder.conv_blocks.0.res.0.nin_shortcut.weight", "decoder.conv_out.weight",
                     "quantize.embedding.weight", "quant_conv.weight", "post_quant_conv.weight"]


def test_names_are_llamagens():
    m = tiny_image_model()
    gpt_names, vq_names = set(m.gpt.state_dict()), set(m.vq.state_dict())
    assert set(LLAMAGEN_GPT_NAMES) <= gpt_names
    assert {n for n in LLAMAGEN_VQ_NAMES if "nin_shortcut" not in n} <= vq_names


def test_rope_2d_matches_the_grid():
    t = rope_2d(GPT_CFG)  # [1 + 16, head_dim / 2, 2]
    assert t.shape == (17, 8, 2)
    assert t[0].abs().sum() == 0  # the class token is not rotated (LlamaGen zeroes it)
    # cell (row 1, col 2) = position 1 + 1 * 4 + 2: rows in the first half, columns in the second
    row, col = t[1 + 4 + 2, :4], t[1 + 4 + 2, 4:]
    assert torch.allclose(row, t[1 + 4 + 0, :4]) and torch.allclose(col, t[1 + 0 + 2, 4:])


def test_llamagen_checkpoint_loads(tmp_path):
    src = tiny_image_model(seed=1)
    gpt_ckpt, vq_ckpt = _llamagen_names(src.gpt.state_dict(), src.vq.state_dict())
    torch.save(gpt_ckpt, tmp_path / "gpt.pt")
    torch.save(vq_ckpt, tmp_path / "vq.pt")
    (tmp_path / "config.json").write_text(json.dumps({"gpt": GPT_CFG.to_dict(), "vq": VQ_CFG.to_dict()}))
    m = load_image_model(str(tmp_path))
    ids = torch.tensor([[GPT_CFG.class_token(2), 5, 6, 7]])
    assert torch.allclose(m.gpt(ids, m.gpt.new_cache(8)).logits, src.gpt(ids, src.gpt.new_cache(8)).logits, atol=1e-5)
    codes = torch.randint(64, (1, 16))
    assert torch.allclose(m.decode(codes), src.decode(codes), atol=1e-5)


def test_llamagen_config_sizes():
    cfg = llamagen_config("GPT-B", image_size=256, downsample=16)
    assert cfg["gpt"]["dim"] == 768 and cfg["gpt"]["n_layer"] == 12 and cfg["gpt"]["grid"] == 16
    assert ImageGPTConfig.from_dict(cfg["gpt"]).ffn_dim == 2048  # LlamaGen's GPT-B feed-forward width
    with pytest.raises(InvalidArgumentError):
        llamagen_config("GPT-Q")


def test_bad_directories(tmp_path):
    with pytest.raises(UnknownModelError):
        load_image_model(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelFileError):
        load_image_model(str(tmp_path))


def test_tree_forward_equals_sequential():
    m = tiny_image_model()
    seq = [GPT_CFG.class_token(1), 3, 9, 4]
    full = m.gpt(torch.tensor([seq]), m.gpt.new_cache(8)).logits[0]
    # root + a tree with two branches: [3, 9] and [4] both below the root... position ids by depth
    from semiar.tree import DraftTree

    tree = DraftTree([3, 9, 11], [-1, 0, -1])
    cache = m.gpt.new_cache(8)
    out = m.gpt(torch.tensor([[seq[0]] + tree.tokens]), cache, positions=tree.positions(0).unsqueeze(0),
                tree_mask=tree.attention_mask()).logits[0]
    assert torch.allclose(out[:3], full[:3], atol=1e-5)


def test_cfg_mixes_cond_and_uncond():
    m = tiny_image_model()
    g = m.guided(3.0)
    ids = torch.tensor([[GPT_CFG.class_token(2), 5]])
    cond = m.gpt(ids, m.gpt.new_cache(4)).logits
    uncond = m.gpt(torch.tensor([[GPT_CFG.class_token(GPT_CFG.null_class), 5]]), m.gpt.new_cache(4)).logits
    got = g.runner(ids, g.runner.new_cache(4)).logits
    assert torch.allclose(got, uncond + 3.0 * (cond - uncond), atol=1e-5)
    with pytest.raises(InvalidArgumentError):
        m.guided(0.5)
    with pytest.raises(InvalidArgumentError):
        m.prompt(5)


def test_code_neighbours_nearest_first():
    book = torch.tensor([[0.0], [1.0], [3.0], [1.5]])
    assert code_neighbours(book, 2).tolist() == [[1, 3], [3, 0], [3, 1], [1, 2]]


def test_shipped_model_decodes_digits():
    m = load_image_model("mnist-vq")
    assert m.tokens_per_image == 49 and m.config.num_classes == 10
    img = m.decode(torch.zeros(2, 49, dtype=torch.long))
    assert img.shape == (2, 1, 28, 28) and 0 <= float(img.min()) and float(img.max()) <= 1
