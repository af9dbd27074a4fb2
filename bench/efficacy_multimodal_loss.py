"""The MultiModal loss on generated data like its authors' synthetic benchmark (not a unit test).

Three modalities of a binary problem, F features each. Every instance belongs to a subgroup:
in subgroup 0 (half of the data) modality 0 carries the class and modalities 1 and 2 are
noise; in subgroup 1 (a quarter) only modality 1 carries it, in subgroup 2 only modality 2.
So modality 0 is "the informative one" on average and modalities 1 and 2 look noisy, yet for
half of the instances the signal is in one of them: a fusion has to tell, per instance,
which modality to trust. The signal is a class prototype on a few dimensions of the
carrying modality (the other dimensions, and the other modalities, are Gaussian noise).

Each modality has an MLP encoder ending in C class probabilities z_m (softmax); three heads
are trained end to end on the concatenation z (B, M*C), the same encoders and optimiser:
  sum fusion      p = (1 / M) sum_m z_m       (the modalities' probabilities summed;
                                               trained by its negative log-likelihood)
  linear fusion   logits = Linear(M*C -> C)(z)
  MultiModal loss ek.MultiModalLoss(C, M)(z, y); predictions from .predict(z)
The authors report 0.873 (MultiModal), 0.794 (linear) and 0.696 (sum) on their generator;
this is our own generator, so the numbers are not theirs: the ordering is what to look at.

Usage: python bench/efficacy_multimodal_loss.py [--seeds 3] [--epochs 40] [--features 200]
"""

import argparse

import torch
import torch.nn.functional as F

import ether_kernels as ek

C, M, INFORMATIVE, HIDDEN = 2, 3, 8, 32


def make_data(n, features, generator):
    labels = torch.randint(0, C, (n,), generator=generator)
    subgroup = torch.multinomial(torch.tensor([0.5, 0.25, 0.25]), n, replacement=True,
                                 generator=generator)
    prototypes = torch.randn(M, C, INFORMATIVE, generator=torch.Generator().manual_seed(7))
    modalities = []
    for m in range(M):
        x = torch.randn(n, features, generator=generator)
        carries = subgroup == m
        x[carries, :INFORMATIVE] += 1.2 * prototypes[m, labels[carries]]
        modalities.append(x)
    return modalities, labels


class Encoders(torch.nn.Module):
    def __init__(self, features):
        super().__init__()
        self.nets = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(features, HIDDEN), torch.nn.ReLU(),
                                torch.nn.Linear(HIDDEN, C)) for _ in range(M))

    def forward(self, modalities):
        """z (B, M*C): the modalities' class probabilities, modality-major."""
        return torch.cat([torch.softmax(net(x), dim=1) for net, x in zip(self.nets, modalities)],
                         dim=1)


def train(head, seed, epochs, features, train_set, test_set):
    torch.manual_seed(seed)
    encoders = Encoders(features)
    if head == "linear":
        fusion = torch.nn.Linear(M * C, C)
    elif head == "multimodal":
        fusion = ek.MultiModalLoss(C, M)
    else:
        fusion = torch.nn.Module()
    optimizer = torch.optim.Adam(list(encoders.parameters()) + list(fusion.parameters()),
                                 lr=1e-3, weight_decay=1e-4)

    def logits_of(z):
        if head == "sum":
            return torch.log(z.view(-1, M, C).mean(dim=1).clamp_min(1e-12))
        return fusion(z) if head == "linear" else fusion.predict(z)

    (x_train, y_train), (x_test, y_test) = train_set, test_set
    n = y_train.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n)
        for start in range(0, n, 64):
            rows = order[start:start + 64]
            z = encoders([x[rows] for x in x_train])
            loss = fusion(z, y_train[rows]) if head == "multimodal" else \
                F.cross_entropy(logits_of(z), y_train[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predictions = logits_of(encoders(x_test)).argmax(dim=1)
    return (predictions == y_test).double().mean().item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--features", type=int, default=200)
    parser.add_argument("--train", type=int, default=2000)
    args = parser.parse_args()
    results = {head: [] for head in ("multimodal", "linear", "sum")}
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(1000 + seed)
        train_set = make_data(args.train, args.features, g)
        test_set = make_data(2000, args.features, g)
        for head in results:
            results[head].append(train(head, seed, args.epochs, args.features, train_set,
                                       test_set))
    print(f"| fusion | test accuracy (mean of {args.seeds} seeds) | per seed |")
    print("|---|---|---|")
    names = {"multimodal": "MultiModal loss", "linear": "learned linear fusion",
             "sum": "sum fusion"}
    for head, accs in results.items():
        print(f"| {names[head]} | {sum(accs) / len(accs):.3f} | "
              f"{', '.join(f'{a:.3f}' for a in accs)} |")


if __name__ == "__main__":
    main()
