"""A short end-to-end FSQ example: quantize a batch, decode the indices, train through the STE."""

import time

import torch

import fsq_kernels

torch.manual_seed(0)
print(f"fsq_kernels {fsq_kernels.__version__}, backends: {fsq_kernels.available_backends()}")

levels = [8, 5, 5, 5]  # 1000 codes
fsq = fsq_kernels.FSQ(levels, dim=64)
images = torch.randn(16, 64, 32, 32)  # (B, C, H, W) features
out, indices = fsq(images.movedim(1, -1))
print(f"out {tuple(out.shape)}, indices {tuple(indices.shape)} {indices.dtype}, codes used {indices.unique().numel()}/{fsq.codebook_size}")

decoded = fsq.indices_to_codes(indices)
assert torch.allclose(decoded, out, atol=1e-6)

# A few steps of training an autoencoder through the straight-through estimator.
encoder, decoder = torch.nn.Linear(32, 4), torch.nn.Linear(4, 32)
quantizer = fsq_kernels.FSQ(levels)
optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=3e-3)
data = torch.randn(4096, 32)
start = time.perf_counter()
for step in range(200):
    codes, _ = quantizer(encoder(data))
    loss = (decoder(codes) - data).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0 or step == 199:
        print(f"step {step:3d}  reconstruction mse {loss.item():.4f}")
print(f"done in {time.perf_counter() - start:.1f}s")
