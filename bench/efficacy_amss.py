"""Does AMSS rebalance? An efficacy study on generated two-modality data (not a unit test).

Two modalities of the same K-class problem: "easy" (class prototypes plus little noise) and
"weak" (prototypes plus much noise, and fewer informative dimensions). A model with one MLP
encoder per modality and concatenation fusion is trained three ways: plain joint training,
AMSS and AMSS+ (masking the encoders' gradients with ek.amss). Each modality's unimodal
accuracy is that of its share of the fusion layer alone (W[:, its block] z_m), the usual
measure of modality imbalance. Joint training lets the easy modality dominate, so the weak
encoder under-trains; AMSS gives the dominant modality the smaller update ratio.

The ratios need unimodal logits whose cross-entropy stays below H(Y) + 0.5: with the fusion
layer's shares, the weak modality's share reaches CE ~ 3.2 > ln 8 + 0.5 after one epoch, and
the spec's fallback (every ratio 0.5, as in the public code) fires at almost every step. So
each modality also has a linear probe trained on its detached features (no gradient into the
encoders): the probes' logits feed update_ratios.

Usage: python bench/efficacy_amss.py [--seeds 3] [--epochs 30]   (prints a markdown table)
"""

import argparse

import torch
import torch.nn.functional as F

import ether_kernels as ek

K, D_EASY, D_WEAK, HIDDEN = 8, 32, 32, 64


def make_data(n, generator):
    labels = torch.randint(0, K, (n,), generator=generator)
    proto_easy = torch.randn(K, D_EASY, generator=torch.Generator().manual_seed(100))
    proto_weak = torch.randn(K, D_WEAK, generator=torch.Generator().manual_seed(200))
    easy = proto_easy[labels] + 1.5 * torch.randn(n, D_EASY, generator=generator)
    weak = 0.6 * proto_weak[labels] + 1.6 * torch.randn(n, D_WEAK, generator=generator)
    return easy, weak, labels


class TwoEncoders(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.easy = torch.nn.Sequential(torch.nn.Linear(D_EASY, HIDDEN), torch.nn.ReLU(),
                                        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU())
        self.weak = torch.nn.Sequential(torch.nn.Linear(D_WEAK, HIDDEN), torch.nn.ReLU(),
                                        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU())
        self.fusion = torch.nn.Linear(2 * HIDDEN, K)
        self.probe_easy = torch.nn.Linear(HIDDEN, K)  # unimodal probes for the ratios
        self.probe_weak = torch.nn.Linear(HIDDEN, K)

    def forward(self, easy, weak):
        z_easy, z_weak = self.easy(easy), self.weak(weak)
        w = self.fusion.weight
        half_bias = self.fusion.bias / 2
        out_easy = z_easy @ w[:, :HIDDEN].t() + half_bias  # each modality's share
        out_weak = z_weak @ w[:, HIDDEN:].t() + half_bias
        probes = self.probe_easy(z_easy.detach()), self.probe_weak(z_weak.detach())
        return out_easy + out_weak, out_easy, out_weak, z_easy, z_weak, probes


def train(method, seed, epochs, train_set, test_set):
    torch.manual_seed(seed)
    model = TwoEncoders()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    masker = None
    if method != "joint":
        masker = ek.amss.SubnetworkMasker({"easy": model.easy.parameters(),
                                           "weak": model.weak.parameters()},
                                          mode=method, seed=seed)
    easy, weak, labels = train_set
    n = labels.shape[0]
    ratios_seen = []
    for _ in range(epochs):
        order = torch.randperm(n)
        for start in range(0, n, 64):
            idx = order[start:start + 64]
            out, out_e, out_w, z_e, z_w, probes = model(easy[idx], weak[idx])
            loss = F.cross_entropy(out, labels[idx]) + sum(
                F.cross_entropy(p, labels[idx]) for p in probes)  # probes: no encoder gradient
            optimizer.zero_grad()
            loss.backward()
            if masker is not None:
                ratios = ek.amss.update_ratios(list(probes), labels[idx], [z_e, z_w])
                ratios_seen.append(ratios)
                masker.step(ratios)
            optimizer.step()
    with torch.no_grad():
        out, out_e, out_w, _, _, _ = model(test_set[0], test_set[1])
        y = test_set[2]
        accuracy = lambda logits: (logits.argmax(1) == y).float().mean().item()  # noqa: E731
        mean_ratios = torch.stack(ratios_seen).mean(0).tolist() if ratios_seen else [1.0, 1.0]
        return accuracy(out), accuracy(out_e), accuracy(out_w), mean_ratios


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    train_set, test_set = make_data(2000, generator), make_data(2000, generator)
    print(f"AMSS efficacy: {K} classes, easy and weak modality, {args.epochs} epochs, "
          f"mean over {args.seeds} seeds (test accuracy)\n")
    print("| training | fused | easy modality alone | weak modality alone "
          "| mean ratio (easy, weak) |")
    print("|---|---|---|---|---|")
    for method in ("joint", "amss", "amss+"):
        runs = [train(method, seed, args.epochs, train_set, test_set) for seed in range(args.seeds)]
        fused = sum(r[0] for r in runs) / len(runs)
        easy = sum(r[1] for r in runs) / len(runs)
        weak = sum(r[2] for r in runs) / len(runs)
        ratios = [sum(r[3][m] for r in runs) / len(runs) for m in range(2)]
        ratio_text = "-" if method == "joint" else f"{ratios[0]:.2f}, {ratios[1]:.2f}"
        print(f"| {method} | {fused:.3f} | {easy:.3f} | {weak:.3f} | {ratio_text} |")


if __name__ == "__main__":
    main()
