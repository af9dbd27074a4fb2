"""DTW and soft-DTW in plain PyTorch, written to read like the spec (specs/dtw.md).

Batched over pairs and vectorised along anti-diagonals: every cell (i, j) with i + j = d
depends only on diagonals d - 1 and d - 2, so one step computes a whole diagonal of every
pair at once. Autograd gives the gradients (soft-DTW's expected alignment E = dR[n][m]/dcost).

    R[0][0] = 0,  R[i][0] = R[0][j] = +inf
    R[i][j] = cost[i][j] + min_or_softmin(R[i-1][j-1], R[i-1][j], R[i][j-1])
    value   = R[n][m]   (per pair, with its own lengths n <= N and m <= M)

Cells outside the band or beyond a pair's lengths are +inf and get no gradient.
"""

import math

import torch

METRICS = ("sqeuclidean", "euclidean", "l1")


def pairwise_cost(x, y, metric="sqeuclidean"):
    """(B, N, D), (B, M, D) -> (B, N, M) local costs. Differentiable (sqrt made safe at 0)."""
    diff = x[:, :, None, :] - y[:, None, :, :]
    if metric == "l1":
        return diff.abs().sum(-1)
    squared = (diff * diff).sum(-1)
    if metric == "sqeuclidean":
        return squared
    positive = squared > 0  # sqrt'(0) is infinite: give such cells a zero gradient instead
    return torch.where(positive, torch.sqrt(torch.where(positive, squared, 1.0)), 0.0)


def allowed_cells(x_lengths, y_lengths, N, M, band):
    """(B, N, M) bool: cell (i, j) (1-based) lies within the pair's lengths and its band.

    Band r (Sakoe-Chiba radius): -r + min(0, m - n) <= j - i <= r + max(0, m - n), widened by
    the length difference so that the end cell (n, m) is always reachable.
    """
    device = x_lengths.device
    i = torch.arange(1, N + 1, device=device).view(1, N, 1)
    j = torch.arange(1, M + 1, device=device).view(1, 1, M)
    n = x_lengths.view(-1, 1, 1)
    m = y_lengths.view(-1, 1, 1)
    allowed = (i <= n) & (j <= m)
    if band is not None:
        lower = -band + torch.clamp(m - n, max=0)
        upper = band + torch.clamp(m - n, min=0)
        allowed = allowed & (j - i >= lower) & (j - i <= upper)
    return allowed


def softmin3(a, b, c, gamma):
    """-gamma * log(exp(-a/gamma) + exp(-b/gamma) + exp(-c/gamma)), stable, +inf safe.

    A NaN operand gives NaN (torch.min propagates it), as the hard min does: a NaN cost
    makes its pair's value NaN (no path avoids a cell in the soft-min's sum)."""
    stacked = torch.stack([a, b, c], dim=-1)
    mu = stacked.min(dim=-1).values
    finite = torch.isfinite(mu)
    mu_safe = torch.where(finite, mu, 0.0)
    # exponents <= 0; an infinite entry contributes exp(-inf) = 0 with a zero gradient
    total = torch.exp(-(stacked - mu_safe.unsqueeze(-1)) / gamma).sum(dim=-1)
    value = mu_safe - gamma * torch.log(torch.where(finite, total, 1.0))
    return torch.where(finite, value, mu.detach())  # +inf (or NaN, or -inf) as it is


def dtw_diagonals(cost, x_lengths, y_lengths, band=None, gamma=None):
    """Runs the recurrence; returns (values (B,), diagonals) where diagonals[d][b, i] = R[i][d-i].

    gamma=None: hard DTW (min); gamma > 0: soft-DTW.
    """
    B, N, M = cost.shape
    device, dtype = cost.device, cost.dtype
    allowed = allowed_cells(x_lengths, y_lengths, N, M, band)
    cost = torch.where(allowed, cost, 0.0)  # never read outside: no gradient, no NaN

    inf_row = torch.full((B, 1), math.inf, device=device, dtype=dtype)
    first = torch.full((B, N + 1), math.inf, device=device, dtype=dtype)
    first[:, 0] = 0.0  # d = 0: R[0][0] = 0
    second = torch.full((B, N + 1), math.inf, device=device, dtype=dtype)  # d = 1: borders
    diagonals = [first, second]
    i = torch.arange(N + 1, device=device)
    end = x_lengths + y_lengths  # the diagonal holding each pair's end cell
    values = torch.full((B,), math.inf, device=device, dtype=dtype)
    for d in range(2, N + M + 1):
        j = d - i
        inside = (i >= 1) & (j >= 1) & (j <= M)
        rows, cols = (i - 1).clamp(0, N - 1), (j - 1).clamp(0, M - 1)
        local = cost[:, rows, cols]                                 # cost[i][j] along the diagonal
        ok = inside & allowed[:, rows, cols]
        prev2, prev1 = diagonals[-2], diagonals[-1]
        up_left = torch.cat([inf_row, prev2[:, :-1]], dim=1)        # R[i-1][j-1]
        up = torch.cat([inf_row, prev1[:, :-1]], dim=1)             # R[i-1][j]
        left = prev1                                                # R[i][j-1]
        if gamma is None:
            # min of the three, its gradient routed to one predecessor: the diagonal on a tie,
            # then the cell above, then the left one (dtw_path_reference's rule). The
            # gradient of R[n][m] is then the 0/1 indicator of that optimal path, as the
            # kernels' backtrack gives, where torch.minimum would split it at ties.
            # torch.where keeps the value of the min (NaN included) wherever they differ.
            lowest = torch.minimum(torch.minimum(up_left, up), left)
            chosen = torch.where(up_left == lowest, up_left, torch.where(up == lowest, up, left))
            best = torch.where(chosen == lowest, chosen, lowest)
        else:
            best = softmin3(up_left, up, left, gamma)
        current = torch.where(ok, local + best, math.inf)
        diagonals.append(current)
        at_end = current.gather(1, x_lengths.view(-1, 1)).squeeze(1)
        values = torch.where(end == d, at_end, values)
    return values, diagonals


def dtw_from_cost_reference(cost, x_lengths, y_lengths, band=None, gamma=None):
    """DTW (gamma=None) or soft-DTW value of every pair from its (B, N, M) cost."""
    return dtw_diagonals(cost, x_lengths, y_lengths, band, gamma)[0]


def accumulated_cost_matrix(cost, x_lengths, y_lengths, band=None, gamma=None):
    """The full (B, N + 1, M + 1) matrix R (row and column 0 are the borders)."""
    B, N, M = cost.shape
    _, diagonals = dtw_diagonals(cost, x_lengths, y_lengths, band, gamma)
    R = torch.full((B, N + 1, M + 1), math.inf, dtype=cost.dtype, device=cost.device)
    for d, diagonal in enumerate(diagonals):
        for i in range(max(0, d - M), min(N, d) + 1):
            R[:, i, d - i] = diagonal[:, i]
    return R


def dtw_path_reference(cost, x_lengths, y_lengths, band=None):
    """The optimal path of every pair: a list of (L_b, 2) int64 tensors of 0-based (i, j).

    Backtracks from (n, m); ties prefer the diagonal step, then (i-1, j), then (i, j-1).
    """
    R = accumulated_cost_matrix(cost.detach(), x_lengths, y_lengths, band).cpu()
    paths = []
    for b in range(cost.shape[0]):
        i, j = int(x_lengths[b]), int(y_lengths[b])
        path = [(i - 1, j - 1)]
        while (i, j) != (1, 1):
            steps = [(R[b, i - 1, j - 1], i - 1, j - 1), (R[b, i - 1, j], i - 1, j),
                     (R[b, i, j - 1], i, j - 1)]
            _, i, j = min(steps, key=lambda s: s[0])  # min keeps the first of equal values
            path.append((i - 1, j - 1))
        paths.append(torch.tensor(path[::-1], dtype=torch.int64))
    return paths
