"""Train the autoencoder of the shipped latent DiT (src/diffprune/assets/mnist-dit/vae): an AutoencoderKL that maps
16x16 MNIST digits to 8x8x4 latents.

    python tools/train_autoencoder.py [--out runs/mnist-vae] [--steps 2000] [--seed 0]

Loss: L1 + MSE reconstruction plus a small KL term (weight --kl), Adam with a cosine decay; batch of the bundled
9,000-image train split. Then ``scaling_factor`` is set to 1 / std of the training latents (the posterior means), as
Stable Diffusion's 0.18215 was chosen, so the diffusion model sees unit-variance latents. Reports reconstruction
PSNR and the shipped classifier's accuracy on reconstructions of the 1,000 test digits, and writes a diffusers
folder (config.json + diffusion_pytorch_model.safetensors) with metrics.json.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from diffprune.classifier import load_classifier, predict
from diffprune.data import load_data, mnist_labels, to_model_range

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--out", default="runs/mnist-vae")
p.add_argument("--steps", type=int, default=2000)
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--kl", type=float, default=1e-6, help="weight of the KL term")
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()

torch.manual_seed(args.seed)
t0 = time.time()
train_x = to_model_range(load_data("mnist", resolution=16, channels=1, split="train").images)
test = load_data("mnist", resolution=16, channels=1, split="test")
vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(16, 32),
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    layers_per_block=1, norm_num_groups=8, sample_size=16)
opt = torch.optim.Adam(vae.parameters(), lr=args.lr)
gen = torch.Generator().manual_seed(args.seed)
for step in tqdm(range(args.steps), desc="autoencoder"):
    for g in opt.param_groups:
        g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
    x = train_x[torch.randint(0, len(train_x), (args.batch_size,), generator=gen)]
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator=gen)).sample
    loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + args.kl * posterior.kl().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

vae.eval()
with torch.no_grad():
    means = torch.cat([vae.encode(train_x[i:i + 512]).latent_dist.mean for i in range(0, len(train_x), 512)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    x_test = to_model_range(test.images)
    recon = torch.cat([vae.decode(vae.encode(x_test[i:i + 512]).latent_dist.mean).sample
                       for i in range(0, len(x_test), 512)]).clamp(-1, 1)
mse = F.mse_loss((recon + 1) / 2, (x_test + 1) / 2).item()
label, conf = predict(load_classifier("mnist-classifier"), recon)
real_label, _ = predict(load_classifier("mnist-classifier"), x_test)
out = Path(args.out)
vae.save_pretrained(out, safe_serialization=True)
metrics = {"test_psnr_db": round(10 * math.log10(1 / mse), 2),
           "classifier_accuracy_on_reconstructions": (label == mnist_labels("test")).float().mean().item(),
           "classifier_accuracy_on_real": (real_label == mnist_labels("test")).float().mean().item(),
           "latent_shape": list(means.shape[1:]), "scaling_factor": vae.config.scaling_factor,
           "params": sum(p.numel() for p in vae.parameters()), "seconds": round(time.time() - t0, 1),
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "command": "python tools/train_autoencoder.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                       for k, v in vars(args).items())}
(out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
print(json.dumps(metrics, indent=2))
