"""A tiny random StableDiffusionPipeline saved to ./tiny-sd (16x16 RGB images, 8x8x4 latents, 16-token prompts): try
diffprune on text-to-image without downloading anything. Needs `pip install 'diffprune[sd]'` (transformers)."""
import json, pathlib, torch, transformers
from tokenizers.pre_tokenizers import ByteLevel
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

voc = pathlib.Path("tiny-vocab"); voc.mkdir(exist_ok=True)      # a byte-level CLIP tokenizer, no merges
chars = sorted(ByteLevel.alphabet())
vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
(voc / "vocab.json").write_text(json.dumps(vocab)); (voc / "merges.txt").write_text("#version: 0.2\n")
tokenizer = transformers.CLIPTokenizer(str(voc / "vocab.json"), str(voc / "merges.txt"), model_max_length=16)
torch.manual_seed(0)
text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
    vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"], eos_token_id=len(vocab) - 1,
    pad_token_id=len(vocab) - 1))
unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                            out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                            attention_head_dim=8, norm_num_groups=8)
vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    norm_num_groups=8, sample_size=16)
StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(clip_sample=False),
                        safety_checker=None, feature_extractor=None, requires_safety_checker=False
                        ).save_pretrained("tiny-sd")
