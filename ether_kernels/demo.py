"""The main job (`make demo`): train a small two-modality regression model with EtherLoss.

Synthetic data: every sample has an "audio" view (64 features) and a "video" view (96
features) of one hidden 16-dim state; the target is a 256-dim signal read out of that
state. Each modality has its own encoder and head predicting the full target, and the two
predictions are concatenated along dim 1, so y_pred is (B, 512) with channels 0..255 from
audio and 256..511 from video. EtherLoss([slice(0, 256), slice(256, 512)]) then adds, to the
MSE, the gap between each modality's mean prediction and the overall mean.

The same model, data and seed are trained twice: with the package's automatic backend
(the C++ kernels on CPU, Triton on a GPU) and with the pure-PyTorch reference. It prints
the loss falling, checks that both runs agree, and compares the time per step.

    python -m ether_kernels.demo [--steps 300] [--batch 512] [--device cpu|cuda]
"""

import argparse
import time

import torch

import ether_kernels as ek

TARGET_DIM = 256


class TwoModalityRegressor(torch.nn.Module):
    def __init__(self, audio_dim=64, video_dim=96, hidden=128):
        super().__init__()
        self.audio = torch.nn.Sequential(torch.nn.Linear(audio_dim, hidden), torch.nn.GELU(),
                                         torch.nn.Linear(hidden, TARGET_DIM))
        self.video = torch.nn.Sequential(torch.nn.Linear(video_dim, hidden), torch.nn.GELU(),
                                         torch.nn.Linear(hidden, TARGET_DIM))

    def forward(self, audio, video):
        return torch.cat([self.audio(audio), self.video(video)], dim=1)  # (B, 2 * TARGET_DIM)


def make_data(samples, generator, device):
    state = torch.randn(samples, 16, generator=generator)
    audio = torch.tanh(state @ torch.randn(16, 64, generator=generator)) + 0.1 * torch.randn(samples, 64, generator=generator)
    video = torch.sin(state @ torch.randn(16, 96, generator=generator)) + 0.3 * torch.randn(samples, 96, generator=generator)
    target = torch.tanh(state @ torch.randn(16, TARGET_DIM, generator=generator)) + 0.5
    return audio.to(device), video.to(device), target.to(device)


def train(backend, steps, batch, device, log_every, seed=0):
    generator = torch.Generator().manual_seed(seed)
    audio, video, target = make_data(batch * 16, generator, device)
    torch.manual_seed(seed)
    model = TwoModalityRegressor().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    criterion = ek.EtherLoss([slice(0, TARGET_DIM), slice(TARGET_DIM, 2 * TARGET_DIM)], alpha=0.5)
    losses, step_times, loss_times = [], [], []
    with ek.use_backend(backend):
        for step in range(steps):
            index = torch.randint(0, audio.shape[0], (batch,), generator=generator).to(device)
            y_true = target[index].repeat(1, 2)  # both modality heads predict the target
            start = time.perf_counter()
            y_pred = model(audio[index], video[index])
            loss = criterion(y_pred, y_true)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()
            end = time.perf_counter()
            step_times.append(end - start)
            losses.append(loss.item())
            # The loss on its own: forward and backward through a detached copy.
            pred = y_pred.detach().requires_grad_(True)
            loss_start = time.perf_counter()
            torch.autograd.grad(criterion(pred, y_true), (pred,))
            if device == "cuda":
                torch.cuda.synchronize()
            loss_times.append(time.perf_counter() - loss_start)
            if log_every and (step % log_every == 0 or step == steps - 1):
                print(f"  [{backend:>9}] step {step:4d}  loss {losses[-1]:.5f}")
    return losses, step_times, loss_times


def median(values):
    ordered = sorted(values[len(values) // 10:])  # skip the warm-up tenth
    return ordered[len(ordered) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    info = ek.info()
    print(f"ether_kernels {info['version']}: C++ {info['cpp']} (SIMD {info['simd']}, "
          f"{info['threads']} threads), Triton {info['triton']}, CUDA {info['cuda']}")
    fast = "auto"
    print(f"\nTraining {args.steps} steps, batch {args.batch}, y_pred {args.batch}x{2 * TARGET_DIM}, "
          f"on {args.device}: EtherLoss(2 modalities, alpha=0.5)")
    losses, step_times, loss_times = train(fast, args.steps, args.batch, args.device, log_every=50)
    print("\nThe same run on the pure-PyTorch reference:")
    ref_losses, ref_step_times, ref_loss_times = train("reference", args.steps, args.batch, args.device,
                                                       log_every=100)

    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    drift = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, ref_losses))
    print(f"\nloss fell from {first:.4f} to {last:.4f} ({first / last:.1f}x lower)")
    print(f"largest relative gap between the two runs' losses: {drift:.2e}")
    print(f"time per training step: {median(step_times) * 1e3:.3f} ms ours, "
          f"{median(ref_step_times) * 1e3:.3f} ms reference "
          f"({median(ref_step_times) / median(step_times):.2f}x)")
    print(f"loss forward+backward alone: {median(loss_times) * 1e6:.1f} us ours, "
          f"{median(ref_loss_times) * 1e6:.1f} us reference "
          f"({median(ref_loss_times) / median(loss_times):.2f}x)")
    if not last < first:
        raise SystemExit("the loss did not fall")
    if drift > 1e-3:
        raise SystemExit("the fast path and the reference disagree")


if __name__ == "__main__":
    main()
