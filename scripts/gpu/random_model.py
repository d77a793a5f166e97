"""Decoders shaped like the real targets, with random weights of a trained model's scale: the GPU
scripts time kernels and host work on them without staging a GGUF (the time of a forward does not
depend on the weights' values)."""
import torch

from semiar.models.decoder import Decoder, DecoderConfig

# the shapes of the real models (their config.json)
RANDOM = {"qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                               num_heads=12, num_kv_heads=2),
          "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                               num_heads=14, num_kv_heads=2),
          "qwen2.5-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                             num_heads=16, num_kv_heads=2),
          "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                             num_heads=28, num_kv_heads=4, tie_word_embeddings=False)}


def random_decoder(name: str, device: str = "cuda") -> Decoder:
    if name not in RANDOM:
        raise SystemExit(f"unknown random model {name!r}; choose from {', '.join(RANDOM)}")
    shape = {"tie_word_embeddings": True, **RANDOM[name]}
    cfg = DecoderConfig(**shape, attention_bias=True, rope_theta=1e6, model_type="qwen2",
                        max_position_embeddings=32768)
    torch.manual_seed(0)
    with torch.device(device):
        d = Decoder(cfg).to(torch.bfloat16).eval()
    for layer in d.layers:  # weights of a trained model's scale (~0.02), norms at one
        for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            torch.nn.init.normal_(lin.weight, std=0.02)
    torch.nn.init.normal_(d.embed_tokens.weight, std=0.02)
    if d.lm_head.weight is not d.embed_tokens.weight:
        torch.nn.init.normal_(d.lm_head.weight, std=0.02)
    return d
